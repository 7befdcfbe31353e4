"""End to end: the fleet's focal image was certified by booting a fresh overlay and running
checks/ inside; broken variants of it prove each check catches its fault (several faults a
boot, each caught by its own check and by no other)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from imagefactory.definitions import load_image
from imagefactory.digests import sha256_file
from imagefactory.records import Record
from imagefactory.settings import REPO_ROOT, Settings
from imagefactory.steps import StepLog

from .e2e import certify_variant, failed_checks

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="booting and mounting images needs root"),
]
FOCAL = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")
REQUIRED = [
    "environment", "release", "kernel_modules", "xfrm", "ikev2_tunnel",
    "snapd", "strongswan_service", "boot", "apparmor", "updates", "parity", "hygiene",
]  # fmt: skip


def test_the_good_image_passed_every_required_check(focal: tuple[Path, Record]) -> None:
    record_path, record = focal
    cert = record.certification
    assert cert is not None and cert.passed, failed_checks(record)
    assert [t.state for t in record.history] == ["built", "certified", "published"]
    assert [r.name for r in cert.results] == REQUIRED
    assert all(r.status == "pass" for r in cert.results), [
        (r.name, r.status, r.detail) for r in cert.results if r.status != "pass"
    ]
    assert cert.artifact_sha256 == record.sha256 and len(cert.checks_version) == 64
    assert sha256_file(Path(record.artifact)) == record.sha256, "the artifact is never modified"
    assert {"ssh", "cloud_init", "system_ready", "checks"} <= set(cert.boot)
    for suffix in ("json", "xml", "txt"):
        assert (record_path.parent / f"certification.{suffix}").is_file()
    # Nothing of the check boot is left behind: no overlay, no key, no seed.
    assert [p.name for p in record_path.parent.iterdir() if p.name.startswith("check-")] == []


# Each fault breaks exactly one property of the image, offline, in a copy of it.
def _unloadable_required_module(root: Path) -> None:
    # xt_policy: required for `-m policy` firewall rules, and used by no other check.
    (root / "etc/modprobe.d/broken.conf").write_text("install xt_policy /bin/false\n")


def _snapd_reinstalled(root: Path) -> None:
    (root / "etc/apt/preferences.d/imagefactory-pin-away").unlink()
    for path in ("snap", "var/snap", "var/lib/snapd"):
        (root / path).mkdir()
    with (root / "var/lib/dpkg/status").open("a") as status:
        status.write(
            "\nPackage: snapd\nStatus: install ok installed\nPriority: optional\n"
            "Section: devel\nMaintainer: Ubuntu Developers\nArchitecture: amd64\n"
            "Version: 2.66.1+20.04\nDescription: Daemon and tooling that enable snap packages\n"
        )


def _strongswan_starter_disabled(root: Path) -> None:
    (root / "etc/systemd/system/multi-user.target.wants/strongswan-starter.service").unlink()


def _af_key_not_loaded_at_boot(root: Path) -> None:
    (root / "etc/modules-load.d/imagefactory-strongswan.conf").unlink()


def _leftover_authorized_key(root: Path) -> None:
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBuildKeyLeftBehindByAnImageBuilder0000 build\n"
    )


def _wrong_release(root: Path) -> None:
    # /etc/os-release is a relative symlink to ../usr/lib/os-release on Ubuntu.
    link = root / "etc/os-release"
    target = root / "usr/lib/os-release" if link.is_symlink() else link
    # The version only: with the codename too, cloud-init would write groovy's apt sources
    # and updates would rightly fail as well.
    target.write_text(target.read_text().replace('VERSION_ID="20.04"', 'VERSION_ID="20.10"'))


def _cloud_init_in_four_processes(root: Path) -> None:
    # The stage units then run their stages themselves (the helper's fallback): cloud-init
    # still does its job, only not the way the image definition says it boots.
    (root / "etc/systemd/system/cloud-init.target.wants/cloud-init-main.service").unlink()


def strongswan_profiles_in_complain_mode(root: Path) -> None:
    # What `aa-complain /usr/lib/ipsec/*` does: the complain flag on each profile's header.
    for path in root.glob("etc/apparmor.d/usr.lib.ipsec.*"):
        text = path.read_text()
        text = re.sub(r"flags=\(([^)]*)\)", r"flags=(\1,complain)", text, count=1)
        if "complain" not in text:
            text = re.sub(r"^(/usr/lib/ipsec/\S+) \{", r"\1 flags=(complain) {", text, flags=re.M)
        path.write_text(text)


def unattended_upgrades_switched_off(root: Path) -> None:
    (root / "etc/apt/apt.conf.d/20auto-upgrades").write_text(
        'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "0";\n'
    )


# Fault -> the checks that must catch it. Faults share a boot when their checks differ.
FAULTS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "required module unloadable": (_unloadable_required_module, ("kernel_modules",)),
    "snapd reinstalled": (_snapd_reinstalled, ("snapd",)),
    "strongswan-starter disabled": (_strongswan_starter_disabled, ("strongswan_service",)),
    "af_key not loaded at boot": (_af_key_not_loaded_at_boot, ("strongswan_service",)),
    "leftover authorized key": (_leftover_authorized_key, ("hygiene",)),
    "wrong release": (_wrong_release, ("release",)),
    "cloud-init in four processes": (_cloud_init_in_four_processes, ("boot",)),
    "strongSwan profiles in complain mode": (strongswan_profiles_in_complain_mode, ("apparmor",)),
    "unattended-upgrades switched off": (unattended_upgrades_switched_off, ("updates",)),
}
# Two boots hold every fault: one of focal, one of noble (the new checks' faults on a second
# release, tests/test_e2e_pipeline.py).
BOOTS = {
    "ubuntu-20.04": ["required module unloadable", "snapd reinstalled", "wrong release",
                     "leftover authorized key", "strongswan-starter disabled",
                     "cloud-init in four processes", "strongSwan profiles in complain mode",
                     "unattended-upgrades switched off"],
    "ubuntu-24.04": ["strongSwan profiles in complain mode", "unattended-upgrades switched off",
                     "af_key not loaded at boot"],
}  # fmt: skip


def expected_failures(faults: list[str]) -> list[str]:
    return sorted(check for f in faults for check in FAULTS[f][1])


def test_every_fault_has_a_boot() -> None:
    assert {f for faults in BOOTS.values() for f in faults} == set(FAULTS)
    for faults in BOOTS.values():
        catchers = [check for f in faults for check in FAULTS[f][1]]
        assert len(set(catchers)) == len(catchers), "one fault per check and boot"


def test_broken_variants_fail_exactly_their_checks(
    focal: tuple[Path, Record], e2e_settings: Settings
) -> None:
    faults = BOOTS["ubuntu-20.04"]
    record = certify_variant(focal[1], [FAULTS[f][0] for f in faults], e2e_settings, FOCAL)
    assert record.state == "rejected"
    assert failed_checks(record) == expected_failures(faults)


def test_provider_assessment_of_a_stock_vm_over_ssh(e2e_settings: Settings, tmp_path: Path) -> None:
    """`inv check --host` without an image, on a stock-like VM (the archive base: no strongSwan):
    the kernel can host an IPsec server, the tunnel test is skipped for want of strongSwan, and
    nothing of the checks is left on the machine."""
    from imagefactory.base import build_base
    from imagefactory.certify import check_host
    from imagefactory.providers import booted_overlay

    log = StepLog()
    stock = build_base(FOCAL, e2e_settings, log).path
    work = tmp_path / "vm"
    work.mkdir()
    with booted_overlay(stock, work, e2e_settings.cache_dir, log) as vm:
        target = vm.target  # as a maintainer would connect: the default user and its key
        result = check_host(target, None, FOCAL, e2e_settings.checks_dir, tmp_path / "r", log)
        left = target.text("ls -d /tmp/imagefactory-checks.* 2>/dev/null || true")
    statuses = {r.name: r.status for r in result.results}
    assert statuses == {
        "environment": "pass",
        "kernel_modules": "pass",
        "xfrm": "pass",
        "ikev2_tunnel": "skip",
    }
    assert result.passed and left == ""
    assert (tmp_path / "r" / "checks.xml").is_file()
