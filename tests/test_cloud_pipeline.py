"""A cloud record through the same certify → gate → publish code as qemu, against the local
DigitalOcean fake: no provider-specific branch anywhere in between. Only the SSH leg is
stood in for (the checks over SSH run for real in the qemu end-to-end tests)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefactory import clouds, records
from imagefactory.certify import certify_record
from imagefactory.definitions import load_image
from imagefactory.gate import GateRefused
from imagefactory.providers import get_provider
from imagefactory.publish import publish_record
from imagefactory.records import CheckResult
from imagefactory.settings import REPO_ROOT, Settings
from imagefactory.steps import StepLog
from tests.fakes.digitalocean_api import FakeDigitalOcean

from .records_factory import make_record

TOKEN = "dop_v1_" + "c0ffee" * 10
FOCAL = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDigitalOcean]:
    fake = FakeDigitalOcean(token=TOKEN)
    monkeypatch.setenv("DIGITALOCEAN_API_URL", fake.start())
    monkeypatch.setenv("DIGITALOCEAN_API_TOKEN", TOKEN)
    monkeypatch.setattr(clouds, "POLL_S", 0)
    monkeypatch.setattr(
        clouds, "wait_until_ready", lambda *a: ({"ssh": 1.0, "system_ready": 2.0}, "running")
    )
    yield fake
    fake.stop()


def checks_say(monkeypatch: pytest.MonkeyPatch, failing: str = "") -> None:
    def results(target, checks_dir, expect, log) -> list[CheckResult]:
        return [
            CheckResult(name=n, status="fail" if n == failing else "pass", detail="stand-in")
            for n in expect["checks"]
        ]

    monkeypatch.setattr("imagefactory.certify.run_checks", results)


def cloud_record(settings: Settings, cloud: FakeDigitalOcean) -> Path:
    """What `inv build -p digitalocean` leaves: a record whose artifact is the snapshot id."""
    image_id = cloud.add_image("ubuntu-20.04-20261127.1", regions=["nyc3"])
    path = make_record(settings, serial="20261127.1", provider="digitalocean", state="built")
    data = json.loads(path.read_text())
    data["artifact"] = f"nyc3:{image_id}"
    path.write_text(json.dumps(data))
    return path


def test_a_certified_snapshot_is_published_through_the_same_gate(
    settings: Settings, cloud: FakeDigitalOcean, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks_say(monkeypatch)
    path = cloud_record(settings, cloud)
    provider = get_provider("digitalocean")
    record = certify_record(
        path, provider, FOCAL, settings.checks_dir, settings.cache_dir, StepLog()
    )
    assert record.state == "certified" and cloud.droplets == {}  # the check droplet is gone
    [image] = cloud.images.values()
    assert "imagefactory-verdict:certified" in image["tags"]
    published = publish_record(path, settings, StepLog())
    assert published.state == "published" and published.publication is not None
    assert f"image {image['id']}" in published.publication.location
    assert (
        image["name"] == "ubuntu-20.04-20261127.1"
        and "certified by imagefactory" in (image["description"])
    )
    assert "imagefactory-verdict:published" in image["tags"]
    assert "imagefactory-verdict:certified" not in image["tags"]
    assert TOKEN not in path.read_text()


def test_a_rejected_snapshot_is_labelled_and_never_published(
    settings: Settings, cloud: FakeDigitalOcean, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks_say(monkeypatch, failing="kernel_modules")
    path = cloud_record(settings, cloud)
    provider = get_provider("digitalocean")
    record = certify_record(
        path, provider, FOCAL, settings.checks_dir, settings.cache_dir, StepLog()
    )
    assert record.state == "rejected" and cloud.droplets == {}
    [image] = cloud.images.values()
    assert "imagefactory-verdict:rejected" in image["tags"]
    with pytest.raises(GateRefused, match="failed: kernel_modules"):
        publish_record(path, settings, StepLog())
    assert not cloud.calls("PUT") and records.load(path).state == "rejected"


def test_a_run_sweeps_check_droplets_left_by_a_crashed_one(
    settings: Settings, cloud: FakeDigitalOcean
) -> None:
    driver = get_provider("digitalocean").driver(FOCAL)  # type: ignore[attr-defined]
    image = str(cloud.add_image("ubuntu-20.04-20261127.1"))
    check_labels = clouds.MANAGED | {clouds.ROLE: "check-instance"}
    driver.create_server("imagefactory-check-left", image, "#cloud-config\n", check_labels)
    mine_not = driver.create_server("someone-elses", image, "", {"owner": "alice"})
    get_provider("digitalocean").recover(FOCAL, settings, StepLog())
    assert list(cloud.droplets) == [int(mine_not)]


class _Listing:
    """Just enough of a CloudDriver for retention: the published images it lists."""

    def __init__(self, images: list[clouds.CloudImage]) -> None:
        self.images = images

    def images_labelled(self, labels: dict[str, str]) -> list[clouds.CloudImage]:
        return self.images


def _published(name: str, created: str = "") -> clouds.CloudImage:
    return clouds.CloudImage(name, name, created, {})


def test_retention_without_creation_times_orders_serials_as_numbers() -> None:
    names = [f"ubuntu-20.04-20261127.{n}" for n in (10, 9, 11, 2)]
    listing = _Listing([_published(n) for n in names])
    retired = clouds.retired(listing, "ubuntu-20.04-20261127.11", keep=2)  # type: ignore[arg-type]
    assert [i.name for i in retired] == ["ubuntu-20.04-20261127.2", "ubuntu-20.04-20261127.9"]


def test_retention_goes_by_creation_time_first() -> None:
    listing = _Listing(
        [
            # An older serial built again later is the newer image.
            _published("ubuntu-20.04-20261127.1", "2026-11-27T09:00:00Z"),
            _published("ubuntu-20.04-20261126.5", "2026-11-27T10:00:00Z"),
            _published("ubuntu-22.04-20261101.1", "2026-11-01T09:00:00Z"),  # another image
        ]
    )
    retired = clouds.retired(listing, "ubuntu-20.04-20261126.5", keep=1)  # type: ignore[arg-type]
    assert [i.name for i in retired] == ["ubuntu-20.04-20261127.1"]
