"""strongswan_service: the release's strongSwan unit is enabled, running and stays running,
the modules it needs before charon starts are loaded now and at every boot, and the unit also
starts and stays up under the sandbox a deployment puts it in (Algo's systemd hardening).

On 20.04 and later the ipsec.conf daemon's unit is strongswan-starter; strongswan.service
belongs to charon-systemd and is normally absent. af_key must be loaded at boot (/proc/net/pfkey;
Algo issues #14820, #14996): autoloading does not cover it.

The sandbox (data/strongswan-sandbox.conf) goes in as a runtime drop-in, the unit is restarted
under it and then restarted without it: the image is left as it was. Algo's
`ReadOnlyPaths=/proc/net/pfkey` cannot work on any kernel; the check shows that once per image
(data.readonly_pfkey) instead of carrying it in the sandbox.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from checklib import (
    Cleanup,
    Context,
    Result,
    failed,
    passed,
    read_text,
    run,
    skipped,
    unit_properties,
    wait_until,
)
from kernel_modules import effective_config_files, normalize, parse_builtin, parse_proc_modules

STABLE_FOR_S = 5.0
SANDBOX = Path(__file__).resolve().parent / "data" / "strongswan-sandbox.conf"
SANDBOX_DROPIN = "90-imagefactory-check-sandbox.conf"
START_TIMEOUT_S = 60.0
MODULES_LOAD_DIRS = (
    "/etc/modules-load.d",
    "/run/modules-load.d",
    "/usr/local/lib/modules-load.d",
    "/usr/lib/modules-load.d",
    "/lib/modules-load.d",
)
# What proves a module's job is done, besides its presence in /proc/modules.
PROOF = {"af_key": "/proc/net/pfkey"}
PROPERTIES = (
    "LoadState",
    "UnitFileState",
    "ActiveState",
    "SubState",
    "NRestarts",
    "MainPID",
    "Result",
)


def parse_modules_load(files: list[tuple[str, str]]) -> dict[str, str]:
    """modules-load.d(5) files (path, text) -> module -> file that loads it at boot."""
    modules: dict[str, str] = {}
    for path, text in files:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith(("#", ";")):
                modules.setdefault(normalize(line.split()[0]), path)
    return modules


def judge_unit(unit: str, first: dict[str, str], second: dict[str, str]) -> list[str]:
    """Problems with the unit from two `systemctl show` snapshots STABLE_FOR_S apart."""
    if first.get("LoadState") != "loaded":
        return [f"{unit}.service does not exist (LoadState={first.get('LoadState')})"]
    problems = []
    if first.get("UnitFileState") not in ("enabled", "alias"):
        problems.append(f"{unit} is not enabled (UnitFileState={first.get('UnitFileState')})")
    for label, snap in (("", first), (f" after {STABLE_FOR_S:g} s", second)):
        if snap.get("ActiveState") != "active" or snap.get("SubState") != "running":
            problems.append(
                f"{unit} is {snap.get('ActiveState')}/{snap.get('SubState')}{label}"
                f" (Result={snap.get('Result')})"
            )
            break
    if not problems and first.get("NRestarts") != second.get("NRestarts"):
        problems.append(
            f"{unit} restarted (NRestarts {first.get('NRestarts')} -> {second.get('NRestarts')})"
        )
    elif not problems and first.get("MainPID") != second.get("MainPID"):
        problems.append(
            f"{unit}'s main process changed ({first.get('MainPID')} -> {second.get('MainPID')})"
        )
    return problems


def judge_modules(
    modules: list[str],
    loaded: set[str],
    builtin: set[str],
    at_boot: dict[str, str],
    proof_exists: dict[str, bool],
) -> list[str]:
    problems = []
    for module in (normalize(m) for m in modules):
        if module in builtin:
            continue
        if module not in loaded:
            problems.append(f"{module} is not loaded")
        elif not proof_exists.get(module, True):
            problems.append(f"{module} is loaded but {PROOF[module]} is missing")
        if module not in at_boot:
            problems.append(f"{module} is not listed in modules-load.d (not loaded at boot)")
    return problems


def snapshot(unit: str) -> dict[str, str]:
    return unit_properties(f"{unit}.service", PROPERTIES)


def modules_load_files() -> list[tuple[str, str]]:
    files = effective_config_files(MODULES_LOAD_DIRS)
    # Debian's /etc/modules is read too (through /etc/modules-load.d/modules.conf).
    if not any(Path(p).resolve() == Path("/etc/modules").resolve() for p, _ in files):
        files.append(("/etc/modules", read_text("/etc/modules", "") or ""))
    return files


def sandbox_dropin(unit: str) -> Path:
    return Path("/run/systemd/system", f"{unit}.service.d", SANDBOX_DROPIN)


def restart_and_judge(unit: str, stable_for: float = STABLE_FOR_S) -> list[str]:
    """Restart the unit and judge it once it settled (active, then stable for a while)."""
    done = run(["systemctl", "restart", f"{unit}.service"], timeout=START_TIMEOUT_S)
    if not done.ok:
        status = snapshot(unit)
        return [f"{unit} does not start ({status.get('Result')}): {done.why()}"]
    wait_until(lambda: snapshot(unit).get("SubState") == "running", START_TIMEOUT_S)
    first = snapshot(unit)
    time.sleep(stable_for)
    return judge_unit(unit, first, snapshot(unit))


def _reload() -> object:
    return run(["systemctl", "daemon-reload"], timeout=START_TIMEOUT_S)


def under_sandbox(unit: str) -> list[str]:
    """Problems with the unit started under the sandbox drop-in; afterwards the drop-in is
    gone and the unit runs as the image configures it (a failure to get there is reported)."""
    dropin = sandbox_dropin(unit)
    with Cleanup() as cleanup:
        dropin.parent.mkdir(parents=True, exist_ok=True)
        cleanup.push(f"restart {unit} without the sandbox", lambda: _restored(unit))
        cleanup.push(f"remove {dropin}", lambda: (dropin.unlink(), _reload())[1])
        dropin.write_text(SANDBOX.read_text())
        _reload()
        problems = [f"under the sandbox: {p}" for p in restart_and_judge(unit)]
    return problems + [f"restoring: {error}" for error in cleanup.errors]


def _restored(unit: str) -> None:
    # It ran stably as configured before the sandbox: running again is enough.
    problems = restart_and_judge(unit, stable_for=0)
    if problems:
        raise RuntimeError("; ".join(problems))


def readonly_pfkey_probe() -> str:
    """What systemd makes of Algo's `ReadOnlyPaths=/proc/net/pfkey` here (a throwaway unit)."""
    done = run(
        ["systemd-run", "--wait", "--quiet", "--collect", "-p", "ReadOnlyPaths=/proc/net/pfkey",
         "/bin/true"],
        timeout=START_TIMEOUT_S,
    )  # fmt: skip
    if done.ok:
        return "applies"
    return f"refused (exit {done.returncode}; the kernel cannot mount on /proc/<pid>/net files)"


