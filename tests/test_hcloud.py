"""The Hetzner Cloud driver against a local fake of the API (tests/fakes/hcloud_api.py):
every verb's request shapes, the generic launch/publish/retention flow over it, HTTP faults,
a run killed between launch and destroy, and that the token never leaks."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import yaml

from imagefactory import clouds, hcloud
from imagefactory.cloudapi import CloudAPIError
from imagefactory.clouds import MANAGED, ROLE, VERDICT, CloudError
from imagefactory.definitions import HetznerSettings
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog
from tests.fakes.cloud_server import Fault
from tests.fakes.hcloud_api import FakeHetzner

TOKEN = "hcloud-TEST-token-7Kq2Zx9VwPlM4nR8"  # distinctive: grep-able wherever it might leak
SETTINGS = HetznerSettings(image="ubuntu-20.04", location="nbg1", server_type="cx23")
TIMINGS = {"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}
CHECK_LABELS = MANAGED | {ROLE: "check-instance"}
PUBLISHED = MANAGED | {ROLE: "image", VERDICT: "published"}
NAME = "ubuntu-20.04-20261126.1"
DESCRIPTION = f"{NAME}: Ubuntu 20.04 for strongSwan, certified by imagefactory"


@pytest.fixture
def fake() -> Iterator[FakeHetzner]:
    cloud = FakeHetzner(token=TOKEN)
    cloud.start()
    yield cloud
    cloud.stop()
    assert cloud.handler_errors == []


@pytest.fixture
def sleeps() -> list[float]:
    return []  # what the client was told to sleep (retries), instead of sleeping


def make_driver(fake: FakeHetzner, sleeps: list[float], token: str = TOKEN, **options):
    env = {"HCLOUD_TOKEN": token, "HCLOUD_ENDPOINT": fake.endpoint}
    options = {"sleep": sleeps.append, "timeout": (1, 2), "backoff": 1.0} | options
    driver = hcloud.driver(SETTINGS, env, **options)
    driver.poll_s = 0
    return driver


@pytest.fixture
def drv(fake: FakeHetzner, sleeps: list[float]) -> hcloud.HetznerDriver:
    return make_driver(fake, sleeps)


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SSH into the fake: the instance is "ready" as soon as it has an address."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *a, **k: (TIMINGS, "running"))
    monkeypatch.setattr(clouds, "POLL_S", 0)


@pytest.fixture
def log() -> StepLog:
    return StepLog(out=io.StringIO())


def bodies(fake: FakeHetzner, method: str, prefix: str) -> list:
    return [r.body for r in fake.calls(method, f"/v1{prefix}")]


def seed_published(fake: FakeHetzner, name: str) -> str:
    """A snapshot an earlier run published: labelled, described, delete-protected."""
    labels = PUBLISHED | {hcloud.NAME_LABEL: name}
    return fake.seed_snapshot(f"{name}: older", labels, protected=True)


# --- configuration ------------------------------------------------------------------------


def test_driver_reads_token_and_endpoint_from_the_environment_only() -> None:
    with pytest.raises(ConfigError) as missing:
        hcloud.driver(SETTINGS, {})
    assert str(missing.value) == (
        "Hetzner Cloud: set HCLOUD_TOKEN (the API token); it is read from the environment only"
    )
    with pytest.raises(ConfigError) as broken:
        hcloud.driver(SETTINGS, {"HCLOUD_TOKEN": f"{TOKEN}\r\nX: y"})
    assert TOKEN not in str(broken.value)

    driver = hcloud.driver(SETTINGS, {"HCLOUD_TOKEN": f"{TOKEN}\n"})  # a file's newline
    assert driver.client.base_url == "https://api.hetzner.cloud/v1"
    assert driver.client.headers == {"Authorization": f"Bearer {TOKEN}"}
    assert (driver.title, driver.login_user, driver.ssh_port) == ("Hetzner Cloud", "root", 22)
    assert driver.image_id("123456") == "123456"
    assert TOKEN not in repr(driver)


# --- each verb ----------------------------------------------------------------------------


def test_create_server_sends_the_documented_fields(fake, drv) -> None:
    image = fake.seed_snapshot()
    server_id = drv.create_server("check-1", image, "#cloud-config\n{}\n", CHECK_LABELS)
    assert bodies(fake, "POST", "/servers") == [
        {
            "name": "check-1",
            "server_type": "cx23",
            "image": image,
            "location": "nbg1",
            "user_data": "#cloud-config\n{}\n",
            "labels": CHECK_LABELS,
            "start_after_create": True,
            "public_net": {"enable_ipv4": True, "enable_ipv6": False},
        }
    ]
    assert fake.servers[int(server_id)]["labels"] == CHECK_LABELS
    assert {r.authorization for r in fake.requests} == {f"Bearer {TOKEN}"}


def test_server_address_once_running(fake, drv) -> None:
    fake.polls_until_running = 2
    server_id = fake.seed_server("s", CHECK_LABELS)
    assert [drv.server_address(server_id) for _ in range(3)] == [None, None, "127.0.0.1"]


def test_delete_server_and_a_missing_one_is_fine(fake, drv) -> None:
    server_id = fake.seed_server("s", CHECK_LABELS)
    drv.delete_server(server_id)
    drv.delete_server(server_id)
    assert fake.servers == {}
    assert len(fake.calls("DELETE", f"/v1/servers/{server_id}")) == 2


def test_servers_labelled_selects_and_follows_pages(fake, drv) -> None:
    mine = {fake.seed_server(f"check-{n}", CHECK_LABELS) for n in range(60)}
    fake.seed_server("someone-elses", {"team": "web"})
    fake.seed_server("our-image-vm", MANAGED | {ROLE: "image"})
    assert set(drv.servers_labelled(CHECK_LABELS)) == mine
    pages = fake.calls("GET", "/v1/servers")
    assert [r.query for r in pages] == [
        {"label_selector": ["imagefactory=true,imagefactory-role=check-instance"],
         "per_page": ["50"]} | ({"page": ["2"]} if n else {})
        for n in range(2)
    ]  # fmt: skip


def test_label_image_merges_into_the_labels_it_has(fake, drv) -> None:
    image = fake.seed_snapshot(labels={"owner": "vpn-team", VERDICT: "certified"})
    drv.label_image(image, MANAGED | {VERDICT: "rejected"})
    assert bodies(fake, "PUT", f"/images/{image}") == [
        {"labels": {"owner": "vpn-team", VERDICT: "rejected", "imagefactory": "true"}}
    ]
    assert fake.image(image)["labels"]["owner"] == "vpn-team"


def test_publish_image_describes_labels_and_protects(fake, drv) -> None:
    fake.polls_until_done = 3
    image = fake.seed_snapshot(labels={"owner": "vpn-team"})
    where = drv.publish_image(image, NAME, DESCRIPTION)
    assert where == [f"snapshot {image} (delete-protected)"]
    assert bodies(fake, "PUT", f"/images/{image}") == [
        {"description": DESCRIPTION, "labels": {"owner": "vpn-team", "imagefactory-name": NAME}}
    ]
    assert bodies(fake, "POST", f"/images/{image}/actions") == [{"delete": True}]
    assert len(fake.calls("GET", "/v1/actions/")) == 4  # running x3, then success
    assert fake.image(image)["protection"] == {"delete": True}


def test_publish_puts_the_name_first_in_the_description(fake, drv) -> None:
    image = fake.seed_snapshot()
    drv.publish_image(image, NAME, "certified by imagefactory")
    assert fake.image(image)["description"] == f"{NAME}: certified by imagefactory"


def test_a_failed_or_stuck_protection_action_is_an_error(fake, drv) -> None:
    image = fake.seed_snapshot()
    fake.failing_commands.add("change_protection")
    with pytest.raises(CloudError, match=r"change_protection on image \d+ failed: Action failed"):
        drv.publish_image(image, NAME, DESCRIPTION)
    fake.failing_commands.clear()
    fake.polls_until_done = 10**6
    drv.action_timeout_s = -1
    with pytest.raises(CloudError, match="still running after"):
        drv.publish_image(image, NAME, DESCRIPTION)


def test_images_labelled_lists_snapshots_only_by_name_label_or_description(fake, drv) -> None:
    named = seed_published(fake, NAME)
    described = fake.seed_snapshot("described only", PUBLISHED)
    fake.seed_snapshot("a backup", PUBLISHED, image_type="backup")
    fake.seed_snapshot("certified, not published", MANAGED | {VERDICT: "certified"})
    found = {i.id: i for i in drv.images_labelled(PUBLISHED)}
    assert set(found) == {named, described}
    assert found[named].name == NAME
    assert found[named].created == fake.image(named)["created"]
    assert found[named].labels == PUBLISHED | {hcloud.NAME_LABEL: NAME}
    assert found[described].name == "described only"
    [listing] = fake.calls("GET", "/v1/images")
    assert listing.query["type"] == ["snapshot"]


def test_images_labelled_follows_pages(fake, drv) -> None:
    for n in range(120):
        seed_published(fake, f"ubuntu-20.04-20261126.{n}")
    assert len(drv.images_labelled(PUBLISHED)) == 120
    assert len(fake.calls("GET", "/v1/images")) == 3


def test_delete_image_unprotects_first_and_a_missing_one_is_fine(fake, drv) -> None:
    image = seed_published(fake, NAME)
    drv.delete_image(image)
    assert int(image) not in fake.images
    order = [(r.method, r.path.rsplit("/", 2)[-2:]) for r in fake.requests]
    assert order[0] == ("POST", ["actions", "change_protection"])
    assert order[-1] == ("DELETE", ["images", image])
    assert bodies(fake, "POST", f"/images/{image}/actions") == [{"delete": False}]
    drv.delete_image(image)  # gone already: no error, no DELETE
    assert len(fake.calls("DELETE")) == 1


# --- the generic flow over this driver ------------------------------------------------------


def test_full_flow_launch_check_destroy_publish(fake, drv, boot, log, tmp_path) -> None:
    image = fake.seed_snapshot("packer-6745c1a2")
    with clouds.launched(drv, drv.image_id(image), tmp_path / "work", log) as instance:
        [server] = fake.servers.values()
        assert server["labels"] == CHECK_LABELS
        assert server["image"] == {"id": image}
        user_data = fake.user_data[server["id"]]
        assert user_data.startswith("#cloud-config\n")
        public_key = (tmp_path / "work/ssh/id_ed25519.pub").read_text().strip()
        assert yaml.safe_load(user_data)["ssh_authorized_keys"] == [public_key]
        assert instance.allowed_keys == [public_key]
        assert (instance.target.user, instance.target.host) == ("root", "127.0.0.1")
        assert instance.target.port == 22
        assert instance.timings == TIMINGS
    assert fake.servers == {}
    assert len(fake.calls("DELETE", "/v1/servers/")) == 1

    clouds.record_verdict(drv, image, "certified")
    assert fake.image(image)["labels"] == MANAGED | {ROLE: "image", VERDICT: "certified"}
    where = clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    assert where == [f"snapshot {image} (delete-protected)"]
    published = fake.image(image)
    assert published["labels"] == PUBLISHED | {hcloud.NAME_LABEL: NAME}
    assert published["description"] == DESCRIPTION
    assert published["protection"] == {"delete": True}


@pytest.mark.parametrize("interruption", [RuntimeError("check crashed"), KeyboardInterrupt()])
def test_launched_destroys_the_server_when_the_body_raises(
    fake, drv, boot, log, tmp_path, interruption
) -> None:
    image = fake.seed_snapshot()
    with (
        pytest.raises(type(interruption)),
        clouds.launched(drv, image, tmp_path / "work", log),
    ):
        assert len(fake.servers) == 1
        raise interruption
    assert fake.servers == {}
    assert "destroy imagefactory-check-" in log.out.getvalue()


def test_launched_destroys_a_server_that_never_runs(fake, drv, boot, log, tmp_path, monkeypatch):
    fake.polls_until_running = 10**6
    monkeypatch.setattr(clouds, "LAUNCH_TIMEOUT_S", -1)
    with (
        pytest.raises(CloudError, match="not running after"),
        clouds.launched(drv, fake.seed_snapshot(), tmp_path / "work", log),
    ):
        pass
    assert fake.servers == {}


def test_retention_keeps_the_newest_of_the_family_and_unprotects_first(fake, drv, log) -> None:
    old = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(3)]
    other_family = [seed_published(fake, f"ubuntu-22.04-2026112{n}.1") for n in range(3)]
    unpublished = fake.seed_snapshot("certified", MANAGED | {ROLE: "image", VERDICT: "certified"})
    new = fake.seed_snapshot("packer-new")
    clouds.record_verdict(drv, new, "certified")
    clouds.publish(drv, new, "ubuntu-20.04-20261130.1", "ubuntu-20.04-20261130.1: new", 2, log)

    assert set(map(str, fake.images)) == {old[2], new, unpublished, *other_family}
    for gone in old[:2]:
        unprotect = fake.calls("POST", f"/v1/images/{gone}/actions/change_protection")
        delete = fake.calls("DELETE", f"/v1/images/{gone}")
        assert [r.body for r in unprotect] == [{"delete": False}] and len(delete) == 1
        assert fake.requests.index(unprotect[0]) < fake.requests.index(delete[0])
    assert all(fake.image(i)["protection"] == {"delete": True} for i in other_family)
    assert "retention (keep 2): deleting ubuntu-20.04-20261120.1" in log.out.getvalue()


def test_a_rejected_verdict_labels_the_snapshot_and_it_is_never_published(fake, drv) -> None:
    image = fake.seed_snapshot("packer-rejected")
    clouds.record_verdict(drv, image, "rejected")
    assert fake.image(image)["labels"] == MANAGED | {ROLE: "image", VERDICT: "rejected"}
    assert fake.image(image)["protection"] == {"delete": False}
    assert fake.calls("POST", "/v1/images/") == []
    assert drv.images_labelled(PUBLISHED) == []
    assert clouds.retired(drv, NAME, 0) == []


def test_the_hcloud_provider_builds_this_driver_from_the_environment(fake, monkeypatch) -> None:
    monkeypatch.setenv("HCLOUD_TOKEN", TOKEN)
    monkeypatch.setenv("HCLOUD_ENDPOINT", fake.endpoint)
    driver = PROVIDERS["hcloud"].driver(SimpleNamespace(provider=lambda name: SETTINGS))
    assert isinstance(driver, hcloud.HetznerDriver)
    assert driver.servers_labelled(CHECK_LABELS) == []


def test_recertified_published_snapshot_stays_published(fake, monkeypatch) -> None:
    monkeypatch.setenv("HCLOUD_TOKEN", TOKEN)
    monkeypatch.setenv("HCLOUD_ENDPOINT", fake.endpoint)
    image = seed_published(fake, NAME)
    definition = SimpleNamespace(provider=lambda name: SETTINGS)
    record = SimpleNamespace(artifact=image, state="published")
    PROVIDERS["hcloud"].record_verdict(record, definition, StepLog(io.StringIO()))
    assert fake.image(image)["labels"][VERDICT] == "published"


# --- HTTP faults ---------------------------------------------------------------------------


def test_429_honours_retry_after(fake, drv, sleeps) -> None:
    server_id = fake.seed_server("s", CHECK_LABELS)
    fake.faults.append(Fault(429, retry_after="7"))
    drv.server_address(server_id)
    assert sleeps == [7.0]
    assert drv.stats.retries == 1


def test_429_without_retry_after_backs_off(fake, drv, sleeps) -> None:
    # Hetzner announces RateLimit-Reset rather than Retry-After: the client's backoff applies.
    fake.faults += [Fault(429), Fault(429)]
    assert drv.servers_labelled(CHECK_LABELS) == []
    assert sleeps == [1.0, 2.0]


def test_5xx_on_get_is_retried_then_succeeds(fake, drv, sleeps) -> None:
    image = fake.seed_snapshot()
    fake.faults += [Fault(503, method="GET"), Fault(502, method="GET")]
    drv.label_image(image, MANAGED)
    assert fake.image(image)["labels"] == MANAGED
    assert sleeps == [1.0, 2.0]
    assert drv.stats.by_call["GET /images/{id}"] == 3


def test_5xx_on_create_is_not_repeated(fake, drv, sleeps) -> None:
    fake.faults.append(Fault(503, method="POST"))
    with pytest.raises(CloudAPIError, match="HTTP 503: injected HTTP 503"):
        drv.create_server("check-1", fake.seed_snapshot(), "", CHECK_LABELS)
    assert len(fake.calls("POST")) == 1 and sleeps == []


def test_a_timeout_is_one_line_and_a_create_is_not_repeated(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.5))
    fake.faults.append(Fault(delay=1.0, method="POST"))
    with pytest.raises(CloudAPIError) as timeout:
        drv.create_server("check-1", fake.seed_snapshot(), "", CHECK_LABELS)
    assert str(timeout.value) == "Hetzner Cloud API: POST /servers: ReadTimeout"
    assert len(fake.calls("POST")) == 1


def test_a_timeout_on_get_is_retried_and_then_gives_up(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.2), retries=1)
    server_id = fake.seed_server("s", CHECK_LABELS)
    fake.faults.append(Fault(delay=0.5, method="GET"))
    assert drv.server_address(server_id) is None  # the second attempt answered
    fake.faults += [Fault(delay=0.5, method="GET"), Fault(delay=0.5, method="GET")]
    with pytest.raises(CloudAPIError) as timeout:
        drv.server_address(server_id)
    assert str(timeout.value) == f"Hetzner Cloud API: GET /servers/{server_id}: ReadTimeout"


def test_401_with_a_wrong_token_does_not_show_it(fake, sleeps) -> None:
    wrong = "hcloud-WRONG-token-Qm3Jd8Rt5Ys1"
    with pytest.raises(CloudAPIError) as refused:
        make_driver(fake, sleeps, token=wrong).servers_labelled(CHECK_LABELS)
    assert refused.value.status == 401
    assert str(refused.value) == (
        "Hetzner Cloud API: GET /servers: HTTP 401: Unable to authenticate"
    )
    assert wrong not in str(refused.value) and TOKEN not in str(refused.value)


def test_hetzners_error_message_is_surfaced(fake, drv) -> None:
    with pytest.raises(CloudAPIError, match="HTTP 400: invalid input in field 'image'"):
        drv.create_server("check-1", "999999", "", CHECK_LABELS)
    image = seed_published(fake, NAME)
    with pytest.raises(CloudAPIError, match="HTTP 423: image is delete-protected") as locked:
        drv.client.request("DELETE", f"/images/{image}")
    assert locked.value.status == 423
    with pytest.raises(CloudAPIError, match="HTTP 404: image with ID '1' not found"):
        drv.label_image("1", MANAGED)


# --- a run killed between launch and destroy ------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import clouds, hcloud
from imagefactory.definitions import HetznerSettings
from imagefactory.steps import StepLog

clouds.POLL_S = 0
clouds.wait_until_ready = lambda *args, **kwargs: ({}, "running")  # no SSH into a fake
driver = hcloud.driver(HetznerSettings(image="ubuntu-20.04"))
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_a_server_the_next_sweep_removes(fake, drv, log, tmp_path) -> None:
    env = os.environ | {"HCLOUD_TOKEN": TOKEN, "HCLOUD_ENDPOINT": fake.endpoint}
    args = [sys.executable, "-c", CHILD, fake.seed_snapshot(), str(tmp_path / "work")]
    child = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline() == "launched\n"
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert TOKEN not in stderr
    [left] = fake.servers
    assert fake.servers[left]["labels"] == CHECK_LABELS  # the kill skipped the destroy

    assert clouds.sweep(drv, log) == [str(left)]
    assert fake.servers == {}
    assert f"destroying check instance {left} left by an earlier run" in log.out.getvalue()
    assert clouds.sweep(drv, log) == []


# --- the token appears nowhere -----------------------------------------------------------------


def test_the_token_appears_nowhere(fake, sleeps, boot, log, tmp_path, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    drv = make_driver(fake, sleeps)
    seed_published(fake, "ubuntu-20.04-20261101.1")
    messages = [str(exc) for exc in _flow_and_failures(fake, drv, sleeps, log, tmp_path)]
    out, err = capfd.readouterr()
    texts = [out, err, log.out.getvalue(), caplog.text, repr(drv), *messages]
    assert len(messages) == 4
    assert all(TOKEN not in text for text in texts)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files  # the check key pair, at least
    assert all(TOKEN.encode() not in p.read_bytes() for p in files)
    assert {r.authorization for r in fake.requests} == {f"Bearer {TOKEN}"}  # it was used


def _flow_and_failures(fake, drv, sleeps, log, tmp_path) -> Iterator[Exception]:
    """The full flow, then the errors a user would see, with the real token configured."""
    image = fake.seed_snapshot()
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.publish(drv, image, NAME, DESCRIPTION, 1, log)
    failing = [
        lambda: drv.create_server("x", "999999", "", CHECK_LABELS),
        lambda: _failing_listing(fake, make_driver(fake, sleeps, retries=0)),
        lambda: drv.client.request("DELETE", f"/images/{image}"),
        lambda: hcloud.driver(SETTINGS, {"HCLOUD_TOKEN": f"{TOKEN} extra"}),
    ]
    for call in failing:
        try:
            call()
        except Exception as exc:
            yield exc


def _failing_listing(fake: FakeHetzner, drv: hcloud.HetznerDriver) -> None:
    fake.faults.append(Fault(500))
    drv.servers_labelled(CHECK_LABELS)


# --- measure -------------------------------------------------------------------------------


@pytest.mark.parametrize("older", [0, 3])
def test_measure_the_full_flow(fake, drv, boot, log, tmp_path, older) -> None:
    """API calls and wall time of launch → destroy → verdict → publish (+ retention)."""
    for n in range(older):
        seed_published(fake, f"ubuntu-20.04-2026110{n}.1")
    image = fake.seed_snapshot()
    started = time.monotonic()
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.record_verdict(drv, image, "certified")
    clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    elapsed = time.monotonic() - started
    stats = drv.stats
    print(
        f"\nhcloud full flow ({older} older published, keep 2): {stats.calls} calls, "
        f"{elapsed:.3f} s wall, {stats.seconds:.3f} s in HTTP\n"
        + json.dumps(stats.by_call, indent=1, sort_keys=True)
    )
    assert stats.retries == 0
    assert stats.calls == len(fake.requests)
    assert len(fake.images) == min(older + 1, 2)
