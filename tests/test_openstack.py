"""The OpenStack driver against a local fake of Keystone, Nova, Glance and Neutron
(tests/fakes/openstack_api.py): login and catalog endpoint choice, every verb's request
shapes, the generic launch/publish/retention flow over it, HTTP faults, a run killed between
launch and destroy, and that neither the password nor a token ever leaks."""

from __future__ import annotations

import base64
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
from types import SimpleNamespace

import pytest
import yaml

from imagefactory import clouds, openstack
from imagefactory.cloudapi import CloudAPIError
from imagefactory.clouds import MANAGED, ROLE, VERDICT, CloudError
from imagefactory.definitions import OpenStackSettings
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS, CloudProvider
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog
from tests.fakes.cloud_server import Fault
from tests.fakes.openstack_api import GLANCE, NOVA, PROJECT_ID, FakeOpenStack

# Distinctive: searched for everywhere afterwards. Every token the fake issues starts so.
TOKEN = "gAAAAABos-TEST-token-Vq7Lm2Xz9"
PASSWORD = "os-TEST-pass word-4Rk#9tQ!"  # a space and punctuation: JSON, not a header
SETTINGS = OpenStackSettings(image_name="Ubuntu 20.04", flavor="m1.small")
TIMINGS = {"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}
CHECK_LABELS = MANAGED | {ROLE: "check-instance"}
PUBLISHED = MANAGED | {ROLE: "image", VERDICT: "published"}
PUBLISHED_TAGS = ["imagefactory=true", "imagefactory-role=image", "imagefactory-verdict=published"]
NAME = "ubuntu-20.04-20261126.1"
DESCRIPTION = f"{NAME}: Ubuntu 20.04 for strongSwan, certified by imagefactory"
UUID_IN_PATH = re.compile(r"/[0-9a-f]{8}-[0-9a-f-]{27}")


@pytest.fixture
def fake() -> Iterator[FakeOpenStack]:
    cloud = FakeOpenStack(token=TOKEN, password=PASSWORD)
    cloud.start()
    yield cloud
    cloud.stop()
    assert cloud.handler_errors == []


@pytest.fixture
def sleeps() -> list[float]:
    return []  # what the clients were told to sleep (retries), instead of sleeping


def make_driver(
    fake: FakeOpenStack,
    sleeps: list[float],
    settings: OpenStackSettings = SETTINGS,
    env: dict[str, str] | None = None,
    **options,
) -> openstack.OpenStackDriver:
    options = {"sleep": sleeps.append, "timeout": (1, 2), "backoff": 1.0} | options
    return openstack.driver(settings, fake.environment(**(env or {})), **options)


@pytest.fixture
def drv(fake: FakeOpenStack, sleeps: list[float]) -> openstack.OpenStackDriver:
    return make_driver(fake, sleeps)


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SSH into the fake: the instance is "ready" as soon as it has an address."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *a, **k: (TIMINGS, "running"))
    monkeypatch.setattr(clouds, "POLL_S", 0)


@pytest.fixture
def log() -> StepLog:
    return StepLog(out=io.StringIO())


def calls(fake: FakeOpenStack, start: int = 0) -> list[str]:
    return [f"{r.method} {r.path}" for r in fake.requests[start:]]


def logins(fake: FakeOpenStack) -> list:
    return fake.calls("POST", "/v3/auth/tokens")


def seed_published(fake: FakeOpenStack, name: str) -> str:
    """An image an earlier run published: tagged, renamed, protected."""
    return fake.seed_image(name, PUBLISHED_TAGS, protected=True)


# --- configuration and login ----------------------------------------------------------------


def test_missing_variables_are_named_and_read_from_the_environment_only() -> None:
    with pytest.raises(ConfigError) as missing:
        openstack.driver(SETTINGS, {})
    assert str(missing.value) == (
        "OpenStack: set OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME (the OS_* "
        "variables of your openrc); credentials are read from the environment only"
    )
    partial = {
        "OS_AUTH_URL": "https://keystone.example:5000/v3",
        "OS_USERNAME": "demo",
        "OS_PROJECT_ID": PROJECT_ID,
    }
    with pytest.raises(ConfigError, match=r"^OpenStack: set OS_PASSWORD \(the OS_"):
        openstack.driver(SETTINGS, partial)
    with pytest.raises(ConfigError, match="OS_INTERFACE='private' is not one of"):
        openstack.driver(SETTINGS, partial | {"OS_PASSWORD": "x", "OS_INTERFACE": "private"})


def test_login_sends_the_v3_password_body_and_uses_the_token(fake, drv) -> None:
    [login] = logins(fake)
    assert login.site == "identity" and login.authorization == ""  # no token to send yet
    assert login.body == {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": "demo", "domain": {"name": "Default"}, "password": PASSWORD}
                },
            },
            "scope": {"project": {"name": "demo", "domain": {"name": "Default"}}},
        }
    }
    drv.servers_labelled(CHECK_LABELS)
    drv.images_labelled(PUBLISHED)
    assert [r.authorization for r in fake.requests[1:]] == [f"{TOKEN}1", f"{TOKEN}1"]
    assert fake.calls("GET", f"{NOVA}/servers")[0].microversion == "2.37"
    assert (drv.title, drv.login_user, drv.ssh_port) == ("OpenStack", "ubuntu", 22)
    assert drv.stats.by_call["POST /auth/tokens"] == 1