def check(ctx: Context) -> Result:
    service = ctx.section("service")
    if not service or not service.get("unit"):
        return skipped("no service expectations (assessment of a provider's stock image)")
    unit = str(service["unit"])
    if unit.endswith(".service"):
        unit = unit[: -len(".service")]
    first = snapshot(unit)
    if first.get("LoadState") == "loaded":
        time.sleep(STABLE_FOR_S)  # a unit that crash-loops looks active at any one instant
    second = snapshot(unit) if first.get("LoadState") == "loaded" else first
    problems = judge_unit(unit, first, second)
    wanted = list(service.get("load_modules") or [])
    kernel = Path("/lib/modules", os.uname().release)
    builtin = parse_builtin(read_text(kernel / "modules.builtin", "") or "")
    problems += judge_modules(
        wanted,
        parse_proc_modules(read_text("/proc/modules", "") or ""),
        builtin,
        parse_modules_load(modules_load_files()),
        {m: Path(p).exists() for m, p in PROOF.items()},
    )
    boot_loader = snapshot("systemd-modules-load")
    if boot_loader.get("ActiveState") == "failed":
        problems.append(f"systemd-modules-load failed at boot (Result={boot_loader.get('Result')})")
    other = snapshot("strongswan").get("LoadState")
    data = {"unit": unit, "state": second, "load_modules": wanted, "strongswan.service": other}
    if problems:
        return failed("; ".join(problems), **data)
    sandboxed = under_sandbox(unit)
    data["readonly_pfkey"] = readonly_pfkey_probe()
    if sandboxed:
        return failed("; ".join(sandboxed), **data)
    return passed(
        f"{unit} enabled and active for {STABLE_FOR_S:g} s, also under Algo's sandbox; "
        f"{', '.join(wanted) or 'no modules'} loaded and loaded at boot; "
        f"ReadOnlyPaths=/proc/net/pfkey {data['readonly_pfkey'].split(' (')[0]}",
        **data,
    )
