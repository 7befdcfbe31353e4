"""checks/apparmor.py: profile modes and confinement, from the kernel's own listing formats."""

from __future__ import annotations

from pathlib import Path

from .guest import guest_module

apparmor = guest_module("apparmor")

ENFORCE = ["/usr/lib/ipsec/charon", "/usr/lib/ipsec/stroke", "/usr/lib/ipsec/lookip"]
# /sys/kernel/security/apparmor/profiles as the kernel writes it (one "name (mode)" a line).
LISTING = """\
/usr/lib/ipsec/stroke (enforce)
/usr/lib/ipsec/lookip (enforce)
/usr/lib/ipsec/charon (enforce)
unprivileged_userns (unconfined)
/usr/sbin/rsyslogd (enforce)
nvidia_modprobe//kmod (complain)
"""


def test_the_listing_gives_each_profile_its_mode() -> None:
    loaded = apparmor.parse_profiles(LISTING)
    assert loaded["/usr/lib/ipsec/charon"] == "enforce"
    assert loaded["nvidia_modprobe//kmod"] == "complain"
    assert loaded["unprivileged_userns"] == "unconfined"
    assert apparmor.judge_profiles(loaded, ENFORCE) == []


def test_a_profile_in_complain_mode_or_missing_fails() -> None:
    loaded = apparmor.parse_profiles(LISTING.replace("charon (enforce)", "charon (complain)"))
    del loaded["/usr/lib/ipsec/lookip"]
    assert apparmor.judge_profiles(loaded, ENFORCE) == [
        "profile /usr/lib/ipsec/charon is in complain mode, not enforce",
        "profile /usr/lib/ipsec/lookip is not loaded",
    ]


def test_the_daemon_must_run_under_its_profile_in_enforce_mode() -> None:
    name = "/usr/lib/ipsec/charon"
    assert apparmor.judge_confined(name, {812: f"{name} (enforce)"}) == []
    assert apparmor.judge_confined(name, {}) == [f"{name} is not running (nothing to see confined)"]
    assert apparmor.judge_confined(name, {812: "unconfined", 900: f"{name} (complain)"}) == [
        f"{name} (pid 812) runs as 'unconfined', not under its profile in enforce mode",
        f"{name} (pid 900) runs as '{name} (complain)', not under its profile in enforce mode",
    ]


def test_a_recorded_26_04_guest_enforces_strongswans_profiles() -> None:
    recorded = Path(__file__).parent / "data" / "resolute" / "apparmor-profiles"
    loaded = apparmor.parse_profiles(recorded.read_text())
    assert len(loaded) > 100  # 26.04's apparmor ships profiles for many desktop programs
    assert apparmor.judge_profiles(loaded, ENFORCE) == []
