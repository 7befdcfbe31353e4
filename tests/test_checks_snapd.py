"""checks/snapd.py: purge and pin logic against apt output recorded in a focal guest and the
pin stanza the build writes (tests/golden/ubuntu-20.04.20-purge.sh)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]
FOCAL = ROOT / "tests" / "data" / "focal"


snapd = guest_module("snapd")
checklib = guest_module("checklib")


def build_pin_file() -> str:
    """The preferences file the build's purge script writes (rendered golden copy)."""
    script = (ROOT / "tests" / "golden" / "ubuntu-20.04.20-purge.sh").read_text()
    return re.search(r"<<'PIN'\n(.*?)\nPIN\n", script, re.S).group(1)


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("install ok installed", "installed"),
        ("deinstall ok config-files", "config-files"),
        ("unknown ok not-installed", "absent"),
        (None, "absent"),
        ("hold ok half-installed", "installed"),
    ],
)
def test_package_state(status: str | None, state: str) -> None:
    assert snapd.package_state(status) == state


def test_the_builds_pin_makes_every_version_negative() -> None:
    stanzas = snapd.parse_preferences(build_pin_file())

    stanza = snapd.pin_stanza("snapd", stanzas)
    assert stanza == {"package": "snapd", "pin": "release *", "pin-priority": "-1"}
    assert snapd.pin_stanza("snapd-xdg-open", stanzas) is None


@pytest.mark.parametrize(
    ("text", "pinned"),
    [
        ("Package: snapd\nPin: version *\nPin-Priority: -10\n", True),
        ("Package: snap*\nPin: origin *\nPin-Priority: -1\n", True),
        ("Package: /^snap/\nPin: release a=*\nPin-Priority: -1\n", True),
        ("Package: lxd snapd\nPin: release *\nPin-Priority: -1\n", True),
        ("Package: snapd\nPin: release a=focal-updates\nPin-Priority: -1\n", False),
        ("Package: snapd\nPin: release *\nPin-Priority: 100\n", False),
        ("Package: snapd\nPin: release *\n", False),
        ("# Package: snapd\n# Pin: release *\n# Pin-Priority: -1\n", False),
        ("Package: *\nPin: release *\nPin-Priority: 500\n\n"
         "Package: snapd\nPin: release *\nPin-Priority: -1\n", True),
    ],
)  # fmt: skip
def test_pin_stanzas(text: str, pinned: bool) -> None:
    assert (snapd.pin_stanza("snapd", snapd.parse_preferences(text)) is not None) is pinned


def test_preference_files_apt_reads(tmp_path: Path) -> None:
    (tmp_path / "preferences").write_text("")
    parts = tmp_path / "preferences.d"
    parts.mkdir()
    for name in ("imagefactory-pin-away", "x.pref", "y.conf", "z.pref.bak", "bad~name"):
        (parts / name).write_text("")

    names = [p.name for p in snapd.preference_files(str(tmp_path))]

    assert names == ["preferences", "imagefactory-pin-away", "x.pref"]


@pytest.mark.parametrize(
    ("recording", "candidate", "known"),
    [
        ("apt-cache-policy.pinned", None, True),
        ("apt-cache-policy.unpinned", "2.67.1+20.04", True),
    ],
)
def test_policy_candidate_from_recorded_apt(recording: str, candidate, known: bool) -> None:
    assert snapd.policy_candidate((FOCAL / recording).read_text()) == (candidate, known)


def test_policy_without_lists_knows_nothing() -> None:
    # Without lists apt-cache policy prints nothing for an unknown package.
    assert snapd.policy_candidate("") == (None, False)


def test_the_recorded_pinned_install_fails_for_the_pin() -> None:
    recorded = (FOCAL / "apt-get-install-s.pinned").read_text()
    assert recorded.startswith("exit 100")
    assert "E: Package 'snapd' has no installation candidate" in recorded


def test_update_error_names_the_unreachable_archive() -> None:
    stderr = (FOCAL / "apt-update-unreachable.stderr").read_text()

    reason = snapd.update_error(stderr, 0)

    assert reason.startswith("W: Failed to fetch http://archive.ubuntu.com/ubuntu/dists/focal/")
    assert "Could not connect" in reason
    assert snapd.update_error("", 100) == "apt-get update exited 100 without fetching lists"


def test_private_apt_keeps_state_and_hooks_private(tmp_path: Path) -> None:
    etc = tmp_path / "etc-apt"
    (etc / "apt.conf.d").mkdir(parents=True)
    (etc / "apt.conf.d" / "15update-stamp").write_text(
        'APT::Update::Post-Invoke-Success {"touch /var/lib/apt/periodic/update-success-stamp";};'
    )
    work = tmp_path / "work"
    work.mkdir()

    apt = snapd.PrivateApt(work, etc=str(etc))

    parts = apt.root / "apt.conf.d"
    assert (parts / "15update-stamp").resolve() == etc / "apt.conf.d" / "15update-stamp"
    last = sorted(p.name for p in parts.iterdir())[-1]
    config = (parts / last).read_text()
    assert f'Dir::State::Lists "{apt.root}/lists";' in config
    assert f'Dir::Cache "{apt.root}/cache";' in config
    assert "#clear APT::Update::Post-Invoke-Success;" in config
    assert (apt.root / "apt.conf").read_text() == f'Dir::Etc::Parts "{parts}";\n'
    assert oct(os.stat(work).st_mode & 0o777) == "0o711"  # apt's _apt user can reach lists/


def test_nothing_expected_is_a_skip(tmp_path: Path) -> None:
    result = snapd.check(checklib.Context({"packages": None}, tmp_path))
    assert result.status == "skip"
