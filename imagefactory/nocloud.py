"""Ephemeral SSH keys and NoCloud seeds: how a build or a check boot gets (only) its own access."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public_text: str


def ephemeral_key(directory: Path, comment: str) -> KeyPair:
    """A new ed25519 key for one build or one boot; deleted with its run directory."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return KeyPair(private=private, public_text=private.with_suffix(".pub").read_text().strip())


APT_TIMERS = ("apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service",
              "apt-daily-upgrade.service")  # fmt: skip


def build_user_data(public_key: str) -> dict:
    """Lets exactly ``public_key`` in, as root, and creates no user.

    The build connects as root so that no build account exists to be left behind;
    cloud-init's default user (ubuntu) is then created at the image's first real boot.
    """
    return {
        "disable_root": False,
        "users": [],
        "ssh_pwauth": False,
        "ssh_authorized_keys": [public_key],
        # The archive-built base already has the right sources; don't let the build boot rewrite.
        "apt": {"preserve_sources_list": True},
        # apt's daily timers have never run on a fresh image, so they fire at its first boot
        # and hold the dpkg lock for minutes under TCG (an update and unattended-upgrade).
        # Masked for this boot only (in /run): the image keeps them, the build runs its own.
        "bootcmd": [" ".join(["systemctl", "mask", "--runtime", "--now", *APT_TIMERS])],
    }


def instance_user_data(public_key: str) -> dict:
    """What a cloud gives a new instance: its key for the default user, nothing else."""
    return {"ssh_authorized_keys": [public_key]}


def write_seed(directory: Path, instance_id: str, hostname: str, user_data: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "user-data").write_text("#cloud-config\n" + yaml.safe_dump(user_data))
    meta = {"instance-id": instance_id, "local-hostname": hostname}
    (directory / "meta-data").write_text(yaml.safe_dump(meta))
    return directory
