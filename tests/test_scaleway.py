"""The Scaleway driver against a local fake of the Instance API v1 (tests/fakes/scaleway_api.py):
every verb's request shapes, the generic launch/publish/retention flow over it, HTTP faults,
a run killed between launch and destroy, and that the secret key never leaks."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import yaml

from imagefactory import clouds, scaleway
from imagefactory.cloudapi import CloudAPIError
from imagefactory.clouds import MANAGED, ROLE, VERDICT, CloudError
from imagefactory.definitions import ScalewaySettings
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS, CloudProvider
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog
from tests.fakes.cloud_server import Fault
from tests.fakes.scaleway_api import FakeScaleway

KEY = "5ec7e75e-c7e7-4a11-9b00-7e57c0ffee42"  # distinctive: grep-able wherever it might leak
PROJECT = "0d1e2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"
SETTINGS = ScalewaySettings(image="ubuntu_focal", zone="fr-par-1", commercial_type="DEV1-S")
ZONE = "/instance/v1/zones/fr-par-1"
TIMINGS = {"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}
CHECK_LABELS = MANAGED | {ROLE: "check-instance"}
CHECK_TAGS = ["imagefactory=true", "imagefactory-role=check-instance"]
PUBLISHED = MANAGED | {ROLE: "image", VERDICT: "published"}
PUBLISHED_TAGS = ["imagefactory=true", "imagefactory-role=image", "imagefactory-verdict=published"]
NAME = "ubuntu-20.04-20261126.1"
DESCRIPTION = (
    f"{NAME}: Ubuntu 20.04 for strongSwan, certified by imagefactory "
    "(sha256 0123456789abcdef, checks 0123456789ab)"
)
DESCRIPTION_TAG = (
    "imagefactory-description=Ubuntu 20.04 for strongSwan; certified by imagefactory "
    "(sha256 0123456789abcdef; checks 0123456789ab)"
)
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
def fake() -> Iterator[FakeScaleway]:
    cloud = FakeScaleway(token=KEY, project=PROJECT)
    cloud.start()
    yield cloud
    cloud.stop()
    assert cloud.handler_errors == []


@pytest.fixture
def sleeps() -> list[float]:
    return []  # what the client was told to sleep (retries), instead of sleeping


def env(fake: FakeScaleway, key: str = KEY) -> dict[str, str]:
    return {"SCW_SECRET_KEY": key, "SCW_DEFAULT_PROJECT_ID": PROJECT, "SCW_API_URL": fake.url}


def make_driver(fake: FakeScaleway, sleeps: list[float], key: str = KEY, **options):
    options = {"sleep": sleeps.append, "timeout": (1, 2), "backoff": 1.0} | options
    driver = scaleway.driver(SETTINGS, env(fake, key), **options)
    driver.poll_s = 0
    return driver


@pytest.fixture
def drv(fake: FakeScaleway, sleeps: list[float]) -> scaleway.ScalewayDriver:
    return make_driver(fake, sleeps)


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SSH into the fake: the instance is "ready" as soon as it has an address."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *a, **k: (TIMINGS, "running"))
    monkeypatch.setattr(clouds, "POLL_S", 0)


@pytest.fixture
def log() -> StepLog:
    return StepLog(out=io.StringIO())


def calls(fake: FakeScaleway) -> list[str]:
    """Method and path of every request, the zone prefix and ids replaced for reading."""
    return [f"{r.method} {UUID.sub('{id}', r.path.removeprefix(ZONE))}" for r in fake.requests]


def bodies(fake: FakeScaleway, method: str, path: str) -> list:
    return [r.body for r in fake.calls(method, f"{ZONE}{path}")]


def seed_published(fake: FakeScaleway, name: str) -> str:
    """An image an earlier run published: named and tagged."""
    return fake.seed_image(name, [*PUBLISHED_TAGS, "imagefactory-description=older"])


# --- configuration ------------------------------------------------------------------------


def test_key_and_project_come_from_the_environment_only() -> None:
    with pytest.raises(ConfigError) as missing:
        scaleway.driver(SETTINGS, {})
    assert str(missing.value) == (
        "Scaleway: set SCW_SECRET_KEY and SCW_DEFAULT_PROJECT_ID (the API secret key and the "
        "project id); they are read from the environment only"
    )
    with pytest.raises(ConfigError, match=r"set SCW_DEFAULT_PROJECT_ID \("):
        scaleway.driver(SETTINGS, {"SCW_SECRET_KEY": KEY})
    for broken in (f"{KEY}\r\nX: y", "SCWABCDEFGHIJKLMNOPQ", f"Bearer {KEY}"):
        with pytest.raises(ConfigError, match="SCW_SECRET_KEY is not a secret key") as refused:
            scaleway.driver(SETTINGS, {"SCW_SECRET_KEY": broken, "SCW_DEFAULT_PROJECT_ID": PROJECT})
        assert KEY not in str(refused.value)
    with pytest.raises(ConfigError, match="SCW_DEFAULT_PROJECT_ID is not a project id"):
        scaleway.driver(SETTINGS, {"SCW_SECRET_KEY": KEY, "SCW_DEFAULT_PROJECT_ID": "default"})

    driver = scaleway.driver(
        SETTINGS, {"SCW_SECRET_KEY": f"{KEY}\n", "SCW_DEFAULT_PROJECT_ID": PROJECT}
    )
    assert driver.client.base_url == "https://api.scaleway.com"
    assert driver.client.headers == {"X-Auth-Token": KEY}
    assert driver.project == PROJECT
    assert (driver.title, driver.login_user, driver.ssh_port) == ("Scaleway", "root", 22)
    assert KEY not in repr(driver)


def test_a_zone_that_is_not_one_is_refused() -> None:
    bad = ScalewaySettings(image="ubuntu_focal", zone="fr-par-1/../../iam")
    with pytest.raises(ConfigError, match="is not a zone"):
        scaleway.driver(bad, {"SCW_SECRET_KEY": KEY, "SCW_DEFAULT_PROJECT_ID": PROJECT})


def test_image_id_from_packers_artifact_id(drv) -> None:
    image = "cc586e45-5156-4f71-b223-cf406b10dd1d"
    assert drv.image_id(f"fr-par-1:{image}") == image  # Packer 1.6.6: "<zone>:<image id>"
    assert drv.image_id(f"par1:{image.upper()}") == image  # older builders: the region
    assert drv.image_id(image) == image
    with pytest.raises(ConfigError, match=r"is in zone nl-ams-1, but .* zone is fr-par-1"):
        drv.image_id(f"nl-ams-1:{image}")
    with pytest.raises(ConfigError, match="is not an image id"):
        drv.image_id("fr-par-1:ubuntu_focal")


# --- each verb ----------------------------------------------------------------------------


def test_create_server_sends_the_documented_requests(fake, drv) -> None:
    image = fake.seed_image()
    server_id = drv.create_server("check-1", image, "#cloud-config\n{}\n", CHECK_LABELS)
    assert calls(fake) == [
        "POST /servers",
        "PATCH /servers/{id}/user_data/cloud-init",
        "POST /servers/{id}/action",
    ]
    create, user_data, poweron = fake.requests
    assert create.body == {
        "name": "check-1",
        "commercial_type": "DEV1-S",
        "image": image,
        "project": PROJECT,
        "tags": CHECK_TAGS,
        "dynamic_ip_required": True,
    }
    assert (user_data.content_type, user_data.body) == ("text/plain", "#cloud-config\n{}\n")
    assert poweron.body == {"action": "poweron"}
    assert {r.path.split("/")[6] for r in (user_data, poweron)} == {server_id}
    assert fake.user_data[server_id] == {"cloud-init": "#cloud-config\n{}\n"}
    assert fake.servers[server_id]["state"] == "starting"
    assert {r.authorization for r in fake.requests} == {KEY}


def test_labels_that_cannot_be_tags(drv) -> None:
    for labels in ({"owner": "a,b"}, {"a=b": "c"}, {"owner": "x" * 200}):
        with pytest.raises(ConfigError, match="cannot be a tag"):
            drv.create_server("x", "1", "", labels)


def test_a_create_that_fails_half_way_removes_its_server(fake, drv) -> None:
    fake.faults.append(Fault(400, method="PATCH"))
    with pytest.raises(CloudAPIError, match=r"PATCH .*/user_data/cloud-init: HTTP 400"):
        drv.create_server("check-1", fake.seed_image(), "#cloud-config\n", CHECK_LABELS)
    # Never powered on, so "stopped": deleted, and the volume a delete leaves behind too.
    assert fake.servers == {} and fake.volumes == {}
    assert calls(fake)[-3:] == ["GET /servers/{id}", "DELETE /servers/{id}", "DELETE /volumes/{id}"]


def test_server_address_once_running(fake, drv) -> None:
    fake.polls_until_running = 2
    server_id = drv.create_server("s", fake.seed_image(), "", CHECK_LABELS)
    assert [drv.server_address(server_id) for _ in range(3)] == [None, None, "127.0.0.1"]


def test_server_address_from_public_ips_and_a_locked_server(fake, drv) -> None:
    server_id = fake.seed_server("s", CHECK_TAGS)
    server = fake.servers[server_id]
    v6 = {"address": "2001:bc8::1", "family": "inet6"}
    server.update(public_ip=None, public_ips=[v6, dict(server["public_ip"])])
    assert drv.server_address(server_id) == "127.0.0.1"
    server.update(state="locked", state_detail="abuse")
    with pytest.raises(CloudError, match=f"server {server_id} is locked \\(abuse\\)"):
        drv.server_address(server_id)


def test_delete_server_terminates_a_running_one_and_a_missing_one_is_fine(fake, drv) -> None:
    server_id = fake.seed_server("s", CHECK_TAGS)
    drv.delete_server(server_id)
    assert fake.servers == {} and fake.volumes == {}
    assert bodies(fake, "POST", f"/servers/{server_id}/action") == [{"action": "terminate"}]
    drv.delete_server(server_id)  # gone: one GET, no action
    assert calls(fake) == ["GET /servers/{id}", "POST /servers/{id}/action", "GET /servers/{id}"]


def test_delete_server_waits_for_a_starting_one(fake, drv) -> None:
    fake.polls_until_running = 3
    server_id = drv.create_server("s", fake.seed_image(), "", CHECK_LABELS)
    drv.delete_server(server_id)
    assert fake.servers == {}
    assert calls(fake)[3:] == ["GET /servers/{id}"] * 4 + ["POST /servers/{id}/action"]


def test_delete_server_gives_up_on_one_that_never_settles(fake, drv) -> None:
    fake.polls_until_running = 10**6
    server_id = drv.create_server("s", fake.seed_image(), "", CHECK_LABELS)
    drv.delete_timeout_s = -1
    with pytest.raises(CloudError, match=f"cannot delete server {server_id} while it is starting"):
        drv.delete_server(server_id)


def test_servers_labelled_filters_by_tags_and_project_and_follows_pages(fake, drv) -> None:
    mine = {fake.seed_server(f"check-{n}", CHECK_TAGS) for n in range(120)}
    fake.seed_server("someone-elses", ["team=web"])
    fake.seed_server("our-image-vm", ["imagefactory=true", "imagefactory-role=image"])
    assert set(drv.servers_labelled(CHECK_LABELS)) == mine
    pages = fake.calls("GET", f"{ZONE}/servers")
    query = {"project": [PROJECT], "tags": [",".join(CHECK_TAGS)], "per_page": ["100"]}
    assert [r.query for r in pages] == [query, query | {"page": ["2"]}]


def test_servers_labelled_filters_itself_when_the_api_does_not(fake, drv) -> None:
    fake.filters_tags = False
    mine = fake.seed_server("check", CHECK_TAGS)
    fake.seed_server("someone-elses", ["team=web"])
    fake.seed_server("half", ["imagefactory=true"])
    assert drv.servers_labelled(CHECK_LABELS) == [mine]


@pytest.mark.parametrize("header", ["x-total-count", None])
def test_pages_end_by_the_total_in_any_case_or_by_a_short_page(fake, drv, header) -> None:
    fake.total_count_header = header
    for n in range(200):  # exactly two full pages
        fake.seed_server(f"check-{n}", CHECK_TAGS)
    assert len(drv.servers_labelled(CHECK_LABELS)) == 200
    # With the total, two requests; counting items, a third page comes back empty.
    assert len(fake.calls("GET", f"{ZONE}/servers")) == (2 if header else 3)


def test_label_image_replaces_its_keys_and_keeps_other_tags(fake, drv) -> None:
    image = fake.seed_image(tags=["owner=vpn-team", "imagefactory-verdict=certified", "golden"])
    drv.label_image(image, MANAGED | {VERDICT: "rejected"})
    assert bodies(fake, "PATCH", f"/images/{image}") == [
        {"tags": ["owner=vpn-team", "golden", "imagefactory=true", "imagefactory-verdict=rejected"]}
    ]


def test_publish_image_names_it_and_tags_a_short_description(fake, drv) -> None:
    image = fake.seed_image("packer-6745c1a2", ["owner=vpn-team"])
    assert drv.publish_image(image, NAME, DESCRIPTION) == [f"fr-par-1 image {image}"]
    assert bodies(fake, "PATCH", f"/images/{image}") == [
        {"name": NAME, "tags": ["owner=vpn-team", DESCRIPTION_TAG]}
    ]
    assert fake.images[image]["public"] is False  # published = named, tagged and kept


def test_publish_leaves_out_a_description_no_tag_can_carry(fake, drv) -> None:
    image = fake.seed_image(tags=["imagefactory-description=older"])
    drv.publish_image(image, NAME, f"{NAME}: " + "very long " * 20)
    assert fake.images[image]["tags"] == ["imagefactory-description=older"]
    drv.publish_image(image, NAME, NAME)  # the name alone says nothing more
    assert fake.images[image]["tags"] == ["imagefactory-description=older"]
    assert fake.images[image]["name"] == NAME


def test_images_labelled_lists_this_projects_images(fake, drv) -> None:
    named = seed_published(fake, NAME)
    fake.seed_image("someone-elses", PUBLISHED_TAGS, project="11111111-1111-4111-8111-111111111111")
    fake.seed_image("certified, not published", ["imagefactory=true", "imagefactory-role=image"])
    [found] = drv.images_labelled(PUBLISHED)
    assert (found.id, found.name) == (named, NAME)
    assert found.created == fake.images[named]["creation_date"]
    assert found.labels == PUBLISHED | {"imagefactory-description": "older"}
    [listing] = fake.calls("GET", f"{ZONE}/images")
    assert listing.query == {
        "project": [PROJECT],
        "tags": [",".join(PUBLISHED_TAGS)],
        "per_page": ["100"],
    }


def test_images_labelled_follows_pages(fake, drv) -> None:
    for n in range(250):
        seed_published(fake, f"ubuntu-20.04-20261126.{n}")
    assert len(drv.images_labelled(PUBLISHED)) == 250
    assert len(fake.calls("GET", f"{ZONE}/images")) == 3


def test_delete_image_then_its_snapshot_and_a_missing_one_is_fine(fake, drv) -> None:
    image = seed_published(fake, NAME)
    snapshot = fake.images[image]["root_volume"]["id"]
    drv.delete_image(image)
    assert fake.images == {} and fake.snapshots == {}
    assert calls(fake) == ["GET /images/{id}", "DELETE /images/{id}", "DELETE /snapshots/{id}"]
    assert fake.requests[-1].path.endswith(snapshot)
    drv.delete_image(image)  # gone already: one GET, no DELETE
    assert len(fake.calls("DELETE")) == 2


# --- the generic flow over this driver ------------------------------------------------------


def test_full_flow_launch_check_destroy_publish(fake, drv, boot, log, tmp_path) -> None:
    image = fake.seed_image(NAME)  # Packer's image_name is <image>-<serial> already
    with clouds.launched(drv, drv.image_id(f"fr-par-1:{image}"), tmp_path / "work", log) as vm:
        [server] = fake.servers.values()
        assert server["tags"] == CHECK_TAGS
        assert server["image"]["id"] == image
        user_data = fake.user_data[server["id"]]["cloud-init"]
        assert user_data.startswith("#cloud-config\n")
        public_key = (tmp_path / "work/ssh/id_ed25519.pub").read_text().strip()
        assert yaml.safe_load(user_data)["ssh_authorized_keys"] == [public_key]
        assert vm.allowed_keys == [public_key]
        assert (vm.target.user, vm.target.host, vm.target.port) == ("root", "127.0.0.1", 22)
        assert vm.timings == TIMINGS
    assert fake.servers == {} and fake.volumes == {}
    assert len(fake.calls("POST", f"{ZONE}/servers/")) == 2  # poweron, terminate

    clouds.record_verdict(drv, image, "certified")
    assert fake.images[image]["tags"] == [
        "imagefactory=true",
        "imagefactory-role=image",
        "imagefactory-verdict=certified",
    ]
    assert clouds.publish(drv, image, NAME, DESCRIPTION, 2, log) == [f"fr-par-1 image {image}"]
    published = fake.images[image]
    assert published["name"] == NAME
    assert sorted(published["tags"]) == sorted([*PUBLISHED_TAGS, DESCRIPTION_TAG])
    assert drv.images_labelled(PUBLISHED)[0].id == image


@pytest.mark.parametrize("interruption", [RuntimeError("check crashed"), KeyboardInterrupt()])
def test_launched_destroys_the_server_when_the_body_raises(
    fake, drv, boot, log, tmp_path, interruption
) -> None:
    with (
        pytest.raises(type(interruption)),
        clouds.launched(drv, fake.seed_image(), tmp_path / "work", log),
    ):
        assert len(fake.servers) == 1
        raise interruption
    assert fake.servers == {} and fake.volumes == {}
    assert "destroy imagefactory-check-" in log.out.getvalue()


def test_launched_destroys_a_server_whose_boot_fails(fake, drv, boot, log, tmp_path, monkeypatch):
    fake.boot_fails = True  # back to "stopped": no terminate, a delete and its volume
    monkeypatch.setattr(clouds, "LAUNCH_TIMEOUT_S", -1)
    with (
        pytest.raises(CloudError, match="not running after"),
        clouds.launched(drv, fake.seed_image(), tmp_path / "work", log),
    ):
        pass
    assert fake.servers == {} and fake.volumes == {}


def test_retention_keeps_the_newest_of_the_family_and_removes_snapshots(fake, drv, log) -> None:
    old = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(3)]
    other_family = [seed_published(fake, f"ubuntu-22.04-2026112{n}.1") for n in range(3)]
    certified = fake.seed_image("ubuntu-20.04-20261129.1", PUBLISHED_TAGS[:2])
    new = fake.seed_image("ubuntu-20.04-20261130.1")
    clouds.record_verdict(drv, new, "certified")
    clouds.publish(drv, new, "ubuntu-20.04-20261130.1", "ubuntu-20.04-20261130.1: new", 2, log)

    assert set(fake.images) == {old[2], new, certified, *other_family}
    used = {i["root_volume"]["id"] for i in fake.images.values()}
    assert set(fake.snapshots) == used  # the two retired images' snapshots went with them
    assert "retention (keep 2): deleting ubuntu-20.04-20261120.1" in log.out.getvalue()


def test_a_rejected_verdict_labels_the_image_and_it_is_never_published(fake, drv) -> None:
    image = fake.seed_image("packer-rejected")
    clouds.record_verdict(drv, image, "rejected")
    assert fake.images[image]["tags"] == [
        "imagefactory=true",
        "imagefactory-role=image",
        "imagefactory-verdict=rejected",
    ]
    assert fake.images[image]["name"] == "packer-rejected"
    assert drv.images_labelled(PUBLISHED) == []
    assert clouds.retired(drv, NAME, 0) == []


def test_the_scaleway_provider_builds_this_driver_from_the_environment(fake, monkeypatch):
    for name, value in env(fake).items():
        monkeypatch.setenv(name, value)
    provider = PROVIDERS["scaleway"]
    assert isinstance(provider, CloudProvider) and provider.driver_module == "scaleway"
    driver = provider.driver(SimpleNamespace(provider=lambda name: SETTINGS))
    assert isinstance(driver, scaleway.ScalewayDriver)
    assert driver.servers_labelled(CHECK_LABELS) == []


# --- HTTP faults ---------------------------------------------------------------------------


def test_429_honours_retry_after(fake, drv, sleeps) -> None:
    server_id = fake.seed_server("s", CHECK_TAGS)
    fake.faults.append(Fault(429, retry_after="7"))
    assert drv.server_address(server_id) == "127.0.0.1"
    assert sleeps == [7.0]
    assert drv.stats.retries == 1


def test_429_on_create_is_retried_without_a_second_server(fake, drv, sleeps) -> None:
    fake.faults.append(Fault(429, method="POST"))
    drv.create_server("check-1", fake.seed_image(), "", CHECK_LABELS)
    assert len(fake.servers) == 1 and sleeps == [1.0]


def test_5xx_on_get_and_patch_is_retried_then_succeeds(fake, drv, sleeps) -> None:
    image = fake.seed_image()
    fake.faults += [Fault(503, method="GET"), Fault(502, method="PATCH")]
    drv.label_image(image, MANAGED)
    assert fake.images[image]["tags"] == ["imagefactory=true"]
    assert sleeps == [1.0, 1.0]
    assert calls(fake) == ["GET /images/{id}"] * 2 + ["PATCH /images/{id}"] * 2


def test_5xx_on_create_is_not_repeated(fake, drv, sleeps) -> None:
    fake.faults.append(Fault(503, method="POST"))
    with pytest.raises(CloudAPIError, match="HTTP 503: injected HTTP 503"):
        drv.create_server("check-1", fake.seed_image(), "", CHECK_LABELS)
    assert len(fake.calls("POST")) == 1 and sleeps == []


def test_a_timeout_is_one_line_and_a_create_is_not_repeated(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.3))
    fake.faults.append(Fault(delay=0.6, method="POST"))
    with pytest.raises(CloudAPIError) as timeout:
        drv.create_server("check-1", fake.seed_image(), "", CHECK_LABELS)
    assert str(timeout.value) == f"Scaleway API: POST {ZONE}/servers: ReadTimeout"
    assert len(fake.calls("POST")) == 1


def test_a_timeout_on_get_is_retried_and_then_gives_up(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.2), retries=1)
    server_id = fake.seed_server("s", CHECK_TAGS)
    fake.faults.append(Fault(delay=0.4, method="GET"))
    assert drv.server_address(server_id) == "127.0.0.1"  # the second attempt answered
    fake.faults += [Fault(delay=0.4, method="GET"), Fault(delay=0.4, method="GET")]
    with pytest.raises(CloudAPIError) as timeout:
        drv.server_address(server_id)
    assert str(timeout.value) == f"Scaleway API: GET {ZONE}/servers/{server_id}: ReadTimeout"


def test_401_with_a_wrong_key_does_not_show_it(fake, sleeps) -> None:
    wrong = "0badc0de-dead-4bee-8f00-123456789abc"
    with pytest.raises(CloudAPIError) as refused:
        make_driver(fake, sleeps, key=wrong).servers_labelled(CHECK_LABELS)
    assert refused.value.status == 401
    assert str(refused.value) == (
        f"Scaleway API: GET {ZONE}/servers: HTTP 401: authentication is denied"
    )
    assert wrong not in str(refused.value) and KEY not in str(refused.value)


def test_scaleways_error_message_is_surfaced(fake, drv) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(CloudAPIError, match="HTTP 404: resource is not found") as gone:
        drv.create_server("check-1", missing, "", CHECK_LABELS)
    assert gone.value.status == 404
    image = seed_published(fake, NAME)
    snapshot = fake.images[image]["root_volume"]["id"]
    with pytest.raises(CloudAPIError, match="HTTP 400: snapshot is used by an image"):
        drv.client.request("DELETE", f"{ZONE}/snapshots/{snapshot}")


# --- a run killed between launch and destroy ------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import clouds, scaleway
from imagefactory.definitions import ScalewaySettings
from imagefactory.steps import StepLog

clouds.POLL_S = 0
clouds.wait_until_ready = lambda *args, **kwargs: ({}, "running")  # no SSH into a fake
driver = scaleway.driver(ScalewaySettings(image="ubuntu_focal"))
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_a_server_the_next_sweep_removes(fake, drv, log, tmp_path) -> None:
    args = [sys.executable, "-c", CHILD, fake.seed_image(), str(tmp_path / "work")]
    child = subprocess.Popen(args, cwd=REPO_ROOT, env=os.environ | env(fake),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline() == "launched\n"
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert KEY not in stderr
    [left] = fake.servers
    assert fake.servers[left]["tags"] == CHECK_TAGS  # the kill skipped the destroy

    assert clouds.sweep(drv, log) == [left]
    assert fake.servers == {} and fake.volumes == {}
    assert f"destroying check instance {left} left by an earlier run" in log.out.getvalue()
    assert clouds.sweep(drv, log) == []


# --- the key appears nowhere -----------------------------------------------------------------


def test_the_key_appears_nowhere(fake, sleeps, boot, log, tmp_path, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    drv = make_driver(fake, sleeps)
    seed_published(fake, "ubuntu-20.04-20261101.1")
    messages = [str(exc) for exc in _flow_and_failures(fake, drv, sleeps, log, tmp_path)]
    out, err = capfd.readouterr()
    texts = [out, err, log.out.getvalue(), caplog.text, repr(drv), repr(drv.client), *messages]
    assert len(messages) == 5
    assert all(KEY not in text for text in texts)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files  # the check key pair, at least
    assert all(KEY.encode() not in p.read_bytes() for p in files)
    assert {r.authorization for r in fake.requests} == {KEY}  # it was used


def _flow_and_failures(fake, drv, sleeps, log, tmp_path) -> Iterator[Exception]:
    """The full flow, then the errors a user would see, with the real key configured."""
    image = fake.seed_image()
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.publish(drv, image, NAME, DESCRIPTION, 1, log)
    failing = [
        lambda: drv.create_server("x", "00000000-0000-4000-8000-000000000000", "", CHECK_LABELS),
        lambda: _failing_listing(fake, make_driver(fake, sleeps, retries=0)),
        lambda: drv.client.request("POST", f"{ZONE}/servers", data="{", content_type="x/y"),
        lambda: scaleway.driver(SETTINGS, env(fake, f"{KEY} extra")),
        lambda: scaleway.driver(SETTINGS, {"SCW_SECRET_KEY": KEY}),
    ]
    for call in failing:
        try:
            call()
        except Exception as exc:
            yield exc


def _failing_listing(fake: FakeScaleway, drv: scaleway.ScalewayDriver) -> None:
    fake.faults.append(Fault(500))
    drv.servers_labelled(CHECK_LABELS)


# --- measure -------------------------------------------------------------------------------


@pytest.mark.parametrize("older", [0, 3])
def test_measure_the_full_flow(fake, drv, boot, log, tmp_path, older) -> None:
    """API calls and wall time of launch → destroy → verdict → publish (+ retention)."""
    for n in range(older):
        seed_published(fake, f"ubuntu-20.04-2026110{n}.1")
    image = fake.seed_image()
    started = time.monotonic()
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.record_verdict(drv, image, "certified")
    clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    elapsed = time.monotonic() - started
    stats = drv.stats
    by_call = Counter(calls(fake))  # the client's own keys keep the UUIDs apart
    print(
        f"\nscaleway full flow ({older} older published, keep 2): {stats.calls} calls, "
        f"{elapsed:.3f} s wall, {stats.seconds:.3f} s in HTTP\n"
        + json.dumps(dict(sorted(by_call.items())), indent=1)
    )
    assert stats.retries == 0
    assert stats.calls == len(fake.requests)
    assert len(fake.images) == min(older + 1, 2)
    assert len(fake.snapshots) == len(fake.images)
