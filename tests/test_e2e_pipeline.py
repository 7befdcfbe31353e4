"""End to end, the way a scheduler runs it (the session's fleet, tests/e2e.py): a run killed
mid-build leaves nothing running and nothing published; the next `inv rebuild` cleans up and
builds, certifies and publishes every release; a run killed mid-check leaves no QEMU; an
unchanged image is then skipped quickly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from imagefactory import records

from .e2e import (
    RELEASES,
    Fleet,
    certify_variant,
    failed_checks,
    image_definition,
    inv,
    kill_when_qemu_runs,
    wait_until_gone,
)
from .test_e2e_certify import BOOTS, FAULTS, expected_failures

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="building and booting images needs root"),
]


def test_a_run_killed_during_the_build_leaves_nothing_behind(fleet: Fleet) -> None:
    # Packer got SIGTERM when its parent died and stopped its QEMU; nothing of ours ran on.
    assert fleet.left_after_kill == []
    assert fleet.store_after_kill == []


def test_the_next_rebuild_cleans_up_builds_certifies_and_publishes_every_release(
    fleet: Fleet,
) -> None:
    """The default schedule is every defined release on qemu: one scheduled run builds,
    certifies and publishes each of them, from the same templates and checks."""
    result = fleet.rebuild
    print(f"rebuild of {len(RELEASES)} releases: {fleet.seconds:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cleaned up after an interrupted run" in result.stderr
    assert "warning: webhook" in result.stderr and fleet.webhook_bodies  # failed, run did not
    assert f"{len(RELEASES)} pairs, 2 at a time" in result.stderr
    assert re.search(r"\[ubuntu-26\.04 on qemu\] +<== packer build: done", result.stderr)
    # The killed build left no record; each release has exactly one, published.
    assert sorted((r["image"], r["state"]) for r in fleet.listed) == [
        (image, "published") for image in RELEASES
    ]
    store = fleet.build_dir / "store"
    index = json.loads((store / "streams/v1/index.json").read_text())["index"]
    [entry] = index.values()
    products = json.loads((store / entry["path"]).read_text())["products"]
    for row in fleet.listed:
        cert = records.load(Path(row["record"])).certification
        assert cert is not None and cert.passed
        assert {r.name: r.detail for r in cert.results if r.status != "pass"} == {}, row["image"]
        serial_dir = Path(row["published"])
        assert serial_dir.parent.parent == store
        check = subprocess.run(
            ["sha256sum", "-c", "SHA256SUMS"], cwd=serial_dir, capture_output=True
        )
        assert check.returncode == 0, check.stdout
        product = f"org.imagefactory:strongswan:{RELEASES[row['image']]}:amd64"
        assert list(products[product]["versions"]) == [serial_dir.name]
    report = json.loads((fleet.build_dir / "reports/rebuild-latest.json").read_text())
    assert report["exit_code"] == 0 and report["jobs"] == 2
    assert [p["status"] for p in report["pairs"]] == ["published"] * len(RELEASES)
    posted = json.loads(fleet.webhook_bodies[0])["pairs"]
    assert {p["published"] for p in posted} == {r["published"] for r in fleet.listed}


def test_on_24_04_complain_mode_switched_off_updates_and_no_af_key_fail_their_checks(
    fleet: Fleet,
) -> None:
    """The new checks' faults on a second release, in one boot: each fails only its own check."""
    faults = BOOTS["ubuntu-24.04"]
    noble = fleet.record("ubuntu-24.04")
    changes = [FAULTS[f][0] for f in faults]
    record = certify_variant(noble, changes, fleet.settings, image_definition("ubuntu-24.04"))
    assert record.state == "rejected"
    assert failed_checks(record) == expected_failures(faults)
    assert fleet.record("ubuntu-24.04").state == "published"  # the original is untouched


def test_a_run_killed_during_the_check_leaves_no_qemu(fleet: Fleet) -> None:
    focal = fleet.record_path("ubuntu-20.04")
    kill_when_qemu_runs(fleet.build_dir, "check", "--record", str(focal), within=120)
    assert wait_until_gone(fleet.build_dir, within=30) == []
    assert records.load(focal).state == "published"  # verdict untouched


def test_an_unchanged_image_is_skipped(fleet: Fleet) -> None:
    started = time.monotonic()
    result = inv(fleet.build_dir, "rebuild")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cleaned up after an interrupted run" in result.stderr  # the killed check's overlay
    report = json.loads((fleet.build_dir / "reports/rebuild-latest.json").read_text())
    assert len(report["pairs"]) == len(RELEASES)
    for pair in report["pairs"]:
        assert pair["status"] == "skipped" and "is current" in pair["reason"], pair
    print(f"no-op rebuild of {len(RELEASES)} releases: {elapsed:.1f} s")
    assert not list((fleet.build_dir / "artifacts").glob("*/*/*/check-*"))
