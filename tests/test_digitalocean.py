"""The DigitalOcean driver against a local fake of the API v2 (no network, no root): each
verb's request shapes, the whole launch → destroy → verdict → publish → retention flow,
faults (429, 5xx, timeouts, 401), a run killed mid-check, and the token kept out of
everything a user or a log could see."""

from __future__ import annotations

import io
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imagefactory import clouds, digitalocean
from imagefactory.cloudapi import CloudAPIError
from imagefactory.definitions import DigitalOceanSettings
from imagefactory.digitalocean import DigitalOceanDriver
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog
from tests.fakes.cloud_server import Fault
from tests.fakes.digitalocean_api import FakeDigitalOcean

TOKEN = "dop_v1_" + "5ec7e75ec7e7" * 5  # distinctive: searched for everywhere afterwards
SETTINGS = DigitalOceanSettings(
    image="ubuntu-20-04-x64", region="nyc3", size="s-1vcpu-1gb", publish_regions=["nyc3", "ams3"]
)
CHECK_TAGS = ["imagefactory:true", "imagefactory-role:check-instance"]
IMAGE_TAGS = ["imagefactory:true", "imagefactory-role:image"]
READY = ({"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}, "running")


@pytest.fixture
def fake() -> Iterator[FakeDigitalOcean]:
    cloud = FakeDigitalOcean(token=TOKEN)
    cloud.start()
    yield cloud
    cloud.stop()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def do(fake: FakeDigitalOcean, sleeps: list[float]) -> DigitalOceanDriver:
    driver = digitalocean.driver(SETTINGS, env(fake), sleep=sleeps.append, timeout=(2, 5))
    driver.poll_s = 0
    return driver


@pytest.fixture
def no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real SSH into the fake is impossible (checks over SSH are tested end to end elsewhere)."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *args: READY)
    monkeypatch.setattr(clouds, "POLL_S", 0)


def env(fake: FakeDigitalOcean, token: str = TOKEN) -> dict[str, str]:
    return {"DIGITALOCEAN_API_TOKEN": token, "DIGITALOCEAN_API_URL": fake.url}


def bodies(fake: FakeDigitalOcean, method: str, prefix: str) -> list[object]:
    return [r.body for r in fake.calls(method, prefix)]


def calls(fake: FakeDigitalOcean) -> list[str]:
    return [f"{r.method} {r.path}" for r in fake.requests]


# --- construction ---------------------------------------------------------------------


def test_token_only_from_the_environment() -> None:
    with pytest.raises(ConfigError) as refused:
        digitalocean.driver(SETTINGS, {})
    assert str(refused.value) == (
        "DigitalOcean: set DIGITALOCEAN_API_TOKEN (the API token); "
        "it is read from the environment only"
    )
    fallback = digitalocean.driver(SETTINGS, {"DIGITALOCEAN_TOKEN": "b"})
    assert fallback.client.headers == {"Authorization": "Bearer b"}
    both = {"DIGITALOCEAN_API_TOKEN": "a", "DIGITALOCEAN_TOKEN": "b"}
    assert digitalocean.driver(SETTINGS, both).client.headers == {"Authorization": "Bearer a"}
    assert fallback.client.base_url == "https://api.digitalocean.com"


def test_identity_and_image_ids(do: DigitalOceanDriver) -> None:
    assert (do.title, do.login_user, do.ssh_port) == ("DigitalOcean", "root", 22)
    assert do.image_id("nyc3:123456") == "123456"
    assert do.image_id("nyc3,ams3:42") == "42"
    assert do.image_id("123456") == "123456"
    with pytest.raises(ConfigError, match="not a snapshot id"):
        do.image_id("ubuntu-20-04-x64")
    assert TOKEN not in repr(do)


# --- each verb ------------------------------------------------------------------------


def test_create_server(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    image = fake.add_image("packer-1764158400")
    labels = clouds.MANAGED | {clouds.ROLE: "check-instance"}
    server = do.create_server("imagefactory-check-1", str(image), "#cloud-config\n", labels)
    [sent] = fake.calls("POST", "/v2/droplets")
    assert sent.body == {
        "name": "imagefactory-check-1",
        "region": "nyc3",
        "size": "s-1vcpu-1gb",
        "image": image,
        "user_data": "#cloud-config\n",
        "tags": CHECK_TAGS,
        "ipv6": False,
        "monitoring": False,
    }
    assert sent.authorization == f"Bearer {TOKEN}"
    assert fake.droplets[int(server)]["tags"] == CHECK_TAGS


def test_labels_that_cannot_be_tags(do: DigitalOceanDriver) -> None:
    with pytest.raises(ConfigError, match="cannot be a tag name"):
        do.create_server("x", "1", "", {"owner": "a b"})


def test_server_address_once_active(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    fake.active_after = 3
    server = do.create_server("n", str(fake.add_image("s")), "", clouds.MANAGED)
    assert [do.server_address(server) for _ in range(3)] == [None, None, "127.0.0.1"]


@pytest.mark.parametrize("status", ["errored", "archive"])
def test_dead_droplet(fake: FakeDigitalOcean, do: DigitalOceanDriver, status: str) -> None:
    server = do.create_server("n", str(fake.add_image("s")), "", clouds.MANAGED)
    fake.droplets[int(server)]["status"] = status
    fake.active_after = 99
    with pytest.raises(clouds.CloudError, match=f"droplet {server} is {status}"):
        do.server_address(server)


def test_delete_server_twice(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    server = do.create_server("n", str(fake.add_image("s")), "", clouds.MANAGED)
    do.delete_server(server)
    do.delete_server(server)  # already gone: fine
    assert not fake.droplets
    assert calls(fake)[-2:] == [f"DELETE /v2/droplets/{server}"] * 2


def test_servers_labelled_paginates(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    image = str(fake.add_image("s"))
    check = clouds.MANAGED | {clouds.ROLE: "check-instance"}
    mine = [do.create_server(f"c{i}", image, "", check) for i in range(5)]
    do.create_server("managed-only", image, "", clouds.MANAGED)
    do.create_server("not-ours", image, "", {clouds.ROLE: "check-instance"})
    do.per_page = 2
    assert do.servers_labelled(check) == mine
    pages = fake.calls("GET", "/v2/droplets")
    assert len(pages) == 3  # 6 droplets carry the role tag: 2 + 2 + 2
    assert pages[0].query == {"tag_name": ["imagefactory-role:check-instance"], "per_page": ["2"]}
    assert pages[2].query["page"] == ["3"]


def test_label_image_moves_the_verdict(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    tags = [*IMAGE_TAGS, "imagefactory-verdict:certified", "owner:alice"]
    image = fake.add_image("s", tags=tags)
    clouds.record_verdict(do, str(image), "published")
    assert fake.images[image]["tags"] == [
        *IMAGE_TAGS,
        "owner:alice",
        "imagefactory-verdict:published",
    ]
    resources = {"resources": [{"resource_id": str(image), "resource_type": "image"}]}
    assert [(f"{r.method} {r.path}", r.body) for r in fake.requests] == [
        (f"GET /v2/images/{image}", None),
        ("POST /v2/tags", {"name": "imagefactory-verdict:published"}),
        ("POST /v2/tags/imagefactory-verdict:published/resources", resources),
        ("DELETE /v2/tags/imagefactory-verdict:certified/resources", resources),
    ]


def test_label_image_tags_that_exist(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    fake.tags.update(IMAGE_TAGS)  # tagged something before: creating them answers 422
    image = fake.add_image("s")
    clouds.record_verdict(do, str(image), "certified")
    assert fake.images[image]["tags"] == [*IMAGE_TAGS, "imagefactory-verdict:certified"]
    before = len(fake.requests)
    clouds.record_verdict(do, str(image), "certified")  # nothing to change: one look
    assert calls(fake)[before:] == [f"GET /v2/images/{image}"]


def test_publish_image(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    fake.transfer_after = 3
    do.settings = SETTINGS.model_copy(update={"publish_regions": ["nyc3", "ams3", "fra1"]})
    image = fake.add_image("packer-1764158400", regions=["nyc3"])
    where = do.publish_image(str(image), "ubuntu-20.04-20261126.1", "certified")
    assert where == ["nyc3", "ams3", "fra1"]
    assert sorted(fake.images[image]["regions"]) == ["ams3", "fra1", "nyc3"]
    assert bodies(fake, "PUT", "/v2/images") == [
        {"name": "ubuntu-20.04-20261126.1", "description": "certified"}
    ]
    assert bodies(fake, "POST", f"/v2/images/{image}/actions") == [
        {"type": "transfer", "region": "ams3"},
        {"type": "transfer", "region": "fra1"},
    ]
    assert len(fake.calls("GET", "/v2/actions/")) == 6  # 3 looks each


def test_publish_transfer_fails(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    fake.failing_regions = {"ams3"}
    image = fake.add_image("s")
    with pytest.raises(clouds.CloudError, match=f"transferring image {image} to ams3 failed"):
        do.publish_image(str(image), "n", "d")


def test_publish_transfer_too_slow(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    fake.transfer_after = 10**6
    do.transfer_timeout_s = 0
    with pytest.raises(clouds.CloudError, match="to ams3 not done after 0 s"):
        do.publish_image(str(fake.add_image("s")), "n", "d")


def test_images_labelled(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    published = [*IMAGE_TAGS, "imagefactory-verdict:published"]
    ids = [
        fake.add_image(f"i{n}", tags=published, created_at=f"2026-11-0{n}T00:00:00Z")
        for n in (1, 2, 3)
    ]
    fake.add_image("certified", tags=[*IMAGE_TAGS, "imagefactory-verdict:certified"])
    fake.add_image("foreign", tags=["imagefactory-verdict:published"])
    do.per_page = 2
    found = do.images_labelled(clouds.MANAGED | {clouds.ROLE: "image", clouds.VERDICT: "published"})
    assert [i.id for i in found] == [str(i) for i in ids]
    assert found[0] == clouds.CloudImage(
        str(ids[0]),
        "i1",
        "2026-11-01T00:00:00Z",
        {"imagefactory": "true", "imagefactory-role": "image", "imagefactory-verdict": "published"},
    )
    [first, *_] = fake.calls("GET", "/v2/images")
    assert first.query == {
        "private": ["true"],
        "tag_name": ["imagefactory-verdict:published"],
        "per_page": ["2"],
    }
    assert len(fake.calls("GET", "/v2/images")) == 2


def test_delete_image_twice(fake: FakeDigitalOcean, do: DigitalOceanDriver) -> None:
    image = fake.add_image("s")
    do.delete_image(str(image))
    do.delete_image(str(image))
    assert not fake.images


# --- the whole flow -------------------------------------------------------------------


def test_full_flow(
    fake: FakeDigitalOcean, do: DigitalOceanDriver, no_ssh: None, tmp_path: Path
) -> None:
    published = [*IMAGE_TAGS, "imagefactory-verdict:published"]
    old = fake.add_image("ubuntu-20.04-20261001.1", ["nyc3"], published, "2026-10-01T00:00:00Z")
    kept = fake.add_image("ubuntu-20.04-20261101.1", ["nyc3"], published, "2026-11-01T00:00:00Z")
    other = fake.add_image("ubuntu-22.04-20260901.1", ["nyc3"], published, "2026-09-01T00:00:00Z")
    image = fake.add_image("packer-1764158400", ["nyc3"], [], "2026-11-26T10:00:00Z")
    log = StepLog(io.StringIO())
    started = time.perf_counter()

    assert clouds.sweep(do, log) == []
    with clouds.launched(do, do.image_id(f"nyc3:{image}"), tmp_path / "work", log) as instance:
        [droplet] = fake.droplets.values()
        assert droplet["tags"] == CHECK_TAGS
        assert droplet["image"] == {"id": image}
        user_data = fake.user_data[droplet["id"]]
        assert user_data.startswith("#cloud-config\n")
        assert yaml.safe_load(user_data)["ssh_authorized_keys"] == instance.allowed_keys
        assert instance.allowed_keys[0].startswith("ssh-ed25519 ")
        assert instance.target.label == "root@127.0.0.1:22"
        assert (instance.timings, instance.system_state) == READY
    assert not fake.droplets
    clouds.record_verdict(do, str(image), "certified")
    where = clouds.publish(do, str(image), "ubuntu-20.04-20261126.1", "certified", 2, log)

    elapsed = time.perf_counter() - started
    assert where == fake.images[image]["regions"] == ["nyc3", "ams3"]
    assert fake.images[image]["name"] == "ubuntu-20.04-20261126.1"
    assert fake.images[image]["tags"] == published
    assert set(fake.images) == {kept, other, image}  # retention: the oldest of this family
    assert old not in fake.images
    assert f"retention (keep 2): deleting ubuntu-20.04-20261001.1 ({old})" in log.out.getvalue()
    by_call = {}
    for call, count in do.stats.by_call.items():
        shape = re.sub(r"/\d+", "/{id}", call)
        by_call[shape] = by_call.get(shape, 0) + count
    print(f"\nDigitalOcean full flow: {do.stats.calls} API calls in {elapsed:.3f} s: {by_call}")


@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_destroyed_when_the_checks_fail(
    fake: FakeDigitalOcean,
    do: DigitalOceanDriver,
    no_ssh: None,
    tmp_path: Path,
    interrupt: type[BaseException],
) -> None:
    image = fake.add_image("s")
    with (
        pytest.raises(interrupt),
        clouds.launched(do, str(image), tmp_path, StepLog(io.StringIO())),
    ):
        assert fake.droplets
        raise interrupt("checks crashed")
    assert not fake.droplets


def test_destroyed_when_the_boot_fails(
    fake: FakeDigitalOcean, do: DigitalOceanDriver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def never_ready(*args: object) -> None:
        raise clouds.CloudError("no SSH after 900 s")

    monkeypatch.setattr(clouds, "wait_until_ready", never_ready)
    monkeypatch.setattr(clouds, "POLL_S", 0)
    fake.active_after = 3
    with (
        pytest.raises(clouds.CloudError),
        clouds.launched(do, str(fake.add_image("s")), tmp_path, StepLog(io.StringIO())),
    ):
        pass
    assert not fake.droplets
    assert len(fake.calls("GET", "/v2/droplets/")) == 3


def test_rejected_is_never_published(
    fake: FakeDigitalOcean, do: DigitalOceanDriver, no_ssh: None
) -> None:
    image = fake.add_image("packer-1764158400")
    clouds.record_verdict(do, str(image), "rejected")
    assert fake.images[image]["tags"] == [*IMAGE_TAGS, "imagefactory-verdict:rejected"]
    wanted = clouds.MANAGED | {clouds.ROLE: "image", clouds.VERDICT: "published"}
    assert do.images_labelled(wanted) == []
    assert clouds.retired(do, "packer-1764158400", 0) == []
    assert not fake.calls("PUT") and not fake.calls("POST", f"/v2/images/{image}/actions")


def test_provider_publishes_through_the_driver(
    fake: FakeDigitalOcean, monkeypatch: pytest.MonkeyPatch
) -> None:
    """providers.CloudProvider finds this module and calls driver(settings) from the env."""
    monkeypatch.setenv("DIGITALOCEAN_API_TOKEN", TOKEN)
    monkeypatch.setenv("DIGITALOCEAN_API_URL", fake.url)
    fake.transfer_after = 1  # done at the first look: the driver's 10 s poll never runs
    image = fake.add_image(
        "packer-1764158400", tags=[*IMAGE_TAGS, "imagefactory-verdict:certified"]
    )
    provider = PROVIDERS["digitalocean"]
    definition = SimpleNamespace(provider=lambda name: SETTINGS, release="20.04")
    record = SimpleNamespace(
        artifact=f"nyc3:{image}", image="ubuntu-20.04", serial="20261126.1", certification=None
    )
    settings = SimpleNamespace(keep=2)
    where = provider.publish(record, definition, settings, StepLog(io.StringIO()))
    assert where == f"DigitalOcean image {image} (nyc3, ams3)"
    assert fake.images[image]["tags"] == [*IMAGE_TAGS, "imagefactory-verdict:published"]


def test_recertified_published_image_stays_published(
    fake: FakeDigitalOcean, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIGITALOCEAN_API_TOKEN", TOKEN)
    monkeypatch.setenv("DIGITALOCEAN_API_URL", fake.url)
    image = fake.add_image(
        "ubuntu-20.04-20261126.1", tags=[*IMAGE_TAGS, "imagefactory-verdict:published"]
    )
    definition = SimpleNamespace(provider=lambda name: SETTINGS)
    record = SimpleNamespace(artifact=f"nyc3:{image}", state="published")
    PROVIDERS["digitalocean"].record_verdict(record, definition, StepLog(io.StringIO()))
    assert "imagefactory-verdict:published" in fake.images[image]["tags"]


# --- faults ---------------------------------------------------------------------------


def test_429_waits_as_told(fake: FakeDigitalOcean, do: DigitalOceanDriver, sleeps: list) -> None:
    server = do.create_server("n", str(fake.add_image("s")), "", clouds.MANAGED)
    fake.faults.append(Fault(429, retry_after="7", path="/v2/droplets/"))
    assert do.server_address(server) == "127.0.0.1"
    assert sleeps == [7.0]
    assert do.stats.retries == 1


def test_5xx_then_success(fake: FakeDigitalOcean, sleeps: list) -> None:
    do = digitalocean.driver(SETTINGS, env(fake), sleep=sleeps.append, backoff=0.5)
    image = fake.add_image("s")
    fake.faults += [Fault(500, path="/v2/images/"), Fault(503, path="/v2/images/")]
    do.delete_image(str(image))
    assert sleeps == [0.5, 1.0]
    assert not fake.images


def test_500_on_create_is_not_retried(
    fake: FakeDigitalOcean, do: DigitalOceanDriver, sleeps: list
) -> None:
    image = str(fake.add_image("s"))
    fake.faults.append(Fault(500, method="POST", path="/v2/droplets"))
    with pytest.raises(CloudAPIError, match=r"POST /v2/droplets: HTTP 500"):
        do.create_server("n", image, "", clouds.MANAGED)
    assert len(fake.calls("POST", "/v2/droplets")) == 1
    assert sleeps == []


def test_429_on_create_is_retried(
    fake: FakeDigitalOcean, do: DigitalOceanDriver, sleeps: list
) -> None:
    image = str(fake.add_image("s"))
    fake.faults.append(Fault(429, retry_after="2", method="POST", path="/v2/droplets"))
    do.create_server("n", image, "", clouds.MANAGED)
    assert len(fake.calls("POST", "/v2/droplets")) == 2
    assert len(fake.droplets) == 1
    assert sleeps == [2.0]


def test_timeout_is_one_line(fake: FakeDigitalOcean, sleeps: list) -> None:
    do = digitalocean.driver(SETTINGS, env(fake), sleep=sleeps.append, timeout=(1, 0.5))
    image = str(fake.add_image("s"))
    fake.faults.append(Fault(200, delay=1.0, method="POST", path="/v2/droplets"))
    with pytest.raises(CloudAPIError) as failed:
        do.create_server("n", image, "", clouds.MANAGED)
    assert str(failed.value) == "DigitalOcean API: POST /v2/droplets: ReadTimeout"
    assert len(fake.calls("POST", "/v2/droplets")) == 1  # it may have been created: not again


def test_wrong_token(fake: FakeDigitalOcean) -> None:
    wrong = "dop_v1_" + "0bad" * 16
    do = digitalocean.driver(SETTINGS, env(fake, wrong))
    with pytest.raises(CloudAPIError) as refused:
        do.servers_labelled(clouds.MANAGED)
    message = str(refused.value)
    assert message == "DigitalOcean API: GET /v2/droplets: HTTP 401: Unable to authenticate"
    assert refused.value.status == 401
    assert wrong not in message and "\n" not in message


# --- a run killed between launch and destroy ------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import clouds, digitalocean
from imagefactory.definitions import DigitalOceanSettings
from imagefactory.steps import StepLog

clouds.wait_until_ready = lambda *args: ({"ssh": 1.0}, "running")
clouds.POLL_S = 0
driver = digitalocean.driver(DigitalOceanSettings(image="ubuntu-20-04-x64"))
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(120)
"""


def test_sweep_after_a_killed_run(
    fake: FakeDigitalOcean, do: DigitalOceanDriver, tmp_path: Path
) -> None:
    image = fake.add_image("s")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(image), str(tmp_path / "work")],
        env=os.environ | env(fake),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(child.stdout, 30) == "launched\n"
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert TOKEN not in stderr
    [left] = fake.droplets
    log = StepLog(io.StringIO())
    assert clouds.sweep(do, log) == [str(left)]
    assert not fake.droplets
    assert f"destroying check instance {left} left by an earlier run" in log.out.getvalue()


def read_line(stream: io.TextIOBase, timeout: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return "(nothing within the timeout)"
    return stream.readline()


# --- the token appears nowhere --------------------------------------------------------


def test_token_appears_nowhere(
    fake: FakeDigitalOcean,
    do: DigitalOceanDriver,
    no_ssh: None,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    log = StepLog(io.StringIO())
    image = str(fake.add_image("packer-1764158400"))
    errors: list[str] = []

    def failing(call, *faults: Fault) -> None:
        fake.faults.extend(faults)
        try:
            call()
        except (CloudAPIError, clouds.CloudError) as exc:
            errors.extend([str(exc), repr(exc), *traceback.format_exception(exc)])

    failing(lambda: do.create_server("n", image, "", clouds.MANAGED), Fault(500, method="POST"))
    failing(lambda: do.server_address("1"))  # 404
    fake.failing_regions = {"ams3"}
    failing(lambda: do.publish_image(image, "n", "d"))
    with clouds.launched(do, image, tmp_path / "work", log):
        fake.faults.append(Fault(429, retry_after="1"))
    other = FakeDigitalOcean(token="another-account")  # our token, refused
    other.start()
    try:
        failing(lambda: digitalocean.driver(SETTINGS, env(other)).servers_labelled({"a": "b"}))
    finally:
        other.stop()
    out, err = capfd.readouterr()

    assert len(errors) >= 4 * 3
    assert "HTTP 401" in " ".join(errors)
    for text in [out, err, log.out.getvalue(), caplog.text, *errors, repr(do)]:
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes()
    for request in fake.requests + other.requests:
        assert TOKEN not in request.path and TOKEN not in str(request.query)