def test_ids_instead_of_names_as_horizons_openrc_gives_them(fake, sleeps) -> None:
    env = {
        "OS_PROJECT_ID": PROJECT_ID,
        "OS_PROJECT_NAME": "",
        "OS_USER_DOMAIN_NAME": "",
        "OS_USER_DOMAIN_ID": "default",
        "OS_PROJECT_DOMAIN_ID": "default",
    }
    make_driver(fake, sleeps, env=env)
    [login] = logins(fake)
    assert login.body["auth"]["scope"] == {"project": {"id": PROJECT_ID}}
    assert login.body["auth"]["identity"]["password"]["user"]["domain"] == {"id": "default"}


def test_auth_url_with_or_without_the_version() -> None:
    assert openstack.identity_url("https://k.example:5000") == "https://k.example:5000/v3"
    assert openstack.identity_url("https://k.example/identity/v3/") == (
        "https://k.example/identity/v3"
    )
    with pytest.raises(ConfigError, match=r"Keystone v2\.0"):
        openstack.identity_url("https://k.example:5000/v2.0")
    assert openstack.service_root("https://g.example:9292/v2/") == "https://g.example:9292"
    assert openstack.service_root("https://n.example/network/v2.0") == "https://n.example/network"


@pytest.mark.parametrize("interface", ["internal", "internalURL"])
def test_catalog_endpoints_by_region_and_interface(fake, sleeps, interface) -> None:
    drv = make_driver(fake, sleeps, env={"OS_REGION_NAME": "RegionTwo", "OS_INTERFACE": interface})
    assert drv.endpoints == {
        service: f"{fake.url}/RegionTwo-internal{path}"
        for service, path in (("compute", NOVA), ("image", GLANCE), ("network", "/network"))
    }
    drv.servers_labelled(CHECK_LABELS)
    drv.images_labelled(PUBLISHED)
    assert fake.site_calls(NOVA) == fake.site_calls(GLANCE) == {"RegionTwo-internal"}


def test_a_region_is_needed_only_when_the_catalog_has_several(fake, sleeps) -> None:
    with pytest.raises(ConfigError) as several:
        make_driver(fake, sleeps, env={"OS_REGION_NAME": ""})
    assert str(several.value) == (
        "OpenStack: compute endpoints in several regions (RegionOne, RegionTwo); set OS_REGION_NAME"
    )
    with pytest.raises(ConfigError) as unknown:
        make_driver(fake, sleeps, env={"OS_REGION_NAME": "RegionNine"})
    assert str(unknown.value) == (
        "OpenStack: no compute endpoint (interface public, region RegionNine) in the catalog"
    )
    fake.regions = ["RegionOne"]
    drv = make_driver(fake, sleeps, env={"OS_REGION_NAME": ""})
    assert drv.endpoints["compute"] == f"{fake.url}/RegionOne-public{NOVA}"


