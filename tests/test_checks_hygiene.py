"""checks/hygiene.py: users, keys, passwords and leftovers, from files recorded in a focal
guest booted with a NoCloud seed (cloud-init's default user `ubuntu`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]
FOCAL = ROOT / "tests" / "data" / "focal"


hygiene = guest_module("hygiene")
ROOT_KEYS = (FOCAL / "root_authorized_keys").read_text()
INJECTED = "ssh-ed25519 " + ROOT_KEYS.split("ssh-ed25519 ")[1].strip()
PASSWD = """root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
systemd-coredump:x:999:999:systemd Core Dumper:/:/usr/sbin/nologin
ubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash
"""


def test_default_user_from_the_recorded_cloud_cfg() -> None:
    assert hygiene.default_user([(FOCAL / "cloud.cfg").read_text()]) == "ubuntu"


def test_default_user_overrides() -> None:
    override = "system_info:\n  default_user:\n    name: admin\n    lock_passwd: true\n"
    inline = "system_info:\n  default_user: {name: 'ops', lock_passwd: true}\n"
    base = (FOCAL / "cloud.cfg").read_text()

    assert hygiene.default_user([base, override]) == "admin"
    assert hygiene.default_user([base, inline]) == "ops"
    assert hygiene.default_user(["users: []\n"]) is None


def test_only_the_default_user_is_a_person() -> None:
    accounts = hygiene.parse_passwd(PASSWD)

    assert hygiene.check_users(accounts, "ubuntu") == []
    extra = hygiene.parse_passwd(PASSWD + "packer:x:1001:1001::/home/packer:/bin/bash\n")
    assert hygiene.check_users(extra, "ubuntu") == ["unexpected user(s) packer"]
    assert hygiene.check_users(accounts, None) == ["unexpected user(s) ubuntu"]


def test_cloud_inits_root_key_line_is_the_injected_key() -> None:
    """cloud-init prefixes root's copy with options and a quoted command (disable_root)."""
    assert ROOT_KEYS.startswith("no-port-forwarding,")
    identity = hygiene.key_identity(ROOT_KEYS)

    assert identity == hygiene.key_identity(INJECTED)
    assert identity[0] == "ssh-ed25519"
    assert hygiene.stray_keys("/root/.ssh/authorized_keys", ROOT_KEYS, {identity}) == []


def test_a_stray_key_is_reported_with_its_place() -> None:
    allowed = {hygiene.key_identity(INJECTED)}
    text = (
        f"{INJECTED}\n"
        "# a comment\n"
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDstray build@packer\n"
        "garbage line\n"
    )

    strays = hygiene.stray_keys("/home/ubuntu/.ssh/authorized_keys", text, allowed)

    assert strays == [
        "/home/ubuntu/.ssh/authorized_keys:3 ssh-rsa build@packer",
        "/home/ubuntu/.ssh/authorized_keys:4 (unparsable key line)",
    ]


def test_usable_passwords() -> None:
    shadow = (
        "root:!*:20783:0:99999:7:::\n"
        "systemd-coredump:!!:20783::::::\n"
        "ubuntu:!:20783:0:99999:7:::\n"
        "daemon:*:20783:0:99999:7:::\n"
        "packer:$6$salt$hash:20783:0:99999:7:::\n"
        "empty::20783:0:99999:7:::\n"
    )
    assert hygiene.usable_passwords(shadow) == ["packer", "empty (empty password)"]


def test_sudoers_users_from_the_recorded_cloud_init_file() -> None:
    text = (FOCAL / "90-cloud-init-users").read_text()

    assert hygiene.sudoers_users(text) == {"ubuntu"}
    assert hygiene.sudoers_users(
        text + "packer ALL=(ALL) NOPASSWD:ALL\n%sudo ALL=(ALL) ALL\n"
        "Defaults env_reset\nUser_Alias ADMINS = a\n"
    ) == {"ubuntu", "packer"}


def test_sshd_settings_from_the_recorded_sshd_t() -> None:
    patterns, command = hygiene.sshd_key_settings((FOCAL / "sshd-T").read_text())

    assert patterns == [".ssh/authorized_keys", ".ssh/authorized_keys2"]
    assert command is None
    custom = "authorizedkeysfile /etc/ssh/keys/%u\nauthorizedkeyscommand /usr/bin/fetch %u\n"
    assert hygiene.sshd_key_settings(custom) == (["/etc/ssh/keys/%u"], "/usr/bin/fetch %u")


def test_authorized_keys_paths_expand_like_sshd() -> None:
    account = hygiene.Account("ubuntu", 1000, "/home/ubuntu")

    assert hygiene.expand(".ssh/authorized_keys", account) == "/home/ubuntu/.ssh/authorized_keys"
    assert hygiene.expand("/etc/ssh/keys/%u", account) == "/etc/ssh/keys/ubuntu"
    assert hygiene.expand("%h/.keys%%", account) == "/home/ubuntu/.keys%"


def test_files_older_than_the_boot(tmp_path: Path) -> None:
    fresh, baked = tmp_path / "fresh", tmp_path / "baked"
    fresh.write_text("")
    baked.write_text("")
    boot = fresh.stat().st_mtime - 10
    os.utime(baked, (boot - 86400, boot - 86400))

    assert hygiene.made_before_boot([str(fresh), str(baked)], boot) == [str(baked)]


@pytest.mark.parametrize("skew", [0, hygiene.SKEW_S - 1])
def test_a_clock_step_after_boot_is_tolerated(tmp_path: Path, skew: int) -> None:
    key = tmp_path / "ssh_host_ed25519_key"
    key.write_text("")
    boot = key.stat().st_mtime + skew  # btime moves forward when NTP steps the clock

    assert hygiene.made_before_boot([str(key)], boot) == []
