"""The Google Compute Engine driver against a local fake of the OAuth token endpoint and the
Compute API v1 (tests/fakes/gce_api.py): service-account login, every verb's request shapes
and Operations, the generic launch/publish/retention flow over it (also through a
CloudProvider), HTTP faults, a run killed between launch and destroy, and that neither the
private key nor a token ever leaks."""

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
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from imagefactory import clouds, gce
from imagefactory.cloudapi import CloudAPIError
from imagefactory.clouds import MANAGED, ROLE, VERDICT, CloudError
from imagefactory.definitions import GoogleSettings
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS, CloudProvider
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog
from tests.fakes.cloud_server import Fault
from tests.fakes.gce_api import COMPUTE, JWT_GRANT, PROJECT, ZONE, FakeGCE

TOKEN = "ya29.TEST-token-Wq8Zr3"  # distinctive: every token the fake issues starts so
SETTINGS = GoogleSettings(family="ubuntu-2004-lts", image_project="ubuntu-os-cloud")
MEMBERS = ["group:vpn-admins@example.com", "serviceAccount:deploy@other.iam.gserviceaccount.com"]
PUBLISHING = SETTINGS.model_copy(update={"publish_members": MEMBERS})
TIMINGS = {"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}
CHECK_LABELS = MANAGED | {ROLE: "check-instance"}
PUBLISHED = MANAGED | {ROLE: "image", VERDICT: "published"}
NAME = "ubuntu-20.04-20261126.1"
DESCRIPTION = f"{NAME}: Ubuntu 20.04 for strongSwan, certified by imagefactory"
NAME_IN_PATH = re.compile(r"/(imagefactory-check-[0-9a-f]+|operation-[a-z0-9-]+|ubuntu-[0-9a-z-]+)")
CHECK_FILTER = '(labels.imagefactory = "true") (labels.imagefactory-role = "check-instance")'


@pytest.fixture
def fake() -> Iterator[FakeGCE]:
    cloud = FakeGCE(token=TOKEN)
    cloud.start()
    yield cloud
    cloud.stop()
    assert cloud.handler_errors == []


@pytest.fixture
def key_path(fake: FakeGCE, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The key file lives apart from tmp_path, which is searched for leaks."""
    path = tmp_path_factory.mktemp("credentials") / "key.json"
    path.write_text(json.dumps(fake.key_file()))
    return path


@pytest.fixture
def sleeps() -> list[float]:
    return []  # what the clients were told to sleep (retries), instead of sleeping


def environment(fake: FakeGCE, key_path: Path, **extra: str) -> dict[str, str]:
    return {
        "GOOGLE_APPLICATION_CREDENTIALS": str(key_path),
        "GCE_API_URL": f"{fake.url}{COMPUTE}",
    } | extra


def make_driver(
    fake: FakeGCE,
    key_path: Path,
    sleeps: list[float],
    settings: GoogleSettings = SETTINGS,
    env: dict[str, str] | None = None,
    **options,
) -> gce.GCEDriver:
    options = {"sleep": sleeps.append, "timeout": (1, 2), "backoff": 1.0} | options
    driver = gce.driver(settings, environment(fake, key_path, **(env or {})), **options)
    driver.poll_s = 0
    return driver


@pytest.fixture
def drv(fake: FakeGCE, key_path: Path, sleeps: list[float]) -> gce.GCEDriver:
    return make_driver(fake, key_path, sleeps)


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SSH into the fake: the instance is "ready" as soon as it has an address."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *a, **k: (TIMINGS, "running"))
    monkeypatch.setattr(clouds, "POLL_S", 0)


@pytest.fixture
def log() -> StepLog:
    return StepLog(out=io.StringIO())


def calls(fake: FakeGCE, start: int = 0) -> list[str]:
    return [f"{r.method} {r.path.removeprefix(fake.compute())}" for r in fake.requests[start:]]


def logins(fake: FakeGCE) -> list:
    return fake.calls("POST", "/token")


def seed_published(fake: FakeGCE, name: str, family: str = "ubuntu-20-04") -> str:
    """An image an earlier run published: in the family, labelled with its published name."""
    gce_name = name.replace(".", "-")
    labels = gce.gce_labels(PUBLISHED | {gce.NAME_LABEL: name})
    return fake.seed_image(gce_name, labels, family=family)


# --- configuration and login ----------------------------------------------------------------


def test_missing_credentials_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        gce.driver(SETTINGS, {})
    assert str(missing.value) == (
        "Google Compute Engine: set GOOGLE_APPLICATION_CREDENTIALS (a service-account key "
        "file); it is read from the environment only"
    )
    absent = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=rf"^Google Compute Engine: {absent}: No such file"):
        gce.driver(SETTINGS, {"GOOGLE_APPLICATION_CREDENTIALS": str(absent)})
    for content, problem in (
        ("{not json", "not a JSON key file"),
        ('{"type": "authorized_user"}', "not a service-account key file"),
        ('{"type": "service_account", "private_key": "x"}', "no client_email, token_uri"),
    ):
        absent.write_text(content)
        with pytest.raises(ConfigError, match=problem):
            gce.driver(SETTINGS, {"GOOGLE_APPLICATION_CREDENTIALS": str(absent)})


def test_the_project_and_an_unreadable_key(fake: FakeGCE, tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(fake.key_file(project_id="")))
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(path)}
    with pytest.raises(ConfigError, match=r"^Google Compute Engine: set GOOGLE_PROJECT \(the key"):
        gce.driver(SETTINGS, env)
    assert gce.driver(SETTINGS, env | {"GOOGLE_PROJECT": "elsewhere"}).project == "elsewhere"
    secret = "-----BEGIN PRIVATE KEY-----\nTEST-not-a-key-Zq81\n-----END PRIVATE KEY-----\n"
    path.write_text(json.dumps(fake.key_file(private_key=secret)))
    with pytest.raises(ConfigError) as unreadable:
        gce.driver(SETTINGS, env)
    assert str(unreadable.value) == (
        f"Google Compute Engine: {path}: the private key in this service-account key file "
        "cannot be read"
    )
    assert "TEST-not-a-key" not in str(unreadable.value)


def test_login_is_a_jwt_grant_and_the_token_a_bearer_header(fake, drv) -> None:
    assert logins(fake) == []  # nothing is called before the first verb
    drv.servers_labelled(CHECK_LABELS)
    drv.images_labelled(PUBLISHED)
    [login] = logins(fake)
    assert login.authorization == ""
    assert login.content_type == "application/x-www-form-urlencoded"
    assert set(login.body) == {"grant_type", "assertion"}
    assert login.body["grant_type"] == JWT_GRANT
    assert [r.authorization for r in fake.requests[1:]] == [f"Bearer {TOKEN}1"] * 2
    assert (drv.title, drv.login_user, drv.ssh_port) == ("Google Compute Engine", "ubuntu", 22)
    assert (drv.project, drv.stats.by_call["POST /token"]) == (PROJECT, 1)


def test_an_expired_or_revoked_token_is_renewed_once(fake, drv) -> None:
    instance = fake.seed_instance("imagefactory-check-1", gce.gce_labels(CHECK_LABELS))
    drv.servers_labelled(CHECK_LABELS)
    fake.revoke_tokens()
    assert drv.servers_labelled(CHECK_LABELS) == [instance]
    assert len(logins(fake)) == 2
    listed = fake.calls("GET", fake.compute(f"/zones/{ZONE}/instances"))
    assert [r.authorization for r in listed] == [f"Bearer {TOKEN}{n}" for n in (1, 1, 2)]
    fake.revoke_tokens()
    fake.client_email = "someone-else@example.iam.gserviceaccount.com"  # the key was deleted
    with pytest.raises(CloudAPIError) as refused:
        drv.delete_server(instance)
    assert str(refused.value) == (
        "Google OAuth: POST /token: invalid_grant: Invalid JWT: iss is not the service account"
    )
    assert len(logins(fake)) == 3


def test_a_key_the_token_endpoint_refuses_is_one_line(fake, key_path, sleeps) -> None:
    fake.faults.append(Fault(400, path="/token"))
    drv = make_driver(fake, key_path, sleeps)
    with pytest.raises(CloudAPIError, match=r"^Google OAuth: POST /token: ") as refused:
        drv.images_labelled(PUBLISHED)
    assert "\n" not in str(refused.value)


def test_image_ids_are_image_names_and_reprs_hold_no_secret(fake, drv) -> None:
    assert drv.image_id("ubuntu-20-04-20261126-1\n") == "ubuntu-20-04-20261126-1"
    for wrong in ("ubuntu-20.04-20261126.1", "projects/p/global/images/x", "Ubuntu"):
        with pytest.raises(ConfigError, match="is not an image name"):
            drv.image_id(wrong)
    drv.images_labelled(PUBLISHED)
    private_key = fake.key_file()["private_key"]
    for text in (repr(drv), str(drv.__dict__)):
        assert TOKEN not in text and private_key.splitlines()[3] not in text


# --- each verb ------------------------------------------------------------------------------


def test_create_server_sends_the_documented_fields_and_waits(fake, drv) -> None:
    image = fake.seed_image("ubuntu-20-04-20261126-1")
    name = drv.create_server("imagefactory-check-1", image, "#cloud-config\n{}\n", CHECK_LABELS)
    assert name == "imagefactory-check-1"
    [sent] = fake.calls("POST", fake.compute(f"/zones/{ZONE}/instances"))
    assert sent.body == {
        "name": "imagefactory-check-1",
        "machineType": f"zones/{ZONE}/machineTypes/e2-small",
        "disks": [
            {
                "boot": True,
                "autoDelete": True,
                "initializeParams": {"sourceImage": f"projects/{PROJECT}/global/images/{image}"},
            }
        ],
        "networkInterfaces": [
            {
                "network": "global/networks/default",
                "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}],
            }
        ],
        "metadata": {
            "items": [
                {"key": "user-data", "value": "#cloud-config\n{}\n"},
                {"key": "block-project-ssh-keys", "value": "true"},
            ]
        },
        "labels": CHECK_LABELS,
    }
    operation = fake.calls("GET", fake.compute(f"/zones/{ZONE}/operations/"))
    assert len(operation) == 2  # RUNNING, DONE
    assert fake.instances[name]["labels"] == CHECK_LABELS


def test_a_failed_insert_operation_is_an_error_with_its_message(fake, drv) -> None:
    fake.failing_inserts = True
    with pytest.raises(CloudAPIError) as failed:
        drv.create_server("imagefactory-check-1", fake.seed_image("img"), "", CHECK_LABELS)
    assert str(failed.value) == (
        "Google Compute Engine: creating instance imagefactory-check-1: The zone "
        f"'projects/{PROJECT}/zones/{ZONE}' does not have enough resources available to "
        "fulfill the request."
    )
    assert failed.value.status == 503
    # Cleaned up after itself (nothing there: the DELETE's 404 is fine).
    assert len(fake.calls("DELETE", fake.compute(f"/zones/{ZONE}/instances/"))) == 1


def test_a_missing_image_is_gces_404(fake, drv) -> None:
    with pytest.raises(CloudAPIError) as refused:
        drv.create_server("imagefactory-check-1", "nope", "", CHECK_LABELS)
    assert str(refused.value) == (
        f"Compute Engine API: POST /projects/{PROJECT}/zones/{ZONE}/instances: HTTP 404: "
        f"The resource 'projects/{PROJECT}/global/images/nope' was not found"
    )


def test_server_address_once_running(fake, drv) -> None:
    fake.polls_until_running = 2
    name = drv.create_server("imagefactory-check-1", fake.seed_image("i"), "", CHECK_LABELS)
    assert [drv.server_address(name) for _ in range(3)] == [None, None, "127.0.0.1"]
    assert fake.instances[name]["status"] == "RUNNING"


def test_an_instance_that_stops_is_an_error(fake, drv) -> None:
    fake.dead_instances = True
    name = drv.create_server("imagefactory-check-1", fake.seed_image("i"), "", CHECK_LABELS)
    drv.server_address(name)
    with pytest.raises(CloudError, match=f"^Google Compute Engine: instance {name} is TERMINATED$"):
        drv.server_address(name)


def test_delete_server_waits_and_a_missing_one_is_fine(fake, drv) -> None:
    name = fake.seed_instance("imagefactory-check-1", CHECK_LABELS)
    drv.delete_server(name)
    assert fake.instances == {}
    before = len(fake.requests)
    drv.delete_server(name)
    assert calls(fake, before) == [f"DELETE /zones/{ZONE}/instances/{name}"]  # 404: no wait
    assert len(fake.calls("GET", fake.compute(f"/zones/{ZONE}/operations/"))) == 2


def test_servers_labelled_filters_by_label_and_follows_pages(fake, drv) -> None:
    mine = {fake.seed_instance(f"imagefactory-check-{n}", CHECK_LABELS) for n in range(5)}
    fake.seed_instance("imagefactory-check-x", {"owner": "someone"})
    fake.seed_instance("web-1", MANAGED | {ROLE: "image"})
    drv.per_page = 2
    assert set(drv.servers_labelled(CHECK_LABELS)) == mine
    pages = fake.calls("GET", fake.compute(f"/zones/{ZONE}/instances"))
    assert [p.query.get("pageToken") for p in pages] == [None, ["page-2"], ["page-4"]]
    assert all(p.query["filter"] == [CHECK_FILTER] for p in pages)
    assert pages[0].query["maxResults"] == ["2"]
    assert drv.servers_labelled({"owner": "nobody"}) == []  # an empty page has no "items"


def test_label_image_merges_with_the_fingerprint_and_skips_no_change(fake, drv) -> None:
    image = fake.seed_image("img", {"imagefactory-verdict": "certified"})
    clouds.record_verdict(drv, image, "published")
    assert fake.images[image]["labels"] == {"imagefactory-state": "built"} | PUBLISHED
    [sent] = fake.calls("POST", fake.compute(f"/global/images/{image}/setLabels"))
    assert set(sent.body) == {"labels", "labelFingerprint"}
    assert len(fake.calls("GET", fake.compute("/global/operations/"))) == 2
    before = len(fake.requests)
    clouds.record_verdict(drv, image, "published")
    assert calls(fake, before) == [f"GET /global/images/{image}"]
    for label in ({"Key": "v"}, {"k": "a b"}, {"k": "v" * 64}):
        with pytest.raises(ConfigError, match="cannot be a GCE label"):
            drv.label_image(image, label)
    assert gce.gce_labels({"imagefactory-name": "Ubuntu-20.04"}) == {
        "imagefactory-name": "ubuntu-20_04"
    }


def test_a_concurrent_label_change_is_a_412(fake, drv) -> None:
    image = fake.seed_image("img")
    stale = drv._image(image)
    fake.images[image]["labelFingerprint"] = "changed="
    with pytest.raises(CloudAPIError, match="HTTP 412: Labels fingerprint"):
        drv._set_labels(stale, PUBLISHED)


def test_publish_image_sets_family_and_description_and_shares(fake, key_path, sleeps) -> None:
    drv = make_driver(fake, key_path, sleeps, PUBLISHING)
    image = fake.seed_image("ubuntu-20-04-20261126-1")
    fake.policies[image] = {"version": 1, "etag": "BwX1", "bindings": [
        {"role": "roles/compute.imageUser", "members": ["user:ops@example.com"]}]}  # fmt: skip
    where = drv.publish_image(image, NAME, DESCRIPTION)
    assert where == [
        f"project {PROJECT}",
        "family ubuntu-20-04",
        f"roles/compute.imageUser for {', '.join(MEMBERS)}",
    ]
    [patch] = fake.calls("PATCH")
    assert patch.body == {"family": "ubuntu-20-04", "description": DESCRIPTION}
    published = fake.images[image]
    assert (published["family"], published["description"]) == ("ubuntu-20-04", DESCRIPTION)
    assert published["labels"][gce.NAME_LABEL] == "ubuntu-20_04-20261126_1"
    [policy] = fake.calls("POST", fake.compute(f"/global/images/{image}/setIamPolicy"))
    assert policy.body == {
        "policy": {
            "version": 1,
            "etag": "BwX1",
            "bindings": [
                {"role": "roles/compute.imageUser", "members": ["user:ops@example.com", *MEMBERS]}
            ],
        }
    }
    before = len(fake.requests)
    drv.publish_image(image, NAME, DESCRIPTION)  # done already: looks only
    assert calls(fake, before) == [
        f"GET /global/images/{image}",
        "GET /global/images",
        f"GET /global/images/{image}/getIamPolicy",
    ]


def test_publish_image_with_a_configured_family_and_no_members(fake, key_path, sleeps) -> None:
    settings = SETTINGS.model_copy(update={"image_family": "strongswan-vpn"})
    drv = make_driver(fake, key_path, sleeps, settings)
    image = fake.seed_image("ubuntu-20-04-20261126-1")
    assert drv.publish_image(image, NAME, DESCRIPTION) == [
        f"project {PROJECT}",
        "family strongswan-vpn",
    ]
    assert fake.calls("GET", fake.compute(f"/global/images/{image}/getIamPolicy")) == []
    bad = settings.model_copy(update={"image_family": "Not_A_Family"})
    with pytest.raises(ConfigError, match="'Not_A_Family' cannot be an image family"):
        make_driver(fake, key_path, sleeps, bad).publish_image(image, NAME, DESCRIPTION)


def test_publish_makes_the_image_its_familys_current_one(fake, drv) -> None:
    older = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(3)]
    other = seed_published(fake, "ubuntu-22.04-20261120.1", family="ubuntu-22-04")
    image = older[1]  # re-publishing an older one: it must become the family's image
    fake.images[image]["deprecated"] = {"state": "DEPRECATED", "replacement": older[2]}
    fake.images[older[0]]["deprecated"] = {"state": "OBSOLETE"}
    drv.publish_image(image, "ubuntu-20.04-20261121.1", DESCRIPTION)
    assert "deprecated" not in fake.images[image]
    assert fake.images[older[2]]["deprecated"] == {
        "state": "DEPRECATED",
        "replacement": fake.images[image]["selfLink"],
    }
    assert fake.images[older[0]]["deprecated"] == {"state": "OBSOLETE"}  # left as it was
    assert "deprecated" not in fake.images[other]
    listings = fake.calls("GET", fake.compute("/global/images"))
    [family_listing] = [r for r in listings if r.path == fake.compute("/global/images")]
    assert family_listing.query["filter"] == [
        '(family = "ubuntu-20-04") (labels.imagefactory = "true")'
    ]
    deprecations = [r.body for r in fake.calls("POST") if r.path.endswith("/deprecate")]
    assert deprecations[0] == {"state": "ACTIVE"}


def test_images_labelled_names_them_as_published_and_follows_pages(fake, drv) -> None:
    published = [seed_published(fake, f"ubuntu-20.04-2026110{n}.1") for n in range(5)]
    fake.seed_image("certified", {"imagefactory": "true", "imagefactory-verdict": "certified"})
    fake.seed_image("foreign", {"imagefactory-verdict": "published"})
    fake.seed_image("packer-named", gce.gce_labels(PUBLISHED))  # no name label: its own name
    drv.per_page = 2
    found = {i.id: i for i in drv.images_labelled(PUBLISHED)}
    assert set(found) == {*published, "packer-named"}
    first = found[published[0]]
    assert first.name == "ubuntu-20.04-20261100.1"
    assert fake.images[published[0]]["creationTimestamp"] == "2026-11-01T00:00:00.000-08:00"
    assert first.created == "2026-11-01T08:00:00+00:00"
    assert found["packer-named"].name == "packer-named"
    pages = [r for r in fake.calls("GET") if r.path == fake.compute("/global/images")]
    assert len(pages) == 3
    assert pages[0].query["filter"] == [
        '(labels.imagefactory = "true") (labels.imagefactory-role = "image") '
        '(labels.imagefactory-verdict = "published")'
    ]


def test_creation_times_sort_across_a_daylight_saving_change() -> None:
    summer, winter = "2026-11-01T01:30:00.000-07:00", "2026-11-01T01:10:00.000-08:00"
    assert gce._utc(summer) < gce._utc(winter)  # 08:30 UTC, then 09:10 UTC
    assert gce._utc("") == "" and gce._utc("garbled") == "garbled"


def test_delete_image_waits_and_a_missing_one_is_fine(fake, drv) -> None:
    image = seed_published(fake, NAME)
    drv.delete_image(image)
    assert image not in fake.images
    before = len(fake.requests)
    drv.delete_image(image)
    assert calls(fake, before) == [f"DELETE /global/images/{image}"]


def test_an_operation_that_never_finishes_is_an_error(fake, drv) -> None:
    fake.polls_until_done = 10**6
    drv.operation_timeout_s = -1
    image = fake.seed_image("img")
    with pytest.raises(CloudError, match=r"deleting image img: operation operation-\d+-delete"):
        drv.delete_image(image)


# --- the generic flow over this driver --------------------------------------------------------


def test_full_flow_launch_destroy_verdict_publish_retention(fake, drv, boot, log, tmp_path) -> None:
    old = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(3)]
    other_family = [
        seed_published(fake, f"ubuntu-22.04-2026112{n}.1", "ubuntu-22-04") for n in range(3)
    ]
    image = fake.seed_image("ubuntu-20-04-20261126-1")

    assert clouds.sweep(drv, log) == []
    with clouds.launched(drv, drv.image_id(image), tmp_path / "work", log) as instance:
        [server] = fake.instances.values()
        assert server["labels"] == CHECK_LABELS
        items = {i["key"]: i["value"] for i in server["metadata"]["items"]}
        assert set(items) == {"user-data", "block-project-ssh-keys"}  # no ssh-keys
        public_key = (tmp_path / "work/ssh/id_ed25519.pub").read_text().strip()
        assert yaml.safe_load(items["user-data"])["ssh_authorized_keys"] == [public_key]
        assert instance.allowed_keys == [public_key]
        assert instance.target.label == "ubuntu@127.0.0.1:22"
    assert fake.instances == {}

    clouds.record_verdict(drv, image, "certified")
    assert fake.images[image]["labels"][VERDICT] == "certified"
    where = clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    assert where == [f"project {PROJECT}", "family ubuntu-20-04"]
    published = fake.images[image]
    assert published["labels"] == gce.gce_labels(
        {"imagefactory-state": "built"} | PUBLISHED | {gce.NAME_LABEL: NAME}
    )
    assert (published["family"], published.get("deprecated")) == ("ubuntu-20-04", None)
    # Retention: the two oldest of this family go; the kept one is deprecated in favour.
    assert set(fake.images) == {old[2], image, *other_family}
    assert fake.images[old[2]]["deprecated"]["replacement"] == published["selfLink"]
    assert all("deprecated" not in fake.images[i] for i in other_family)
    assert "retention (keep 2): deleting ubuntu-20.04-20261120.1" in log.out.getvalue()


@pytest.mark.parametrize("interruption", [RuntimeError("check crashed"), KeyboardInterrupt()])
def test_launched_destroys_the_instance_when_the_body_raises(
    fake, drv, boot, log, tmp_path, interruption
) -> None:
    with (
        pytest.raises(type(interruption)),
        clouds.launched(drv, fake.seed_image("img"), tmp_path / "work", log),
    ):
        assert len(fake.instances) == 1
        raise interruption
    assert fake.instances == {}
    assert "destroy imagefactory-check-" in log.out.getvalue()


def test_launched_destroys_an_instance_that_never_runs(
    fake, drv, boot, log, tmp_path, monkeypatch
) -> None:
    fake.polls_until_running = 10**6
    monkeypatch.setattr(clouds, "LAUNCH_TIMEOUT_S", -1)
    with (
        pytest.raises(CloudError, match="not running after"),
        clouds.launched(drv, fake.seed_image("img"), tmp_path / "work", log),
    ):
        pass
    assert fake.instances == {}


def test_a_rejected_image_is_labelled_and_never_published(fake, drv) -> None:
    image = fake.seed_image("packer-rejected")
    clouds.record_verdict(drv, image, "rejected")
    assert fake.images[image]["labels"][VERDICT] == "rejected"
    assert "family" not in fake.images[image]
    assert fake.calls("PATCH") == []
    assert drv.images_labelled(PUBLISHED) == []
    assert clouds.retired(drv, NAME, 0) == []


def test_a_cloud_provider_runs_the_whole_flow_through_this_driver(
    fake, key_path, boot, log, tmp_path, monkeypatch
) -> None:
    """What providers.py will do once wired: a new driver (and token) per verb."""
    for name, value in environment(fake, key_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("GOOGLE_PROJECT", raising=False)
    fake.polls_until_done = 0  # operations DONE at once: the driver's default poll never waits
    provider = CloudProvider(
        name="googlecompute", title="Google Compute Engine", plugin_source="x",
        secret_env=("GOOGLE_APPLICATION_CREDENTIALS",), driver_module="gce",
    )  # fmt: skip
    old = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(2)]
    image = fake.seed_image("ubuntu-20-04-20261126-1")
    leftover = fake.seed_instance("imagefactory-check-old", gce.gce_labels(CHECK_LABELS))
    definition = SimpleNamespace(provider=lambda name: PUBLISHING, release="20.04")
    record = SimpleNamespace(
        artifact=image, image="ubuntu-20.04", serial="20261126.1", certification=None,
        state="certified",
    )  # fmt: skip

    provider.recover(definition, SimpleNamespace(), log)
    assert leftover not in fake.instances
    with provider.instance(record, definition, tmp_path / "work", tmp_path, log) as instance:
        assert instance.target.label == "ubuntu@127.0.0.1:22" and len(fake.instances) == 1
    assert fake.instances == {}
    provider.record_verdict(record, definition, log)
    where = provider.publish(record, definition, SimpleNamespace(keep=1), log)
    assert where == (
        f"Google Compute Engine image {image} (project {PROJECT}, family ubuntu-20-04, "
        f"roles/compute.imageUser for {', '.join(MEMBERS)})"
    )
    assert set(fake.images) == {image} and not set(old) & set(fake.images)
    assert fake.images[image]["labels"][VERDICT] == "published"
    assert fake.policies[image]["bindings"][0]["members"] == MEMBERS


def test_the_google_provider_uses_this_driver() -> None:
    provider = PROVIDERS["googlecompute"]
    assert isinstance(provider, CloudProvider)
    assert provider.driver_module == "gce"


# --- HTTP faults ---------------------------------------------------------------------------


def test_429_honours_retry_after(fake, drv, sleeps) -> None:
    name = fake.seed_instance("imagefactory-check-1", CHECK_LABELS)
    drv.servers_labelled(CHECK_LABELS)  # logged in
    fake.faults.append(Fault(429, retry_after="7", path=fake.compute("/zones/")))
    assert drv.server_address(name) is None
    assert sleeps == [7.0] and drv.stats.retries == 1


def test_429_on_insert_is_retried_once_it_was_refused(fake, drv, sleeps) -> None:
    image = fake.seed_image("img")
    fake.faults.append(Fault(429, retry_after="2", method="POST", path=fake.compute("/zones/")))
    drv.create_server("imagefactory-check-1", image, "", CHECK_LABELS)
    assert len(fake.calls("POST", fake.compute(f"/zones/{ZONE}/instances"))) == 2
    assert len(fake.instances) == 1 and sleeps == [2.0]


def test_5xx_on_get_and_on_set_labels_is_retried(fake, drv, sleeps) -> None:
    image = fake.seed_image("img")
    drv.images_labelled(PUBLISHED)  # logged in
    fake.faults += [Fault(503, method="GET"), Fault(502, method="GET")]
    fake.faults.append(Fault(500, method="POST", path=fake.compute("/global/images/")))
    drv.label_image(image, MANAGED)
    assert fake.images[image]["labels"]["imagefactory"] == "true"
    assert sleeps == [1.0, 2.0, 1.0]
    assert len(fake.calls("POST", fake.compute(f"/global/images/{image}/setLabels"))) == 2


def test_5xx_on_insert_is_not_repeated(fake, drv, sleeps) -> None:
    image = fake.seed_image("img")
    fake.faults.append(Fault(503, method="POST", path=fake.compute("/zones/")))
    with pytest.raises(CloudAPIError) as failed:
        drv.create_server("imagefactory-check-1", image, "", CHECK_LABELS)
    assert str(failed.value) == (
        f"Compute Engine API: POST /projects/{PROJECT}/zones/{ZONE}/instances: HTTP 503: "
        "injected HTTP 503"
    )
    assert len(fake.calls("POST", fake.compute(f"/zones/{ZONE}/instances"))) == 1
    assert sleeps == []


def test_a_timeout_is_one_line_and_an_insert_is_not_repeated(fake, key_path, sleeps) -> None:
    drv = make_driver(fake, key_path, sleeps, timeout=(1, 0.3))
    image = fake.seed_image("img")
    fake.faults.append(Fault(delay=0.6, method="POST", path=fake.compute("/zones/")))
    with pytest.raises(CloudAPIError) as timeout:
        drv.create_server("imagefactory-check-1", image, "", CHECK_LABELS)
    assert str(timeout.value) == (
        f"Compute Engine API: POST /projects/{PROJECT}/zones/{ZONE}/instances: ReadTimeout"
    )
    assert len(fake.calls("POST", fake.compute(f"/zones/{ZONE}/instances"))) == 1
    fake.revoke_tokens()
    fake.faults.append(Fault(delay=0.6, path="/token"))
    with pytest.raises(CloudAPIError) as login:
        make_driver(fake, key_path, sleeps, timeout=(1, 0.3)).images_labelled(PUBLISHED)
    assert str(login.value) == "Google OAuth: POST /token: ReadTimeout"


# --- a run killed between launch and destroy ------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import clouds, gce
from imagefactory.definitions import GoogleSettings
from imagefactory.steps import StepLog

clouds.POLL_S = 0
clouds.wait_until_ready = lambda *args, **kwargs: ({}, "running")  # no SSH into a fake
driver = gce.driver(GoogleSettings(family="ubuntu-2004-lts", image_project="ubuntu-os-cloud"))
driver.poll_s = 0
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_an_instance_the_next_sweep_removes(
    fake, key_path, drv, log, tmp_path
) -> None:
    # Only the fake's variables: any of the developer's own would point elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "GCE_"))}
    env |= environment(fake, key_path)
    args = [sys.executable, "-c", CHILD, fake.seed_image("img"), str(tmp_path / "work")]
    child = subprocess.Popen(
        args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready and child.stdout.readline() == "launched\n"
    finally:
        child.send_signal(signal.SIGKILL)
        _, stderr = child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert TOKEN not in stderr
    [left] = fake.instances
    assert fake.instances[left]["labels"] == CHECK_LABELS  # the kill skipped the destroy

    assert clouds.sweep(drv, log) == [left]
    assert fake.instances == {}
    assert f"destroying check instance {left} left by an earlier run" in log.out.getvalue()
    assert clouds.sweep(drv, log) == []


# --- neither the private key nor a token appears anywhere -----------------------------------


def test_private_key_and_tokens_appear_nowhere(
    fake, key_path, sleeps, boot, log, tmp_path, capfd, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    drv = make_driver(fake, key_path, sleeps)
    seed_published(fake, "ubuntu-20.04-20261101.1")
    failures = list(_flow_and_failures(fake, key_path, drv, sleeps, log, tmp_path))
    assert len(failures) == 5
    errors = [text for e in failures for text in (str(e), repr(e), *traceback.format_exception(e))]
    out, err = capfd.readouterr()
    texts = [out, err, log.out.getvalue(), caplog.text, repr(drv), str(drv.__dict__), *errors]
    key_lines = fake.key_file()["private_key"].splitlines()[1:-1]
    assertions = [r.body["assertion"] for r in logins(fake)]
    secrets = [TOKEN, *key_lines, *assertions]
    assert len(assertions) >= 2
    for text in texts:
        for secret in secrets:
            assert secret not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files  # the check key pair, at least
    for path in files:
        content = path.read_bytes()
        assert not any(secret.encode() in content for secret in secrets)
    # Used, and only where they belong: the token in the Authorization header.
    for request in fake.requests:
        assert request.path == "/token" or request.authorization.startswith(f"Bearer {TOKEN}")
        sent = f"{request.path} {request.query} {json.dumps(request.body)}"
        assert TOKEN not in sent


def _flow_and_failures(fake, key_path, drv, sleeps, log, tmp_path) -> Iterator[Exception]:
    """The full flow, then the errors a user would see, with the real credentials set."""
    image = fake.seed_image("ubuntu-20-04-20261126-1")
    with clouds.launched(drv, image, tmp_path / "work", log):
        fake.revoke_tokens()  # a renewal mid-run
    clouds.publish(drv, image, NAME, DESCRIPTION, 1, log)
    failing = [
        lambda: drv.create_server("imagefactory-check-x", "nope", "", CHECK_LABELS),
        lambda: _failing_listing(fake, make_driver(fake, key_path, sleeps, retries=0)),
        lambda: drv.server_address("nope"),
        lambda: _refused_login(fake, drv),
        lambda: gce.driver(SETTINGS, {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path)}),
    ]
    for call in failing:
        try:
            call()
        except Exception as exc:
            yield exc


def _failing_listing(fake: FakeGCE, drv: gce.GCEDriver) -> None:
    drv.images_labelled(PUBLISHED)
    fake.faults.append(Fault(500))
    drv.servers_labelled(CHECK_LABELS)


def _refused_login(fake: FakeGCE, drv: gce.GCEDriver) -> None:
    fake.revoke_tokens()
    fake.client_email = "deleted@example.iam.gserviceaccount.com"
    try:
        drv.images_labelled(PUBLISHED)
    finally:
        fake.client_email = drv.credentials.service_account_email


# --- measure -------------------------------------------------------------------------------


@pytest.mark.parametrize("older", [0, 3])
def test_measure_the_full_flow(fake, key_path, sleeps, boot, log, tmp_path, older) -> None:
    """API calls and wall time of login → launch → destroy → verdict → publish (+ retention),
    as one driver does them (CloudProvider makes a new driver, i.e. one login, per verb)."""
    for n in range(older):
        seed_published(fake, f"ubuntu-20.04-2026110{n}.1")
    image = fake.seed_image("ubuntu-20-04-20261126-1")
    started = time.monotonic()
    drv = make_driver(fake, key_path, sleeps, PUBLISHING)
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.record_verdict(drv, image, "certified")
    clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    elapsed = time.monotonic() - started
    by_call: dict[str, int] = {}
    for call, count in drv.stats.by_call.items():
        shape = NAME_IN_PATH.sub("/{name}", call)
        by_call[shape] = by_call.get(shape, 0) + count
    print(
        f"\nGCE full flow ({older} older published, keep 2, polls until DONE "
        f"{fake.polls_until_done}): {drv.stats.calls} calls, {elapsed:.3f} s wall, "
        f"{drv.stats.seconds:.3f} s in HTTP\n" + json.dumps(by_call, indent=1, sort_keys=True)
    )
    assert drv.stats.retries == 0
    assert drv.stats.calls == len(fake.requests)
    assert len(fake.images) == min(older + 1, 2)