def test_a_versioned_image_endpoint_and_no_network_service(fake, sleeps) -> None:
    fake.image_suffix = "/v2"  # listed as ".../image/v2": our paths carry the version
    fake.services.discard("network")
    drv = make_driver(fake, sleeps)
    assert "network" not in drv.endpoints
    assert drv.images_labelled(PUBLISHED) == []
    named = SETTINGS.model_copy(update={"networks": ["private"]})
    with pytest.raises(ConfigError, match="no network service in the catalog"):
        make_driver(fake, sleeps, named).create_server("c", fake.seed_image(), "", CHECK_LABELS)


def test_a_wrong_password_is_one_line_without_the_password(fake, sleeps) -> None:
    wrong = "os-WRONG-pass-Hq4Tz8"
    with pytest.raises(CloudAPIError) as refused:
        make_driver(fake, sleeps, env={"OS_PASSWORD": wrong})
    assert str(refused.value) == (
        "OpenStack Identity API: POST /auth/tokens: HTTP 401: "
        "The request you have made requires authentication."
    )
    assert refused.value.status == 401
    assert wrong not in str(refused.value) and PASSWORD not in str(refused.value)
    assert len(logins(fake)) == 1 and sleeps == []  # a refusal is not retried


def test_an_expired_token_is_renewed_once(fake, drv) -> None:
    server = fake.seed_server("imagefactory-check-1", CHECK_LABELS)
    fake.revoke_tokens()
    assert drv.servers_labelled(CHECK_LABELS) == [server]
    assert len(logins(fake)) == 2
    assert [r.authorization for r in fake.calls("GET", f"{NOVA}/servers/detail")] == [
        f"{TOKEN}1",  # refused
        f"{TOKEN}2",
    ]
    fake.revoke_tokens()
    fake.password = "changed meanwhile"
    with pytest.raises(CloudAPIError, match=r"POST /auth/tokens: HTTP 401"):
        drv.delete_server(server)
    assert len(logins(fake)) == 3


def test_image_ids_and_the_password_kept_out_of_reprs(drv) -> None:
    image = "0b8e7f4e-3c0a-4f6e-9a55-2d1f0c9e8b71"
    assert drv.image_id(f"{image}\n") == image
    with pytest.raises(ConfigError, match="is not a Glance image id"):
        drv.image_id("nyc3:123456")
    for text in (repr(drv), repr(drv.credentials), str(drv.__dict__)):
        assert PASSWORD not in text and TOKEN not in text


# --- each verb ------------------------------------------------------------------------------


def test_create_server_sends_the_documented_fields(fake, drv) -> None:
    image = fake.seed_image()
    server_id = drv.create_server(
        "imagefactory-check-1", image, "#cloud-config\n{}\n", CHECK_LABELS
    )
    [sent] = fake.calls("POST", f"{NOVA}/servers")
    assert sent.body == {
        "server": {
            "name": "imagefactory-check-1",
            "imageRef": image,
            "flavorRef": "2",  # m1.small
            "networks": "auto",
            "user_data": base64.b64encode(b"#cloud-config\n{}\n").decode(),
            "metadata": CHECK_LABELS,
        }
    }
    assert sent.microversion == "2.37"  # "networks": "auto" needs it
    assert fake.servers[server_id]["metadata"] == CHECK_LABELS
    assert fake.user_data[server_id] == "#cloud-config\n{}\n"
    drv.create_server("imagefactory-check-2", image, "", CHECK_LABELS)
    assert len(fake.calls("GET", f"{NOVA}/flavors")) == 1  # looked up once per driver


def test_networks_by_uuid_or_by_name_through_neutron(fake, sleeps) -> None:
    private, public = fake.networks
    settings = SETTINGS.model_copy(update={"networks": ["private", public["id"]], "flavor": "3"})
    drv = make_driver(fake, sleeps, settings)
    drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    [sent] = fake.calls("POST", f"{NOVA}/servers")
    assert sent.body["server"]["networks"] == [{"uuid": private["id"]}, {"uuid": public["id"]}]
    assert sent.body["server"]["flavorRef"] == "3"  # a flavor id as given
    assert [r.query for r in fake.calls("GET", "/network/v2.0/networks")] == [{"name": ["private"]}]
    fake.networks.append(fake.network("private"))
    for name, problem in (("nope", "no network named"), ("private", "several networks are")):
        drv = make_driver(fake, sleeps, SETTINGS.model_copy(update={"networks": [name]}))
        with pytest.raises(ConfigError, match=f"OpenStack: {problem}"):
            drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)


