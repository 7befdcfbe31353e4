"""checks/environment.py and checks/release.py: their verdicts from recorded or typical facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]
FOCAL = ROOT / "tests" / "data" / "focal"


environment = guest_module("environment")
release = guest_module("release")
UNSUPPORTED = (
    "unsupported: kernel modules cannot be loaded here; "
    "userspace IPsec (kernel-libipsec) is not supported"
)


def signs(**changes: object):
    base = {
        "container": None,
        "openvz": False,
        "pid1_container": None,
        "modules_dir": True,
        "virtualization": "qemu",
        "kernel": "5.4.0-216-generic",
    }
    return environment.Signs(**{**base, **changes})


def test_a_vm_with_its_own_kernel_passes() -> None:
    result = environment.judge(signs())

    assert result.status == "pass"
    assert result.data["virtualization"] == "qemu"
    assert "virtual machine (qemu)" in result.detail


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"container": "docker", "virtualization": "docker"}, "container (docker)"),
        ({"container": "lxc"}, "container (lxc)"),
        ({"openvz": True, "virtualization": "openvz"}, "OpenVZ"),
        ({"pid1_container": "podman"}, "container=podman"),
        ({"modules_dir": False}, "no /lib/modules/5.4.0-216-generic"),
    ],
)
def test_containers_and_openvz_are_unsupported(changes: dict, reason: str) -> None:
    result = environment.judge(signs(**changes))

    assert result.status == "fail"
    assert UNSUPPORTED in result.detail
    assert reason in result.detail


def test_pid1_container_variable() -> None:
    environ = b"PATH=/usr/bin\0container=lxc\0TERM=linux\0"
    assert environment.pid1_container(environ) == "lxc"
    assert environment.pid1_container(b"PATH=/usr/bin\0") is None


def test_recorded_focal_release_matches() -> None:
    values = release.parse_os_release((FOCAL / "os-release").read_text())
    expect = {"release": "20.04", "codename": "focal", "kernel_flavour": "generic"}

    result = release.judge(values, "5.4.0-216-generic", expect)

    assert result.status == "pass", result.detail
    assert values["PRETTY_NAME"] == "Ubuntu 20.04.6 LTS"


@pytest.mark.parametrize(
    ("expect", "kernel", "problem"),
    [
        ({"release": "22.04", "codename": "focal"}, "5.4.0-216-generic", "VERSION_ID is '20.04'"),
        ({"release": "20.04", "codename": "jammy"}, "5.4.0-216-generic", "VERSION_CODENAME"),
        ({"release": "20.04", "kernel_flavour": "generic"}, "5.4.0-1133-kvm", "not the generic"),
        ({"release": "20.04", "kernel_flavour": "aws"}, "5.4.0-1103-aws-fips", "not the aws"),
    ],
)
def test_release_mismatches_fail(expect: dict, kernel: str, problem: str) -> None:
    values = release.parse_os_release((FOCAL / "os-release").read_text())

    result = release.judge(values, kernel, expect)

    assert result.status == "fail"
    assert problem in result.detail
