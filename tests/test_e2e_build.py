"""End to end: really build the focal image (base from the archive, Packer under TCG), then
look inside the artifact offline. Minutes, not seconds: marked e2e."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefactory import disk, qemu
from imagefactory.records import Record

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="building and mounting images needs root"),
]


@pytest.fixture(scope="session")
def root(focal: tuple[Path, Record]) -> Iterator[Path]:
    _, record = focal
    with disk.mounted_image(Path(record.artifact), say=lambda _line: None) as mounted:
        yield mounted


def test_record_describes_the_artifact(focal: tuple[Path, Record]) -> None:
    record_path, record = focal
    artifact = Path(record.artifact)
    assert record.state == "published" and record_path.parent == artifact.parent
    assert hashlib.sha256(artifact.read_bytes()).hexdigest() == record.sha256
    assert record.size == artifact.stat().st_size
    assert re.fullmatch(r"5\.4\.0-\d+-generic", record.kernel)
    assert "strongswan-starter" in record.packages and "snapd" not in record.packages
    manifest = Path(record.manifest).read_text()
    assert re.search(r"^strongswan-starter\t5\.8\.2", manifest, re.M)
    assert record.provenance.packer_version == "1.6.6"
    assert record.provenance.base_image_sha256 and record.provenance.archive_release_dates
    assert len(record.provenance.template_sha256) == 64
    assert record.timings["packer build"] > 0


def test_artifact_stands_alone_compressed(focal: tuple[Path, Record]) -> None:
    info = qemu.info(Path(focal[1].artifact))
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["actual-size"] < info["virtual-size"] / 4


def test_snapd_is_gone_and_pinned(root: Path) -> None:
    for path in ("snap", "var/snap", "var/lib/snapd", "var/cache/snapd", "usr/lib/snapd"):
        assert not (root / path).exists(), path
    assert not (root / "var/lib/dpkg/info/snapd.list").exists()
    pin = (root / "etc/apt/preferences.d/imagefactory-pin-away").read_text()
    assert "Package: snapd\nPin: release *\nPin-Priority: -1" in pin


def test_strongswan_starter_enabled_with_af_key_at_boot(root: Path) -> None:
    wants = root / "etc/systemd/system/multi-user.target.wants/strongswan-starter.service"
    assert wants.is_symlink()
    assert (root / "lib/systemd/system/strongswan-starter.service").is_file()
    modules = (root / "etc/modules-load.d/imagefactory-strongswan.conf").read_text().split()
    assert modules == ["af_key"]


def test_no_build_credentials_left(root: Path) -> None:
    assert not list(root.glob("root/.ssh/authorized_keys*"))
    assert not list(root.glob("home/*/.ssh/authorized_keys*"))
    assert not list(root.glob("etc/ssh/ssh_host_*"))
    humans = [
        line.split(":")[0]
        for line in (root / "etc/passwd").read_text().splitlines()
        if 1000 <= int(line.split(":")[2]) < 65534
    ]
    assert humans == [], "no build user may remain"
    passwords = [
        line.split(":")[0]
        for line in (root / "etc/shadow").read_text().splitlines()
        if line.split(":")[1] not in ("", "*", "!", "!*") and not line.split(":")[1].startswith("!")
    ]
    assert passwords == []
    assert not (root / "etc/sudoers.d/90-cloud-init-users").exists()


def test_identity_and_state_reset_for_first_boot(root: Path) -> None:
    assert (root / "etc/machine-id").read_bytes() == b""
    assert not (root / "var/lib/cloud/instances").exists()
    assert not (root / "var/lib/cloud/instance").exists()
    assert list((root / "var/lib/apt/lists").glob("*_Packages")) == []
    assert not (root / "var/tmp/imagefactory-report.tar").exists()
    logs = [p for p in (root / "var/log").rglob("*") if p.is_file() and p.stat().st_size > 0]
    # wtmp gets the shutdown's own runlevel record after cleanup; no login may be in it.
    assert [p.relative_to(root).as_posix() for p in logs if p.name != "wtmp"] == []
    assert logins_in_wtmp(root / "var/log/wtmp") == []
    assert (root / "var/log/journal").is_dir(), "persistent journal stays on for first boot"


def logins_in_wtmp(path: Path) -> list[str]:
    """Users of USER_PROCESS records (struct utmp: 384 bytes, ut_type first, ut_user at 44)."""
    data = path.read_bytes() if path.exists() else b""
    users = []
    for offset in range(0, len(data) - 383, 384):
        (kind,) = struct.unpack_from("<i", data, offset)
        if kind == 7:  # USER_PROCESS
            users.append(data[offset + 44 : offset + 76].rstrip(b"\0").decode(errors="replace"))
    return users


def test_boot_leaves_out_what_a_vpn_server_does_not_use(root: Path) -> None:
    import yaml

    dropin = yaml.safe_load((root / "etc/cloud/cloud.cfg.d/90_imagefactory_boot.cfg").read_text())
    config = dropin["cloud_config_modules"]
    assert "snap" not in config and "ubuntu_pro" not in config
    assert {"apt_configure", "runcmd"} <= set(config)  # what clouds need stays
    assert {"growpart", "users_groups", "ssh"} <= set(dropin["cloud_init_modules"])
    for unit in ("e2scrub_reap.service", "ondemand.service", "grub-initrd-fallback.service"):
        assert os.readlink(root / "etc/systemd/system" / unit) == "/dev/null", unit