def test_flavor_lookup_follows_pages_and_names_what_exists(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, SETTINGS.model_copy(update={"flavor": "ds512M"}))
    drv.per_page = 2
    drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert [r.query.get("marker") for r in fake.calls("GET", f"{NOVA}/flavors")] == [
        None,
        ["2"],
        ["4"],
    ]
    assert fake.calls("POST", f"{NOVA}/servers")[0].body["server"]["flavorRef"] == "d1"
    drv = make_driver(fake, sleeps, SETTINGS.model_copy(update={"flavor": "m9.huge"}))
    with pytest.raises(ConfigError) as unknown:
        drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert str(unknown.value) == (
        "OpenStack: no flavor 'm9.huge' (flavors: ds512M, m1.large, m1.medium, m1.small, m1.tiny)"
    )


def test_server_address_prefers_the_floating_ipv4(fake, drv) -> None:
    fake.polls_until_active = 2
    server = drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert [drv.server_address(server) for _ in range(3)] == [None, None, "127.0.0.1"]
    assert [a["addr"] for a in fake.servers[server]["addresses"]["private"]] == [
        "10.0.0.7",
        "fd5e::7",
        "127.0.0.1",
    ]


def test_server_address_on_a_provider_network_is_the_fixed_ipv4(fake, drv) -> None:
    fake.floating_ips = False
    server = drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert [drv.server_address(server) for _ in range(2)] == [None, "127.0.0.1"]
    fake.servers[server]["addresses"] = {"v6only": [{"addr": "2001:db8::9", "version": 6}]}
    with pytest.raises(CloudError, match=f"server {server} is ACTIVE without an IPv4 address"):
        drv.server_address(server)


def test_a_server_in_error_is_an_error_with_novas_reason(fake, drv) -> None:
    fake.failing_servers = True
    server = drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    drv.server_address(server)
    with pytest.raises(CloudError) as failed:
        drv.server_address(server)
    assert str(failed.value) == (
        f"OpenStack: server {server} is ERROR: "
        "No valid host was found. There are not enough hosts available."
    )


def test_delete_server_and_a_missing_one_is_fine(fake, drv) -> None:
    server = fake.seed_server("imagefactory-check-1", CHECK_LABELS)
    drv.delete_server(server)
    drv.delete_server(server)
    assert fake.servers == {}
    assert calls(fake)[-2:] == [f"DELETE {NOVA}/servers/{server}"] * 2


def test_servers_labelled_filters_by_name_and_metadata_and_follows_pages(fake, drv) -> None:
    mine = {fake.seed_server(f"imagefactory-check-{n}", CHECK_LABELS) for n in range(7)}
    fake.seed_server("imagefactory-check-x", {"owner": "someone"})  # a name alone is not ours
    fake.seed_server("imagefactory-check-y", MANAGED | {ROLE: "image"})
    fake.seed_server("web-1", {"team": "web"})
    fake.link_prefix = "http://controller:8774/v2.1"  # Nova behind a proxy: a foreign host
    drv.per_page = 3
    assert set(drv.servers_labelled(CHECK_LABELS)) == mine
    pages = fake.calls("GET", f"{NOVA}/servers/detail")
    # 9 named imagefactory-check-*: 3 + 3 + 3, and an empty page (Nova links every full one).
    assert [len(p.query.get("marker", [])) for p in pages] == [0, 1, 1, 1]
    assert pages[0].query == {"limit": ["3"], "name": ["^imagefactory-check-"]}
    assert all(p.query["name"] == ["^imagefactory-check-"] for p in pages)
    assert {p.site for p in pages} == {"RegionOne-public"}
    drv.servers_labelled(MANAGED)  # not check instances: no name filter
    assert "name" not in fake.calls("GET", f"{NOVA}/servers/detail")[-1].query


