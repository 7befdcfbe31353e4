"""updates: security updates keep arriving between rebuilds, and the clock is right.

- unattended-upgrades is installed and switched on (APT::Periodic::Update-Package-Lists and
  APT::Periodic::Unattended-Upgrade, as apt-config reads them), its allowed origins include
  this release's security pocket, and apt's daily timers that run it are enabled;
- the apt sources carry that pocket (otherwise there is nothing to upgrade from);
- the release's time-sync daemon is running: IKE certificates are only as good as the clock.

Ubuntu's own images do all of this; the archive-built base gets it from the image definition.
"""

from __future__ import annotations

import re

from checklib import Context, Result, failed, passed, run, skipped, unit_properties

PERIODIC = ("APT::Periodic::Update-Package-Lists", "APT::Periodic::Unattended-Upgrade")
TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer")
UNIT_PROPERTIES = ("LoadState", "UnitFileState", "ActiveState", "SubState")


def parse_apt_config(text: str) -> dict[str, list[str]]:
    """`apt-config dump` lines (`Key "value";`, list items as `Key:: "value";`) -> key: values."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r'^(\S+?)(::)? "(.*)";$', line.strip())
        if match:  # a bare `Key "";` only opens a scope or a list
            values.setdefault(match.group(1), [])
            if match.group(3):
                values[match.group(1)].append(match.group(3))
    return values


def security_origins(config: dict[str, list[str]], distro: str, codename: str) -> list[str]:
    """The allowed origins and origin patterns that let the security pocket's updates in."""
    pocket = f"{codename}-security"
    found = []
    for origin in config.get("Unattended-Upgrade::Allowed-Origins", []):
        expanded = origin.replace("${distro_id}", distro).replace("${distro_codename}", codename)
        if expanded == f"{distro}:{pocket}":
            found.append(origin)
    for pattern in config.get("Unattended-Upgrade::Origins-Pattern", []):
        expanded = pattern.replace("${distro_id}", distro).replace("${distro_codename}", codename)
        fields = dict(part.split("=", 1) for part in expanded.split(",") if "=" in part)
        if fields.get("a", fields.get("archive")) == pocket or fields.get("n") == pocket:
            found.append(pattern)
    return found


def judge_periodic(config: dict[str, list[str]]) -> list[str]:
    problems = []
    for key in PERIODIC:
        value = (config.get(key) or ["0"])[-1]
        if value in ("", "0"):
            problems.append(f"{key} is {value or 'unset'}: unattended upgrades never run")
    return problems


def judge_unit(unit: str, props: dict[str, str], running: bool) -> list[str]:
    if props.get("LoadState") != "loaded":
        return [f"{unit} does not exist (LoadState={props.get('LoadState')})"]
    problems = []
    if props.get("UnitFileState") != "enabled":
        problems.append(f"{unit} is {props.get('UnitFileState')}, not enabled")
    want = ("active", "running") if running else ("active", None)
    if props.get("ActiveState") != want[0] or (want[1] and props.get("SubState") != want[1]):
        problems.append(f"{unit} is {props.get('ActiveState')}/{props.get('SubState')}")
    return problems


def suites_in(print_uris: str) -> list[str]:
    """The suites of the Release files `apt-get --print-uris update` would fetch."""
    return sorted(set(re.findall(r"^'[^']*/dists/([^/']+)/(?:In)?Release' ", print_uris, re.M)))


def source_suites() -> list[str] | None:
    """The suites apt's sources name, as apt itself parses them (one-line .list and deb822
    .sources alike, Enabled: no honoured), without fetching anything; None when apt cannot
    say."""
    done = run(["apt-get", "-o", "Debug::NoLocking=1", "--print-uris", "update"])
    return suites_in(done.stdout) if done.ok else None


def check(ctx: Context) -> Result:
    expect = ctx.section("updates")
    if not expect:
        return skipped("no update expectations (assessment of a provider's stock image)")
    codename = str(ctx.section("codename") or "")
    installed = run(["dpkg-query", "-W", "-f", "${Status}", "unattended-upgrades"])
    if "ok installed" not in installed.stdout:
        return failed("unattended-upgrades is not installed: no security updates between builds")
    config = parse_apt_config(run(["apt-config", "dump"]).stdout)
    problems = judge_periodic(config)
    origins = security_origins(config, "Ubuntu", codename)
    if not origins:
        problems.append(f"unattended-upgrades does not allow the {codename}-security origin")
    suites = source_suites()
    if suites is None:
        problems.append("apt cannot list its sources (apt-get indextargets failed)")
    elif f"{codename}-security" not in suites:
        problems.append(f"the apt sources lack {codename}-security (they have {', '.join(suites)})")
    for timer in TIMERS:
        problems += judge_unit(timer, unit_properties(timer, UNIT_PROPERTIES), running=False)
    time_sync = f"{expect.get('time_sync')}.service"
    problems += judge_unit(time_sync, unit_properties(time_sync, UNIT_PROPERTIES), running=True)
    clock = run(["timedatectl", "show", "-p", "NTP", "-p", "NTPSynchronized"]).stdout
    data = {
        "security_origins": origins,
        "suites": suites,
        "time_sync": time_sync,
        # Synchronised only where an NTP server answers (not on an offline build host).
        "clock": dict(line.split("=", 1) for line in clock.splitlines() if "=" in line),
    }
    if problems:
        return failed("; ".join(problems), **data)
    return passed(
        f"unattended-upgrades on for {codename}-security (apt-daily timers enabled); "
        f"{time_sync} running",
        **data,
    )
