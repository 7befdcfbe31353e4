"""checks/boot.py: cloud-init's verdict and the single-process boot, judged on what a focal
guest of ours recorded (cloud-init 24.4.1, cloud-init-main.service)."""

from __future__ import annotations

import json
from pathlib import Path

from .guest import guest_module

FOCAL = Path(__file__).resolve().parent / "data" / "focal"

boot = guest_module("boot")
STATUS = json.loads((FOCAL / "cloud-init-status.json").read_text())
LOG = (FOCAL / "cloud-init.log").read_text()
JOURNAL = (FOCAL / "journal.cloud-init-main").read_text()
MAIN = {
    "LoadState": "loaded",
    "UnitFileState": "enabled",
    "ActiveState": "inactive",
    "Result": "success",
    "ExecMainStatus": "0",
}


def test_recorded_boot_passes() -> None:
    assert boot.judge_status(STATUS) == []
    assert boot.judge_single_process(JOURNAL, MAIN) == []


def test_status_problems() -> None:
    running = STATUS | {"status": "running"}
    assert boot.judge_status(running) == ["cloud-init status is 'running', not 'done'"]
    error = STATUS | {"errors": ["('ssh', KeyError('x'))"]}
    assert boot.judge_status(error) == ["cloud-init reported 1 error(s): ('ssh', KeyError('x'))"]
    [problem] = boot.judge_status(STATUS | {"datasource": None})
    assert "no datasource" in problem


def test_modules_run_reads_the_module_names() -> None:
    ran = boot.modules_run(LOG)
    assert {"ssh", "growpart", "users_groups", "apt_configure", "final_message"} <= ran
    assert len(ran) == 22
    assert not ran & {"snap", "lxd", "landscape", "ubuntu_pro"}  # what the image skips


def test_only_this_boots_part_of_the_log_counts() -> None:
    earlier = LOG.replace("Running module ssh ", "Running module snap ")
    assert "snap" in boot.modules_run(earlier + LOG)
    assert "snap" not in boot.modules_run(boot.this_boot(earlier + LOG))


def test_stages_in_the_main_units_journal() -> None:
    assert boot.stages_started(JOURNAL) == ["init-local", "init", "modules:config", "modules:final"]


def test_four_process_boot_is_not_single_process() -> None:
    """The package's own units: the main unit never ran, its journal is empty."""
    problems = boot.judge_single_process("", MAIN | {"UnitFileState": "disabled"})
    assert problems == [
        "cloud-init-main.service is not enabled (UnitFileState=disabled)",
        "cloud-init-main.service ran stages [], expected "
        "['init-local', 'init', 'modules:config', 'modules:final']",
    ]


def test_main_unit_missing_or_failed() -> None:
    [missing, _] = boot.judge_single_process("", {"LoadState": "not-found"})
    assert missing == "cloud-init-main.service does not exist (LoadState=not-found)"
    failed = boot.judge_single_process(
        JOURNAL, MAIN | {"Result": "exit-code", "ExecMainStatus": "1"}
    )
    assert failed == ["cloud-init-main.service ended with Result=exit-code status=1"]


def test_a_stage_that_never_ran_is_named() -> None:
    lines = [line for line in JOURNAL.splitlines() if "'modules:final'" not in line]
    [problem] = boot.judge_single_process("\n".join(lines), MAIN)
    assert "ran stages ['init-local', 'init', 'modules:config']" in problem


def test_failed_units_are_named() -> None:
    # What 22.04's first certification here saw: the stage units lost cloud-init's answer.
    listing = (
        "cloud-init-local.service loaded failed failed Cloud-init: Local Stage (pre-network)\n"
        "cloud-init.service       loaded failed failed Cloud-init: Network Stage\n"
    )
    assert boot.failed_units(listing) == ["cloud-init-local.service", "cloud-init.service"]
    assert boot.failed_units("") == []


checklib = guest_module("checklib")


def run_check(monkeypatch, tmp_path: Path, failed_listing: str):
    """boot.check() on the recorded focal boot, with the guest's commands answered from it."""
    answers = {
        "cloud-init": json.dumps(STATUS),
        "journalctl": JOURNAL,
        "systemctl list-units": failed_listing,
        "systemctl is-enabled": "masked\n",
    }

    def fake_run(argv, **_kwargs):
        key = next(k for k in answers if " ".join(argv).startswith(k))
        return checklib.Completed(argv, 0, answers[key], "")

    monkeypatch.setattr(boot, "run", fake_run)
    monkeypatch.setattr(boot, "read_text", lambda path, default=None: LOG)
    monkeypatch.setattr(boot, "unit_properties", lambda unit, props: MAIN)
    expect = {"boot": {"skip_cloud_init_modules": ["byobu"], "mask_units": ["ondemand.service"],
                       "cloud_init_single_process": True}}  # fmt: skip
    return boot.check(checklib.Context(expect, tmp_path))


def test_the_whole_check_passes_a_clean_boot_and_names_a_failed_unit(monkeypatch, tmp_path):
    assert run_check(monkeypatch, tmp_path, "").status == "pass"
    result = run_check(
        monkeypatch, tmp_path, "cloud-init.service loaded failed failed Cloud-init: Network\n"
    )
    assert result.status == "fail"
    assert "units failed at this boot: cloud-init.service" in result.detail
    assert result.data["failed_units"] == ["cloud-init.service"]