def test_label_image_adds_tags_first_then_drops_stale_values(fake, drv) -> None:
    image = fake.seed_image(tags=["owner=vpn-team", "imagefactory-verdict=certified", "gold"])
    clouds.record_verdict(drv, image, "published")
    assert fake.images[image]["tags"] == ["owner=vpn-team", "gold", *PUBLISHED_TAGS]
    prefix = f"{GLANCE}/v2/images/{image}"
    assert calls(fake, 1) == [
        f"GET {prefix}",
        f"PUT {prefix}/tags/imagefactory=true",
        f"PUT {prefix}/tags/imagefactory-role=image",
        f"PUT {prefix}/tags/imagefactory-verdict=published",
        f"DELETE {prefix}/tags/imagefactory-verdict=certified",
    ]
    before = len(fake.requests)
    clouds.record_verdict(drv, image, "published")  # nothing to change: one look
    assert calls(fake, before) == [f"GET {prefix}"]
    for label in ({"a/b": "c"}, {"k=x": "v"}, {"k": "v" * 300}):
        with pytest.raises(ConfigError, match="cannot be a Glance image tag"):
            drv.label_image(image, label)


def test_publish_image_renames_describes_and_protects_with_a_json_patch(fake, drv) -> None:
    image = fake.seed_image("packer-6745c1a2")
    assert drv.publish_image(image, NAME, DESCRIPTION) == [f"image {image} (protected)"]
    [patch] = fake.calls("PATCH")
    assert patch.content_type == "application/openstack-images-v2.1-json-patch"
    assert patch.body == [
        {"op": "replace", "path": "/name", "value": NAME},
        {"op": "add", "path": "/description", "value": DESCRIPTION},
        {"op": "replace", "path": "/protected", "value": True},
    ]
    published = fake.images[image]
    assert (published["name"], published["description"], published["protected"]) == (
        NAME,
        DESCRIPTION,
        True,
    )
    drv.publish_image(image, NAME, "again")  # "add" replaces a description it has
    assert fake.images[image]["description"] == "again"


def test_images_labelled_asks_glance_for_every_tag_and_follows_pages(fake, drv) -> None:
    published = [seed_published(fake, f"ubuntu-20.04-2026110{n}.1") for n in range(5)]
    fake.seed_image("certified", ["imagefactory=true", "imagefactory-verdict=certified"])
    fake.seed_image("foreign", ["imagefactory-verdict=published"])
    fake.seed_image("another project's", PUBLISHED_TAGS, owner="5f0e1d2c3b4a49687766554433221100")
    drv.per_page = 2
    found = drv.images_labelled(PUBLISHED)
    assert {i.id for i in found} == set(published)
    first = next(i for i in found if i.id == published[0])
    assert first == clouds.CloudImage(
        published[0],
        "ubuntu-20.04-20261100.1",
        fake.images[published[0]]["created_at"],
        PUBLISHED,
    )
    pages = fake.calls("GET", f"{GLANCE}/v2/images")
    assert pages[0].query == {"tag": PUBLISHED_TAGS, "owner": [PROJECT_ID], "limit": ["2"]}
    assert len(pages) == 3 and all(p.query["tag"] == PUBLISHED_TAGS for p in pages)


def test_delete_image_unprotects_first_and_a_missing_one_is_fine(fake, drv) -> None:
    image = seed_published(fake, NAME)
    with pytest.raises(CloudAPIError) as refused:
        drv._clients["image"].request("DELETE", f"/v2/images/{image}")
    assert str(refused.value) == (
        f"OpenStack Image API: DELETE /v2/images/{image}: HTTP 403: Forbidden"
    )
    before = len(fake.requests)
    drv.delete_image(image)
    assert image not in fake.images
    assert calls(fake, before) == [
        f"PATCH {GLANCE}/v2/images/{image}",
        f"DELETE {GLANCE}/v2/images/{image}",
    ]
    assert fake.requests[before].body == [{"op": "replace", "path": "/protected", "value": False}]
    drv.delete_image(image)  # gone already: no error, no DELETE
    assert calls(fake, before + 2) == [f"PATCH {GLANCE}/v2/images/{image}"]


# --- the generic flow over this driver --------------------------------------------------------


