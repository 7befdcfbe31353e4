"""Certification pieces that need no VM: expectations, verdicts, reports, selection."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from imagefactory import checking
from imagefactory.certify import (
    ASSESSMENT_PROFILE,
    expectations,
    junit_xml,
    summary,
    verdict,
)
from imagefactory.definitions import load_image
from imagefactory.errors import ConfigError
from imagefactory.records import CheckResult
from imagefactory.settings import REPO_ROOT, Settings

FOCAL = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")
CHECKS = REPO_ROOT / "checks"


def test_full_profile_expectations_come_from_the_image_and_provider() -> None:
    expect = expectations(CHECKS, ["ssh-ed25519 AAAA k"], FOCAL, "amazon-ebs", FOCAL)
    assert expect["profile"] == "full"
    assert (expect["release"], expect["codename"]) == ("20.04", "focal")
    assert expect["kernel_flavour"] == "aws"  # the provider's kernel, not the archive base's
    assert expect["service"] == {"unit": "strongswan-starter", "load_modules": ["af_key"]}
    assert expect["packages"] == {"purge": ["snapd"], "pin_away": ["snapd"]}
    assert "xfrm_user" in expect["kernel_modules"]["required"]
    assert expect["checks"][0] == "environment" and "hygiene" in expect["checks"]
    assert expect["allowed_authorized_keys"] == ["ssh-ed25519 AAAA k"]
    assert len(expect["checks_version"]) == 64


def test_release_expectations_for_the_new_checks() -> None:
    resolute = load_image(REPO_ROOT / "images" / "ubuntu-26.04.yaml")
    reference = {"ubuntu-minimal": ["chrony|time-daemon", "rsyslog"], "ubuntu-server": ["lvm2"]}
    expect = expectations(CHECKS, [], resolute, "qemu", resolute, parity_reference=reference)
    assert expect["checks"][-4:] == ["apparmor", "updates", "parity", "hygiene"]
    assert expect["apparmor"]["enforce"] == [
        "/usr/lib/ipsec/charon", "/usr/lib/ipsec/stroke", "/usr/lib/ipsec/lookip",
    ]  # fmt: skip
    assert expect["updates"] == {"time_sync": "chrony"}
    assert expect["parity"]["reference"] == ["chrony|time-daemon", "lvm2", "rsyslog"]
    assert expect["parity"]["left_out"]["lvm2"].startswith("storage")
    # A build that recorded no reference (an older record): nothing to hold the image to.
    assert expectations(CHECKS, [], resolute, "qemu", resolute)["parity"] is None


def test_assessment_profile_has_no_image_expectations() -> None:
    expect = expectations(CHECKS, [], None, None, reference=FOCAL)
    assert expect["profile"] == "assessment" and expect["checks"] == ASSESSMENT_PROFILE
    assert expect["release"] is None and expect["service"] is None
    assert expect["kernel_modules"]["required"] == FOCAL.checks.kernel_modules.required


def _results(*statuses: str, required: bool = True) -> list[CheckResult]:
    return [
        CheckResult(name=f"c{i}", status=s, required=required, detail=f"d{i}", duration=1.5)
        for i, s in enumerate(statuses)
    ]


def test_verdict_fails_only_on_required_failures() -> None:
    assert verdict(_results("pass", "skip", "pass"))
    assert not verdict(_results("pass", "fail"))
    assert verdict(_results("fail", required=False))


def test_junit_report_counts_and_messages() -> None:
    root = ET.fromstring(junit_xml("focal.qemu", _results("pass", "fail", "skip")))
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("3", "1", "1")
    [failure] = root.iter("failure")
    assert failure.get("message") == "d1"
    assert "REJECTED" in summary("x", _results("pass", "fail")) and "failed: c1" in summary(
        "x", _results("pass", "fail")
    )


def test_host_must_be_user_at_address() -> None:
    assert checking.parse_host("ubuntu@192.0.2.7") == ("ubuntu", "192.0.2.7")
    with pytest.raises(ConfigError, match="expected USER@ADDR"):
        checking.parse_host("192.0.2.7")


def test_latest_record_needs_a_build(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run `inv build --image ubuntu-20\.04"):
        checking.latest_record(Settings(build_dir=tmp_path), "ubuntu-20.04", "qemu")
