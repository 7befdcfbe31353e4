"""checks/strongswan_service.py: unit and boot-module verdicts from systemctl output recorded
in a focal guest."""

from __future__ import annotations

from pathlib import Path

import pytest

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]
FOCAL = ROOT / "tests" / "data" / "focal"


service = guest_module("strongswan_service")
checklib = guest_module("checklib")
GOOD = checklib.parse_show((FOCAL / "systemctl-show.strongswan-starter").read_text())


def test_recorded_running_unit_passes() -> None:
    assert GOOD["ActiveState"] == "active" and GOOD["UnitFileState"] == "enabled"
    assert service.judge_unit("strongswan-starter", GOOD, dict(GOOD)) == []


@pytest.mark.parametrize(
    ("first", "second", "problem"),
    [
        ({"UnitFileState": "disabled"}, {}, "is not enabled (UnitFileState=disabled)"),
        ({"ActiveState": "inactive", "SubState": "dead"}, {}, "is inactive/dead"),
        ({}, {"ActiveState": "activating", "SubState": "auto-restart"}, "after 5 s"),
        ({}, {"NRestarts": "2"}, "restarted (NRestarts 0 -> 2)"),
        ({}, {"MainPID": "4242"}, "main process changed"),
    ],
)
def test_unit_problems(first: dict, second: dict, problem: str) -> None:
    problems = service.judge_unit(
        "strongswan-starter", {**GOOD, **first}, {**GOOD, **first, **second}
    )

    assert any(problem in p for p in problems), problems


def test_a_missing_unit_fails_but_strongswan_service_may_be_absent() -> None:
    absent = checklib.parse_show((FOCAL / "systemctl-show.strongswan").read_text())

    assert absent["LoadState"] == "not-found"
    problems = service.judge_unit("strongswan", absent, absent)
    assert problems == ["strongswan.service does not exist (LoadState=not-found)"]


def test_modules_loaded_now_and_at_boot() -> None:
    at_boot = service.parse_modules_load(
        [
            ("/etc/modules-load.d/imagefactory-strongswan.conf", "af_key\n"),
            ("/etc/modules", "# /etc/modules: kernel modules to load at boot time.\n"),
        ]
    )

    assert at_boot == {"af_key": "/etc/modules-load.d/imagefactory-strongswan.conf"}
    ok = service.judge_modules(
        ["af_key"], {"af_key", "xfrm_user"}, set(), at_boot, {"af_key": True}
    )
    assert ok == []


@pytest.mark.parametrize(
    ("loaded", "at_boot", "proof", "problems"),
    [
        (set(), {"af_key": "x"}, {"af_key": False}, ["af_key is not loaded"]),
        (
            {"af_key"},
            {},
            {"af_key": True},
            ["af_key is not listed in modules-load.d (not loaded at boot)"],
        ),
        (
            {"af_key"},
            {"af_key": "x"},
            {"af_key": False},
            ["af_key is loaded but /proc/net/pfkey is missing"],
        ),
    ],
)
def test_module_problems(loaded: set, at_boot: dict, proof: dict, problems: list) -> None:
    assert service.judge_modules(["af-key"], loaded, set(), at_boot, proof) == problems


def test_a_built_in_module_needs_no_loading() -> None:
    assert service.judge_modules(["af_key"], set(), {"af_key"}, {}, {}) == []


def test_modules_load_syntax() -> None:
    files = [("/etc/modules-load.d/a.conf", "# comment\n; also a comment\n  esp4  \nxfrm-user\n")]
    assert service.parse_modules_load(files) == {
        "esp4": "/etc/modules-load.d/a.conf",
        "xfrm_user": "/etc/modules-load.d/a.conf",
    }


def test_nothing_expected_is_a_skip(tmp_path: Path) -> None:
    result = service.check(checklib.Context({"service": None}, tmp_path))
    assert result.status == "skip"
