"""apparmor: the kernel enforces AppArmor, strongSwan's own profiles are loaded in enforce mode,
and the IKE daemon runs confined by its profile.

Ubuntu's images boot with AppArmor on, and strongSwan's packages ship profiles for charon,
stroke and lookip (/etc/apparmor.d/usr.lib.ipsec.*); Algo's deployment puts them in enforce
mode and expects them there. The kernel lists what is loaded, with its mode, in
/sys/kernel/security/apparmor/profiles ("name (mode)"); a process's confinement is its
/proc/<pid>/attr/apparmor/current (or, before kernel 5.8, /proc/<pid>/attr/current).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from checklib import Context, Result, failed, passed, read_text, skipped, unit_properties

ENABLED = "/sys/module/apparmor/parameters/enabled"
PROFILES = "/sys/kernel/security/apparmor/profiles"
SERVICE = "apparmor.service"


def parse_profiles(text: str) -> dict[str, str]:
    """The kernel's profile list ("/usr/lib/ipsec/charon (enforce)" lines) -> name: mode."""
    loaded = {}
    for line in text.splitlines():
        match = re.match(r"^(.*) \(([a-z_]+)\)$", line.strip())
        if match:
            loaded[match.group(1)] = match.group(2)
    return loaded


def judge_profiles(loaded: dict[str, str], enforce: list[str]) -> list[str]:
    problems = []
    for name in enforce:
        mode = loaded.get(name)
        if mode is None:
            problems.append(f"profile {name} is not loaded")
        elif mode != "enforce":
            problems.append(f"profile {name} is in {mode} mode, not enforce")
    return problems


def judge_confined(name: str, labels: dict[int, str]) -> list[str]:
    """Problems with the processes running ``name`` (pid -> their AppArmor label)."""
    if not labels:
        return [f"{name} is not running (nothing to see confined)"]
    return [
        f"{name} (pid {pid}) runs as {label!r}, not under its profile in enforce mode"
        for pid, label in sorted(labels.items())
        if label != f"{name} (enforce)"
    ]


def processes_running(program: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "exe") == program:
                pids.append(int(entry.name))
        except OSError:
            continue  # gone, or a kernel thread
    return pids


def label_of(pid: int) -> str:
    for attr in (f"/proc/{pid}/attr/apparmor/current", f"/proc/{pid}/attr/current"):
        text = read_text(attr)
        if text is not None and text.strip():
            return text.strip().rstrip("\0")
    return "unknown"


def check(ctx: Context) -> Result:
    expect = ctx.section("apparmor")
    if not expect:
        return skipped("no AppArmor expectations (assessment of a provider's stock image)")
    enabled = (read_text(ENABLED, "") or "").strip()
    if enabled != "Y":
        return failed(f"the kernel does not enforce AppArmor ({ENABLED}: {enabled or 'absent'})")
    loaded = parse_profiles(read_text(PROFILES, "") or "")
    enforce = list(expect.get("enforce") or [])
    problems = judge_profiles(loaded, enforce)
    service = unit_properties(SERVICE, ("UnitFileState", "ActiveState", "Result"))
    if service.get("UnitFileState") != "enabled" or service.get("ActiveState") != "active":
        problems.append(
            f"{SERVICE} is {service.get('UnitFileState')}/{service.get('ActiveState')} "
            f"(Result={service.get('Result')}): profiles would not load at the next boot"
        )
    confined = {}
    for name in expect.get("confined") or []:
        labels = {pid: label_of(pid) for pid in processes_running(name)}
        confined[name] = sorted(set(labels.values()))
        problems += judge_confined(name, labels)
    data = {
        "loaded": len(loaded),
        "enforcing": sum(1 for mode in loaded.values() if mode == "enforce"),
        "profiles": {name: loaded.get(name, "not loaded") for name in enforce},
        "confined": confined,
    }
    if problems:
        return failed("; ".join(problems), **data)
    return passed(
        f"{len(enforce)} strongSwan profiles enforcing ({data['enforcing']} of {len(loaded)} "
        f"loaded); {', '.join(confined) or 'nothing'} confined",
        **data,
    )
