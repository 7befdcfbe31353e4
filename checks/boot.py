"""boot: cloud-init did its whole job, and what the image definition trims at boot is trimmed.

- cloud-init finished (status done) without errors and found a datasource: an instance whose
  cloud-init failed has no key, hostname or network configuration from its cloud;
- the modules the definition skips did not run, and the units it masks are masked;
- when the image boots cloud-init in one process (boot.cloud_init_single_process), this boot
  did: cloud-init-main.service ran all four stages and ended successfully;
- no unit failed at this boot (a cloud-init stage unit that lost its answer from the single
  process, say: cloud-init itself may still have done everything).
"""

from __future__ import annotations

import json
import re

from checklib import Context, Result, failed, passed, read_text, run, skipped, unit_properties

CLOUD_INIT_LOG = "/var/log/cloud-init.log"
MAIN_UNIT = "cloud-init-main.service"
STAGES = ("init-local", "init", "modules:config", "modules:final")
MAIN_PROPERTIES = ("LoadState", "UnitFileState", "ActiveState", "Result", "ExecMainStatus")


def judge_status(status: dict) -> list[str]:
    """Problems in `cloud-init status --long --format json`."""
    problems = []
    if status.get("status") != "done":
        problems.append(f"cloud-init status is {status.get('status')!r}, not 'done'")
    errors = status.get("errors") or []
    if errors:
        problems.append(f"cloud-init reported {len(errors)} error(s): {errors[0]}")
    if str(status.get("datasource") or "none").lower() == "none":
        problems.append("cloud-init found no datasource (no key or network from the cloud)")
    return problems


def this_boot(log_text: str) -> str:
    """The part of cloud-init.log written by this boot (the log is appended to every boot)."""
    starts = [m.start() for m in re.finditer(r"Cloud-init v\. \S+ running 'init-local'", log_text)]
    return log_text[starts[-1] :] if starts else log_text


def modules_run(log_text: str) -> set[str]:
    """Names of the cloud-init modules this boot ran ("Running module ssh (<module ...")."""
    return set(re.findall(r"Running module (\S+) \(", log_text))


def stages_started(log_text: str) -> list[str]:
    """The stages this boot started, in order ("Cloud-init v. X running 'init-local' at")."""
    return re.findall(r"Cloud-init v\. \S+ running '([^']+)'", log_text)


def judge_single_process(main_output: str, main: dict[str, str]) -> list[str]:
    """Problems with a boot that should have run cloud-init in one process: the main unit's
    own output (its journal this boot) must show every stage, in order, once."""
    problems = []
    if main.get("LoadState") != "loaded":
        problems.append(f"{MAIN_UNIT} does not exist (LoadState={main.get('LoadState')})")
    elif main.get("UnitFileState") != "enabled":
        problems.append(f"{MAIN_UNIT} is not enabled (UnitFileState={main.get('UnitFileState')})")
    elif main.get("Result") != "success" or main.get("ExecMainStatus") not in ("0", None):
        problems.append(
            f"{MAIN_UNIT} ended with Result={main.get('Result')} "
            f"status={main.get('ExecMainStatus')}"
        )
    started = stages_started(main_output)
    if started != list(STAGES):
        problems.append(f"{MAIN_UNIT} ran stages {started}, expected {list(STAGES)}")
    return problems


def failed_units(listing: str) -> list[str]:
    """`systemctl list-units --state=failed --plain --no-legend` -> the failed unit names."""
    return [line.split()[0].lstrip("●*") for line in listing.splitlines() if line.split()]


def _masked(units: list[str]) -> list[str]:
    problems = []
    for unit in units:
        state = run(["systemctl", "is-enabled", unit]).stdout.strip()
        if state != "masked":
            problems.append(f"{unit} is {state or 'unknown'}, not masked")
    return problems


def check(ctx: Context) -> Result:
    boot = ctx.section("boot")
    if boot is None:
        return skipped("no boot expectations (assessment of a provider's stock image)")
    done = run(["cloud-init", "status", "--long", "--format", "json"])
    try:
        status = json.loads(done.stdout)
    except ValueError:
        return failed(f"cannot read cloud-init's status: {done.why()}")
    log_text = this_boot(read_text(CLOUD_INIT_LOG, "") or "")
    problems = judge_status(status)
    ran_skipped = sorted(modules_run(log_text) & set(boot.get("skip_cloud_init_modules") or []))
    if ran_skipped:
        problems.append(f"skipped cloud-init modules ran: {', '.join(ran_skipped)}")
    problems += _masked(boot.get("mask_units") or [])
    single = bool(boot.get("cloud_init_single_process"))
    if single:
        journal = run(["journalctl", "--boot", "--output=cat", f"--unit={MAIN_UNIT}"]).stdout
        problems += judge_single_process(journal, unit_properties(MAIN_UNIT, MAIN_PROPERTIES))
    broken = failed_units(
        run(["systemctl", "list-units", "--state=failed", "--plain", "--no-legend"]).stdout
    )
    if broken:
        problems.append(f"units failed at this boot: {', '.join(broken)}")
    recoverable = status.get("recoverable_errors") or {}
    data = {
        "status": status.get("extended_status") or status.get("status"),
        "datasource": status.get("datasource"),
        "recoverable_errors": {k: len(v) for k, v in recoverable.items()},
        "modules_run": len(modules_run(log_text)),
        "single_process": single,
        "failed_units": broken,
    }
    if problems:
        return failed("; ".join(problems), **data)
    how = "in one process" if single else "in four processes"
    return passed(
        f"cloud-init done ({data['datasource']}) {how}; "
        f"{len(boot.get('skip_cloud_init_modules') or [])} modules skipped, "
        f"{len(boot.get('mask_units') or [])} units masked",
        **data,
    )
