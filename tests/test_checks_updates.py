"""checks/updates.py: unattended-upgrades, the security pocket and the clock, from apt's and
systemd's own output formats."""

from __future__ import annotations

from pathlib import Path

from .guest import guest_module

updates = guest_module("updates")
checklib = guest_module("checklib")

# `apt-config dump` of a jammy image with unattended-upgrades (abridged).
DUMP = """\
APT "";
APT::Periodic "";
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
Unattended-Upgrade "";
Unattended-Upgrade::Allowed-Origins "";
Unattended-Upgrade::Allowed-Origins:: "${distro_id}:${distro_codename}";
Unattended-Upgrade::Allowed-Origins:: "${distro_id}:${distro_codename}-security";
Unattended-Upgrade::Allowed-Origins:: "${distro_id}ESMApps:${distro_codename}-apps-security";
Unattended-Upgrade::DevRelease "auto";
"""


def test_apt_config_lists_and_values() -> None:
    config = updates.parse_apt_config(DUMP)
    assert config["APT::Periodic::Unattended-Upgrade"] == ["1"]
    assert config["Unattended-Upgrade::Allowed-Origins"] == [
        "${distro_id}:${distro_codename}",
        "${distro_id}:${distro_codename}-security",
        "${distro_id}ESMApps:${distro_codename}-apps-security",
    ]
    assert updates.judge_periodic(config) == []


def test_the_security_pocket_must_be_an_allowed_origin() -> None:
    config = updates.parse_apt_config(DUMP)
    assert updates.security_origins(config, "Ubuntu", "jammy") == [
        "${distro_id}:${distro_codename}-security"
    ]
    without = updates.parse_apt_config(DUMP.replace('}-security";', '}-updates";'))
    assert updates.security_origins(without, "Ubuntu", "jammy") == []


def test_an_origins_pattern_for_the_pocket_counts_too() -> None:
    config = updates.parse_apt_config(
        'Unattended-Upgrade::Origins-Pattern:: "origin=Ubuntu,archive=${distro_codename}-security";'
    )
    assert updates.security_origins(config, "Ubuntu", "noble") == [
        "origin=Ubuntu,archive=${distro_codename}-security"
    ]


def test_switched_off_or_unset_periodic_runs_fail() -> None:
    off = updates.parse_apt_config(DUMP.replace('Unattended-Upgrade "1"', 'Unattended-Upgrade "0"'))
    assert updates.judge_periodic(off) == [
        "APT::Periodic::Unattended-Upgrade is 0: unattended upgrades never run"
    ]
    assert len(updates.judge_periodic({})) == 2


def test_timers_need_enabling_and_the_clock_daemon_must_run() -> None:
    timer = {"LoadState": "loaded", "UnitFileState": "enabled", "ActiveState": "active",
             "SubState": "waiting"}  # fmt: skip
    assert updates.judge_unit("apt-daily.timer", timer, running=False) == []
    assert updates.judge_unit("apt-daily.timer", timer | {"UnitFileState": "masked"}, False) == [
        "apt-daily.timer is masked, not enabled"
    ]
    daemon = timer | {"SubState": "running"}
    assert updates.judge_unit("chrony.service", daemon, running=True) == []
    assert updates.judge_unit("chrony.service", {"LoadState": "not-found"}, True) == [
        "chrony.service does not exist (LoadState=not-found)"
    ]
    assert updates.judge_unit("chrony.service", timer, running=True) == [
        "chrony.service is active/waiting"
    ]


RESOLUTE = Path(__file__).parent / "data" / "resolute"


def test_a_recorded_26_04_guest_gets_security_updates() -> None:
    config = updates.parse_apt_config((RESOLUTE / "apt-config-dump").read_text())
    assert updates.judge_periodic(config) == []
    assert updates.security_origins(config, "Ubuntu", "resolute") == [
        "${distro_id}:${distro_codename}-security"
    ]
    # deb822 sources (ubuntu.sources), as apt itself read them: the security pocket is there.
    suites = updates.suites_in((RESOLUTE / "apt-print-uris").read_text())
    assert suites == [
        "resolute", "resolute-backports", "resolute-security", "resolute-updates",
    ]  # fmt: skip


def test_recorded_timers_and_chrony_pass() -> None:
    shown = (RESOLUTE / "systemctl-show.updates").read_text().split("\n\n")
    timers, chrony = [checklib.parse_show(text) for text in shown[:2]], shown[2]
    for unit, props in zip(updates.TIMERS, timers, strict=True):
        assert updates.judge_unit(unit, props, running=False) == []
    assert updates.judge_unit("chrony.service", checklib.parse_show(chrony), running=True) == []