def test_full_flow_launch_destroy_verdict_publish_retention(fake, drv, boot, log, tmp_path) -> None:
    old = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(3)]
    other_family = [seed_published(fake, f"ubuntu-22.04-2026112{n}.1") for n in range(3)]
    certified_tags = ["imagefactory=true", "imagefactory-verdict=certified"]
    certified = fake.seed_image("ubuntu-20.04-20261125.1", certified_tags)
    image = fake.seed_image("packer-6745c1a2")

    assert clouds.sweep(drv, log) == []
    with clouds.launched(drv, drv.image_id(image), tmp_path / "work", log) as instance:
        [server] = fake.servers.values()
        assert server["metadata"] == CHECK_LABELS
        assert server["image"] == {"id": image}
        user_data = fake.user_data[server["id"]]
        assert user_data.startswith("#cloud-config\n")
        public_key = (tmp_path / "work/ssh/id_ed25519.pub").read_text().strip()
        assert yaml.safe_load(user_data)["ssh_authorized_keys"] == [public_key]
        assert instance.allowed_keys == [public_key]
        assert instance.target.label == "ubuntu@127.0.0.1:22"
        assert (instance.timings, instance.system_state) == (TIMINGS, "running")
    assert fake.servers == {}
    assert len(fake.calls("DELETE", f"{NOVA}/servers/")) == 1

    clouds.record_verdict(drv, image, "certified")
    assert "imagefactory-verdict=certified" in fake.images[image]["tags"]
    where = clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    assert where == [f"image {image} (protected)"]
    published = fake.images[image]
    assert published["tags"] == PUBLISHED_TAGS
    assert (published["name"], published["protected"]) == (NAME, True)

    # Retention: the two oldest of this family go (unprotected first); nothing else does.
    assert set(fake.images) == {old[2], image, certified, *other_family}
    for gone in old[:2]:
        patch, delete = (fake.calls(m, f"{GLANCE}/v2/images/{gone}") for m in ("PATCH", "DELETE"))
        assert [r.body for r in patch] == [
            [{"op": "replace", "path": "/protected", "value": False}]
        ]
        assert fake.requests.index(patch[0]) < fake.requests.index(delete[0])
    assert all(fake.images[i]["protected"] for i in [old[2], *other_family])
    assert "retention (keep 2): deleting ubuntu-20.04-20261120.1" in log.out.getvalue()


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
    assert fake.servers == {}
    assert "destroy imagefactory-check-" in log.out.getvalue()


def test_launched_destroys_a_server_that_ends_in_error(fake, drv, boot, log, tmp_path) -> None:
    fake.failing_servers = True
    with (
        pytest.raises(CloudError, match="is ERROR: No valid host was found"),
        clouds.launched(drv, fake.seed_image(), tmp_path / "work", log),
    ):
        pass
    assert fake.servers == {}


def test_launched_destroys_a_server_that_never_runs(
    fake, drv, boot, log, tmp_path, monkeypatch
) -> None:
    fake.polls_until_active = 10**6
    monkeypatch.setattr(clouds, "LAUNCH_TIMEOUT_S", -1)
    with (
        pytest.raises(CloudError, match="not running after"),
        clouds.launched(drv, fake.seed_image(), tmp_path / "work", log),
    ):
        pass
    assert fake.servers == {}


def test_a_rejected_verdict_tags_the_image_and_it_is_never_published(fake, drv) -> None:
    image = fake.seed_image("packer-rejected")
    clouds.record_verdict(drv, image, "rejected")
    assert fake.images[image]["tags"] == [
        "imagefactory=true",
        "imagefactory-role=image",
        "imagefactory-verdict=rejected",
    ]
    assert fake.images[image]["protected"] is False
    assert fake.images[image]["name"] == "packer-rejected"
    assert fake.calls("PATCH") == []
    assert drv.images_labelled(PUBLISHED) == []
    assert clouds.retired(drv, NAME, 0) == []


def test_the_openstack_provider_builds_this_driver_from_the_environment(fake, monkeypatch) -> None:
    for name, value in fake.environment().items():
        monkeypatch.setenv(name, value)
    provider = PROVIDERS["openstack"]
    assert isinstance(provider, CloudProvider)
    assert provider.driver_module == "openstack"
    driver = provider.driver(SimpleNamespace(provider=lambda name: SETTINGS))
    assert isinstance(driver, openstack.OpenStackDriver)
    assert driver.servers_labelled(CHECK_LABELS) == []


# --- HTTP faults ---------------------------------------------------------------------------


def test_429_honours_retry_after(fake, drv, sleeps) -> None:
    server = fake.seed_server("imagefactory-check-1", CHECK_LABELS)
    fake.faults.append(Fault(429, retry_after="7", path=f"{NOVA}/servers/"))
    assert drv.server_address(server) is None
    assert sleeps == [7.0]
    assert drv.stats.retries == 1


def test_429_on_create_is_retried_once_it_was_refused(fake, drv, sleeps) -> None:
    fake.faults.append(Fault(429, retry_after="2", method="POST", path=f"{NOVA}/servers"))
    drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert len(fake.calls("POST", f"{NOVA}/servers")) == 2
    assert len(fake.servers) == 1 and sleeps == [2.0]


def test_5xx_on_get_is_retried_then_succeeds(fake, drv, sleeps) -> None:
    image = fake.seed_image()
    fake.faults += [Fault(503, method="GET"), Fault(502, method="GET")]
    drv.label_image(image, MANAGED)
    assert fake.images[image]["tags"] == ["imagefactory=true"]
    assert sleeps == [1.0, 2.0]
    assert drv.stats.by_call["GET /v2/images/{id}"] == 3


def test_5xx_on_the_patch_is_retried_and_on_login_too(fake, sleeps) -> None:
    fake.faults.append(Fault(503, path="/v3/auth/tokens"))
    drv = make_driver(fake, sleeps)
    assert len(logins(fake)) == 2 and sleeps == [1.0]
    image = fake.seed_image()
    fake.faults.append(Fault(500, method="PATCH"))
    drv.publish_image(image, NAME, DESCRIPTION)
    assert fake.images[image]["protected"] and len(fake.calls("PATCH")) == 2


def test_5xx_on_create_is_not_repeated(fake, drv, sleeps) -> None:
    fake.faults.append(Fault(503, method="POST", path=f"{NOVA}/servers"))
    with pytest.raises(CloudAPIError) as failed:
        drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert str(failed.value) == "OpenStack Compute API: POST /servers: HTTP 503: injected HTTP 503"
    assert len(fake.calls("POST", f"{NOVA}/servers")) == 1 and sleeps == []


def test_a_timeout_is_one_line_and_a_create_is_not_repeated(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.3))
    fake.faults.append(Fault(delay=0.6, method="POST", path=f"{NOVA}/servers"))
    with pytest.raises(CloudAPIError) as timeout:
        drv.create_server("c", fake.seed_image(), "", CHECK_LABELS)
    assert str(timeout.value) == "OpenStack Compute API: POST /servers: ReadTimeout"
    assert len(fake.calls("POST", f"{NOVA}/servers")) == 1
    fake.faults += [Fault(delay=0.6, path="/v3/auth/tokens")] * 2
    with pytest.raises(CloudAPIError) as login:
        make_driver(fake, sleeps, timeout=(1, 0.3), retries=1)
    assert str(login.value) == "OpenStack Identity API: POST /auth/tokens: ReadTimeout"


def test_novas_error_for_a_missing_image_is_an_http_400(fake, drv) -> None:
    missing = "0b8e7f4e-3c0a-4f6e-9a55-2d1f0c9e8b71"
    with pytest.raises(CloudAPIError) as refused:
        drv.create_server("c", missing, "", CHECK_LABELS)
    assert refused.value.status == 400
    assert str(refused.value) == (
        f"OpenStack Compute API: POST /servers: HTTP 400: Image {missing} could not be found."
    )


# --- a run killed between launch and destroy ------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import clouds, openstack
from imagefactory.definitions import OpenStackSettings
from imagefactory.steps import StepLog

clouds.POLL_S = 0
clouds.wait_until_ready = lambda *args, **kwargs: ({}, "running")  # no SSH into a fake
driver = openstack.driver(OpenStackSettings(image_name="Ubuntu 20.04"))
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_a_server_the_next_sweep_removes(fake, drv, log, tmp_path) -> None:
    # Only the fake's OS_* variables: any of the developer's own would point elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")} | fake.environment()
    args = [sys.executable, "-c", CHILD, fake.seed_image(), str(tmp_path / "work")]
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
    assert TOKEN not in stderr and PASSWORD not in stderr
    [left] = fake.servers
    assert fake.servers[left]["metadata"] == CHECK_LABELS  # the kill skipped the destroy

    assert clouds.sweep(drv, log) == [left]
    assert fake.servers == {}
    assert f"destroying check instance {left} left by an earlier run" in log.out.getvalue()
    assert clouds.sweep(drv, log) == []


# --- neither the password nor a token appears anywhere ----------------------------------------


def test_password_and_token_appear_nowhere(
    fake, sleeps, boot, log, tmp_path, capfd, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    drv = make_driver(fake, sleeps)
    seed_published(fake, "ubuntu-20.04-20261101.1")
    failures = list(_flow_and_failures(fake, drv, sleeps, log, tmp_path))
    assert len(failures) == 6
    errors = [text for e in failures for text in (str(e), repr(e), *traceback.format_exception(e))]
    out, err = capfd.readouterr()
    texts = [out, err, log.out.getvalue(), caplog.text, repr(drv), str(drv.__dict__), *errors]
    for text in texts:
        assert TOKEN not in text and PASSWORD not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files  # the check key pair, at least
    for path in files:
        assert TOKEN.encode() not in path.read_bytes()
        assert PASSWORD.encode() not in path.read_bytes()
    # Used, and only where they belong: the password in logins, the token in a header.
    assert all(r.authorization.startswith(TOKEN) for r in fake.requests if r.site != "identity")
    for request in fake.requests:
        sent = f"{request.path} {request.query} {json.dumps(request.body)}"
        assert TOKEN not in sent
        assert (PASSWORD in sent) == (request.path == "/v3/auth/tokens")


def _flow_and_failures(fake, drv, sleeps, log, tmp_path) -> Iterator[Exception]:
    """The full flow, then the errors a user would see, with the real credentials set."""
    image = fake.seed_image()
    with clouds.launched(drv, image, tmp_path / "work", log):
        fake.revoke_tokens()  # a renewal mid-run
    clouds.publish(drv, image, NAME, DESCRIPTION, 1, log)
    failing = [
        lambda: drv.create_server("x", "0b8e7f4e-3c0a-4f6e-9a55-2d1f0c9e8b71", "", CHECK_LABELS),
        lambda: _failing_listing(fake, make_driver(fake, sleeps, retries=0)),
        lambda: drv._clients["image"].request("DELETE", f"/v2/images/{image}"),
        lambda: drv.server_address("0b8e7f4e-3c0a-4f6e-9a55-2d1f0c9e8b71"),
        lambda: make_driver(fake, sleeps, env={"OS_PASSWORD": PASSWORD + "x"}),
        lambda: make_driver(fake, sleeps, env={"OS_REGION_NAME": ""}),
    ]
    for call in failing:
        try:
            call()
        except Exception as exc:
            yield exc


def _failing_listing(fake: FakeOpenStack, drv: openstack.OpenStackDriver) -> None:
    fake.faults.append(Fault(500))
    drv.servers_labelled(CHECK_LABELS)


# --- measure -------------------------------------------------------------------------------


@pytest.mark.parametrize("older", [0, 3])
def test_measure_the_full_flow(fake, sleeps, boot, log, tmp_path, older) -> None:
    """API calls and wall time of login → launch → destroy → verdict → publish (+ retention),
    as one driver does them (CloudProvider makes a new driver, i.e. one login, per verb)."""
    for n in range(older):
        seed_published(fake, f"ubuntu-20.04-2026110{n}.1")
    image = fake.seed_image()
    started = time.monotonic()
    drv = make_driver(fake, sleeps)
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.record_verdict(drv, image, "certified")
    clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    elapsed = time.monotonic() - started
    by_call: dict[str, int] = {}
    for call, count in drv.stats.by_call.items():
        shape = UUID_IN_PATH.sub("/{id}", call)
        by_call[shape] = by_call.get(shape, 0) + count
    print(
        f"\nOpenStack full flow ({older} older published, keep 2): {drv.stats.calls} calls, "
        f"{elapsed:.3f} s wall, {drv.stats.seconds:.3f} s in HTTP\n"
        + json.dumps(by_call, indent=1, sort_keys=True)
    )
    assert drv.stats.retries == 0
    assert drv.stats.calls == len(fake.requests)
    assert len(fake.images) == min(older + 1, 2)
