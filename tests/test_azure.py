"""The Azure driver against a local fake of Entra ID and Resource Manager
(tests/fakes/azure_api.py): the client-credentials login and its renewals, every verb's
request shapes, ARM's long-running operations, the generic launch/publish/retention flow
(also through CloudProvider), HTTP faults, a run killed between launch and destroy, and that
neither the client secret nor a token ever leaks."""

from __future__ import annotations

import base64
import contextlib
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

from imagefactory import azure, clouds
from imagefactory.cloudapi import CloudAPIError
from imagefactory.clouds import MANAGED, ROLE, VERDICT, CloudError
from imagefactory.definitions import AzureSettings
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS, CloudProvider
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog
from tests.fakes.azure_api import CLIENT_ID, GROUP, LOCATION, SUBSCRIPTION, TENANT, FakeAzure
from tests.fakes.cloud_server import Fault

# Distinctive: searched for everywhere afterwards. Every token the fake issues starts so.
TOKEN = "eyJ0eXAi-TEST-token-Qm7Zx2"
SECRET = "az~TEST.secret_8Q~pL3 v%&="  # form-encoding matters: a space, % and &
TIMINGS = {"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}
CHECK_LABELS = MANAGED | {ROLE: "check-instance"}
PUBLISHED = MANAGED | {ROLE: "image", VERDICT: "published"}
NAME = "ubuntu-20.04-20261126.1"
DESCRIPTION = f"{NAME}: Ubuntu 20.04 for strongSwan, certified by imagefactory"
GROUP_PATH = f"/arm/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers"
COMPUTE = f"{GROUP_PATH}/Microsoft.Compute"
NETWORK = f"{GROUP_PATH}/Microsoft.Network"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGm0kXbQx8l2x7Yc4mJmD0cJ8zO7Q0e0pJq3V2t9Hq1a check"
USER_DATA = clouds.check_user_data(KEY)


SETTINGS = AzureSettings(
    publisher="Canonical",
    offer="0001-com-ubuntu-server-focal",
    sku="20_04-lts-gen2",
    location=LOCATION,
    resource_group=GROUP,
)
GALLERY = SETTINGS.model_copy(
    update={"gallery": "imagefactory", "publish_regions": ["northeurope"]}
)


@pytest.fixture
def fake() -> Iterator[FakeAzure]:
    cloud = FakeAzure(token=TOKEN, client_secret=SECRET)
    cloud.start()
    yield cloud
    cloud.stop()
    assert cloud.handler_errors == []


@pytest.fixture
def sleeps() -> list[float]:
    return []  # what the clients were told to sleep (retries), instead of sleeping


@pytest.fixture
def polls() -> list[float]:
    return []  # the driver's pauses between looks at long-running operations


def make_driver(
    fake: FakeAzure,
    sleeps: list[float],
    polls: list[float] | None = None,
    settings: AzureSettings = SETTINGS,
    env: dict[str, str] | None = None,
    **options,
) -> azure.AzureDriver:
    options = {"sleep": sleeps.append, "timeout": (1, 2), "backoff": 1.0} | options
    made = azure.driver(settings, fake.environment(**(env or {})), **options)
    made.sleep = (polls if polls is not None else []).append
    return made


@pytest.fixture
def drv(fake: FakeAzure, sleeps: list[float], polls: list[float]) -> azure.AzureDriver:
    return make_driver(fake, sleeps, polls)


@pytest.fixture
def boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SSH into the fake: the instance is "ready" as soon as it has an address."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *a, **k: (TIMINGS, "running"))
    monkeypatch.setattr(clouds, "POLL_S", 0)


@pytest.fixture
def log() -> StepLog:
    return StepLog(out=io.StringIO())


def calls(fake: FakeAzure, start: int = 0) -> list[str]:
    return [f"{r.method} {r.path}" for r in fake.requests[start:]]


def logins(fake: FakeAzure) -> list:
    return fake.calls("POST", "/entra/")


def body(fake: FakeAzure, method: str, path: str) -> dict:
    [sent] = fake.calls(method, path)
    return sent.body


def seed_published(fake: FakeAzure, name: str) -> str:
    return fake.seed_image(name, PUBLISHED | {"imagefactory-image": name.rsplit("-", 1)[0]})


# --- configuration and login ----------------------------------------------------------------


def test_missing_variables_are_named_in_one_line() -> None:
    with pytest.raises(ConfigError) as missing:
        azure.driver(SETTINGS, {})
    assert str(missing.value) == (
        "Microsoft Azure: set ARM_CLIENT_ID, ARM_CLIENT_SECRET, ARM_TENANT_ID, "
        "ARM_SUBSCRIPTION_ID (a service principal's credentials); they are read from the "
        "environment only"
    )
    partial = {"ARM_CLIENT_ID": CLIENT_ID, "ARM_TENANT_ID": TENANT, "ARM_CLIENT_SECRET": " "}
    with pytest.raises(ConfigError, match=r"^Microsoft Azure: set ARM_CLIENT_SECRET, ARM_SUB"):
        azure.driver(SETTINGS, partial)


def test_login_posts_the_client_credentials_form_and_arm_gets_the_token(fake, drv) -> None:
    [login] = logins(fake)
    assert login.path == f"/entra/{TENANT}/oauth2/v2.0/token"
    assert login.authorization == "" and login.content_type == "application/x-www-form-urlencoded"
    assert login.body == {
        "client_id": [CLIENT_ID],
        "client_secret": [SECRET],
        "grant_type": ["client_credentials"],
        "scope": ["https://management.azure.com/.default"],
    }
    drv.servers_labelled(CHECK_LABELS)
    arm = fake.requests[1:]
    assert {r.authorization for r in arm} == {f"Bearer {TOKEN}1"}
    assert {r.query["api-version"][0] for r in arm} == {"2023-03-01", "2023-05-01"}
    assert (drv.title, drv.login_user, drv.ssh_port) == ("Microsoft Azure", "ubuntu", 22)
    assert drv.stats.by_call["POST /{id}/oauth2/v2.0/token"] == 1


def test_the_token_is_renewed_before_it_expires_and_once_on_401(fake, sleeps) -> None:
    now = [1000.0]
    drv = make_driver(fake, sleeps)
    drv.clock = lambda: now[0]
    drv.login()  # with this clock: renewal due at 1000 + 3599 - 300
    now[0] += 3599 - 300 - 1
    drv.servers_labelled(CHECK_LABELS)
    assert len(logins(fake)) == 2
    now[0] += 2
    drv.images_labelled(PUBLISHED)
    assert len(logins(fake)) == 3  # renewed ahead of the call, not after a refusal
    fake.revoke_tokens()
    assert drv.images_labelled(PUBLISHED) == []
    assert len(logins(fake)) == 4
    listings = [r.authorization for r in fake.calls("GET", f"{COMPUTE}/images")]
    assert listings[-2:] == [f"Bearer {TOKEN}3", f"Bearer {TOKEN}4"]  # refused, then again
    fake.revoke_tokens()
    fake.client_secret = "rotated meanwhile"
    with pytest.raises(CloudAPIError, match=r"HTTP 401"):
        drv.delete_server("imagefactory-check-1")
    assert len(logins(fake)) == 5


def test_a_wrong_secret_is_one_line_without_the_secret(fake, sleeps) -> None:
    wrong = "az~WRONG-secret-Hq4Tz8"
    with pytest.raises(CloudAPIError) as refused:
        make_driver(fake, sleeps, env={"ARM_CLIENT_SECRET": wrong})
    assert str(refused.value) == (
        "Microsoft Entra ID: POST /" + TENANT + "/oauth2/v2.0/token: HTTP 401: Unauthorized "
        "(check ARM_TENANT_ID, ARM_CLIENT_ID and ARM_CLIENT_SECRET)"
    )
    assert wrong not in str(refused.value) and sleeps == []  # a refusal is not retried


def test_image_ids_full_or_bare_and_the_secret_kept_out_of_reprs(drv) -> None:
    full = f"{COMPUTE.removeprefix('/arm')}/images/{NAME}"
    assert drv.image_id(f"{full}\n") == full
    assert drv.image_id(NAME) == full
    lowered = full.replace("resourceGroups", "resourcegroups")  # ARM ids are case-insensitive
    assert drv.image_id(lowered) == lowered
    for bad in ("nyc3:123456", f"{full}/../x", f"{full}?api-version=1", "a/b"):
        with pytest.raises(ConfigError, match="is not a managed image id"):
            drv.image_id(bad)
    for text in (repr(drv), repr(drv.credentials), str(drv.__dict__)):
        assert SECRET not in text and TOKEN not in text


# --- check instances ------------------------------------------------------------------------


def test_create_server_makes_network_ip_nic_and_vm_in_documented_shapes(fake, drv) -> None:
    image = fake.seed_image(NAME)
    assert drv.create_server("imagefactory-check-1", image, USER_DATA, CHECK_LABELS) == (
        "imagefactory-check-1"
    )
    puts = [c for c in calls(fake) if c.startswith("PUT")]
    assert puts == [
        f"PUT {NETWORK}/networkSecurityGroups/imagefactory-check-nsg",
        f"PUT {NETWORK}/virtualNetworks/imagefactory-check-vnet",
        f"PUT {NETWORK}/publicIPAddresses/imagefactory-check-1-ip",
        f"PUT {NETWORK}/networkInterfaces/imagefactory-check-1-nic",
        f"PUT {COMPUTE}/virtualMachines/imagefactory-check-1",
    ]
    nsg = body(fake, "PUT", f"{NETWORK}/networkSecurityGroups/")
    [rule] = nsg["properties"]["securityRules"]
    assert rule["properties"] | {"name": rule["name"]} == {
        "name": "ssh-in", "protocol": "Tcp", "sourceAddressPrefix": "*",
        "sourcePortRange": "*", "destinationAddressPrefix": "*", "destinationPortRange": "22",
        "access": "Allow", "direction": "Inbound", "priority": 1000,
    }  # fmt: skip
    vnet = body(fake, "PUT", f"{NETWORK}/virtualNetworks/")["properties"]
    nsg_id = f"{NETWORK.removeprefix('/arm')}/networkSecurityGroups/imagefactory-check-nsg"
    assert vnet["subnets"] == [
        {"name": "default", "properties": {"addressPrefix": "10.73.0.0/24",
                                           "networkSecurityGroup": {"id": nsg_id}}}
    ]  # fmt: skip
    ip = body(fake, "PUT", f"{NETWORK}/publicIPAddresses/")
    assert ip == {
        "location": LOCATION, "tags": CHECK_LABELS, "sku": {"name": "Standard", "tier": "Regional"},
        "properties": {"publicIPAllocationMethod": "Static", "publicIPAddressVersion": "IPv4"},
    }  # fmt: skip
    nic = body(fake, "PUT", f"{NETWORK}/networkInterfaces/")
    [config] = nic["properties"]["ipConfigurations"]
    assert config["properties"]["subnet"]["id"].endswith(
        "/virtualNetworks/imagefactory-check-vnet/subnets/default"
    )
    assert config["properties"]["publicIPAddress"]["id"].endswith("/imagefactory-check-1-ip")
    vm = body(fake, "PUT", f"{COMPUTE}/virtualMachines/")
    assert vm["tags"] == CHECK_LABELS and vm["location"] == LOCATION
    props = vm["properties"]
    assert props["hardwareProfile"] == {"vmSize": "Standard_B1s"}
    assert props["storageProfile"] == {
        "imageReference": {"id": image},
        "osDisk": {"createOption": "FromImage", "deleteOption": "Delete",
                   "managedDisk": {"storageAccountType": "Standard_LRS"}},
    }  # fmt: skip
    assert props["osProfile"] == {
        "computerName": "imagefactory-check-1",
        "adminUsername": "ubuntu",
        "customData": base64.b64encode(USER_DATA.encode()).decode(),
        "linuxConfiguration": {
            "disablePasswordAuthentication": True,
            "ssh": {"publicKeys": [{"path": "/home/ubuntu/.ssh/authorized_keys", "keyData": KEY}]},
        },
    }
    [reference] = props["networkProfile"]["networkInterfaces"]
    assert reference["properties"] == {"primary": True, "deleteOption": "Delete"}
    assert fake.custom_data["imagefactory-check-1"] == USER_DATA


def test_the_check_network_is_reused(fake, drv, sleeps) -> None:
    image = fake.seed_image(NAME)
    drv.create_server("imagefactory-check-1", image, USER_DATA, CHECK_LABELS)
    drv.create_server("imagefactory-check-2", image, USER_DATA, CHECK_LABELS)
    other = make_driver(fake, sleeps)  # a later run: one look at the subnet, no PUTs
    other.create_server("imagefactory-check-3", image, USER_DATA, CHECK_LABELS)
    assert len(fake.calls("PUT", f"{NETWORK}/virtualNetworks/")) == 1
    assert len(fake.calls("PUT", f"{NETWORK}/networkSecurityGroups/")) == 1
    assert len(fake.calls("GET", f"{NETWORK}/virtualNetworks/")) == 2  # first run, later run
    assert fake.names("Microsoft.Compute/virtualMachines") == {
        f"imagefactory-check-{n}" for n in (1, 2, 3)
    }


def test_long_running_operations_are_followed_at_the_pace_arm_asks(fake, drv, polls) -> None:
    fake.polls_until_done, fake.retry_after = 2, "7"
    drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, CHECK_LABELS)
    # NSG, VNet, IP and NIC: each polled until Succeeded (InProgress twice), waiting as told.
    operations = fake.calls("GET", f"/arm/subscriptions/{SUBSCRIPTION}/providers/")
    assert len(operations) == 4 * 3
    assert polls == [7.0] * 12
    assert fake.of_type("Microsoft.Network/networkInterfaces")[0]["properties"][
        "provisioningState"
    ] == ("Succeeded")


def test_user_data_without_a_key_is_refused(fake, drv) -> None:
    with pytest.raises(ConfigError, match="the user data authorises no SSH key"):
        drv.create_server("c", fake.seed_image(NAME), "#cloud-config\n{}\n", CHECK_LABELS)


def test_server_address_once_the_vm_succeeded(fake, drv) -> None:
    fake.polls_until_done = 2
    server = drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, {})
    assert [drv.server_address(server) for _ in range(3)] == [None, None, "127.0.0.1"]


def test_a_failed_vm_is_an_error_with_arms_message(fake, drv) -> None:
    fake.failing_vms = "Allocation failed. We do not have sufficient capacity for Standard_B1s."
    server = drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, {})
    assert drv.server_address(server) is None
    with pytest.raises(CloudError) as failed:
        drv.server_address(server)
    assert str(failed.value) == (
        "Microsoft Azure: VM imagefactory-check-1 is Failed: Allocation failed. We do not have "
        "sufficient capacity for Standard_B1s."
    )


def test_a_failed_operation_surfaces_its_error_message(fake, drv) -> None:
    fake.failing_vms = "QuotaExceeded: 0 of 4 cores left"
    drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, {})
    vm = fake.of_type("Microsoft.Compute/virtualMachines")[0]
    again = {k: vm[k] for k in ("location", "tags", "properties")}
    again["properties"]["osProfile"]["customData"] = ""
    with pytest.raises(CloudError) as failed:
        drv._put(drv._vm_path("imagefactory-check-1"), azure.COMPUTE_API, again)
    assert str(failed.value) == (
        "Microsoft Azure: virtualMachines/imagefactory-check-1: Failed: "
        "QuotaExceeded: 0 of 4 cores left"
    )


def test_delete_server_goes_vm_nic_ip_and_a_missing_one_is_fine(fake, drv) -> None:
    server = drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, {})
    before = len(fake.requests)
    drv.delete_server(server)
    deletes = [c for c in calls(fake, before) if c.startswith("DELETE")]
    assert deletes == [
        f"DELETE {COMPUTE}/virtualMachines/{server}",
        f"DELETE {NETWORK}/networkInterfaces/{server}-nic",  # gone with the VM already: 204
        f"DELETE {NETWORK}/publicIPAddresses/{server}-ip",
    ]
    for kind in ("Compute/virtualMachines", "Network/networkInterfaces",
                 "Network/publicIPAddresses"):  # fmt: skip
        assert fake.of_type(f"Microsoft.{kind}") == []
    drv.delete_server(server)
    drv.delete_server("never-existed")


def test_an_attached_nic_cannot_go_first(fake, drv) -> None:
    """Why delete_server waits for each deletion: ARM refuses to delete what is in use."""
    server = drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, {})
    drv.server_address(server)
    with pytest.raises(CloudAPIError, match=r"HTTP 400: imagefactory-check-1-ip is in use"):
        drv._delete(drv._ip_id(server), azure.NETWORK_API)


def test_servers_labelled_follows_next_links_and_finds_half_made_instances(fake, drv) -> None:
    image = fake.seed_image(NAME)
    for n in range(3):
        drv.create_server(f"imagefactory-check-{n}", image, USER_DATA, CHECK_LABELS)
    drv.create_server("web-1", image, USER_DATA, {"team": "web"})
    drv.create_server("imagefactory-check-img", image, USER_DATA, MANAGED | {ROLE: "image"})
    # A run killed after making its IP, before its NIC and VM:
    drv._put(drv._ip_id("imagefactory-check-9"), azure.NETWORK_API, _ip_body())
    before = len(fake.requests)
    assert drv.servers_labelled(CHECK_LABELS) == [
        "imagefactory-check-0", "imagefactory-check-1", "imagefactory-check-2",
        "imagefactory-check-9",
    ]  # fmt: skip
    pages = fake.calls("GET", f"{COMPUTE}/virtualMachines")
    assert [p.query.get("$skiptoken") for p in pages] == [None, ["2"], ["4"]]
    assert len(fake.requests) - before == 3 + 3 + 3  # VMs (5), NICs (5), IPs (6): 2 a page
    drv.delete_server("imagefactory-check-9")
    assert "imagefactory-check-9-ip" not in fake.names("Microsoft.Network/publicIPAddresses")


def _ip_body() -> dict:
    return {
        "location": LOCATION,
        "tags": CHECK_LABELS,
        "sku": {"name": "Standard"},
        "properties": {"publicIPAllocationMethod": "Static"},
    }


# --- images ---------------------------------------------------------------------------------


def test_label_image_merges_tags_and_keeps_packers(fake, drv) -> None:
    packer_tags = {"imagefactory-image": "ubuntu-20.04", "imagefactory-serial": "20261126.1"}
    image = fake.seed_image(NAME, packer_tags)
    drv.label_image(image, MANAGED | {ROLE: "image", VERDICT: "certified"})
    drv.label_image(image, MANAGED | {ROLE: "image", VERDICT: "published"})
    assert fake.resources[image.lower()]["tags"] == packer_tags | PUBLISHED
    [first, _] = fake.calls("PATCH")
    assert first.path == f"/arm{image}/providers/Microsoft.Resources/tags/default"
    assert first.query == {"api-version": ["2021-04-01"]}
    assert first.body == {
        "operation": "Merge",
        "properties": {"tags": MANAGED | {ROLE: "image", VERDICT: "certified"}},
    }
    with pytest.raises(ConfigError, match="cannot be an ARM tag"):
        drv.label_image(image, {"a/b": "c"})


def test_images_labelled_follows_pages(fake, drv) -> None:
    published = [seed_published(fake, f"ubuntu-20.04-2026110{n}.1") for n in range(3)]
    fake.seed_image("ubuntu-20.04-20261109.1", MANAGED | {ROLE: "image", VERDICT: "rejected"})
    fake.seed_image("someone-elses")
    found = drv.images_labelled(PUBLISHED)
    assert [i.id for i in found] == published
    assert found[0] == clouds.CloudImage(
        published[0],
        "ubuntu-20.04-20261100.1",
        fake.resources[published[0].lower()]["systemData"]["createdAt"],
        PUBLISHED | {"imagefactory-image": "ubuntu-20.04"},
    )
    assert len(fake.calls("GET", f"{COMPUTE}/images")) == 3


def test_delete_image_follows_the_location_and_a_missing_one_is_fine(fake, drv, polls) -> None:
    image = seed_published(fake, NAME)
    before = len(fake.requests)
    drv.delete_image(image)
    assert image.lower() not in fake.resources
    polled = [r for r in fake.requests[before:] if "/operationResults/" in r.path]
    assert len(polled) == 2 and polls == [3.0, 3.0]  # 202 (Retry-After 3), then 204
    drv.delete_image(image)
    assert calls(fake, len(fake.requests) - 1) == [f"GET /arm{image}"]


def test_publish_tags_name_and_description_without_a_gallery(fake, drv) -> None:
    image = fake.seed_image(NAME)
    assert drv.publish_image(image, NAME, DESCRIPTION) == [f"managed image {NAME} (westeurope)"]
    assert fake.resources[image.lower()]["tags"] == {
        "imagefactory-name": NAME,
        "imagefactory-description": DESCRIPTION,
    }


def test_publish_to_a_gallery_and_retention_removes_the_version(fake, sleeps, polls) -> None:
    drv = make_driver(fake, sleeps, polls, GALLERY)
    fake.seed_gallery_image("imagefactory", "ubuntu-20.04")
    image = fake.seed_image(NAME)
    where = drv.publish_image(image, NAME, DESCRIPTION)
    version_path = f"{COMPUTE}/galleries/imagefactory/images/ubuntu-20.04/versions/2026.1126.1"
    assert where == [
        f"managed image {NAME} (westeurope)",
        "gallery version imagefactory/images/ubuntu-20.04/versions/2026.1126.1 "
        "(westeurope, northeurope)",
    ]
    [put] = fake.calls("PUT", version_path)
    assert put.query == {"api-version": ["2022-03-03"]}
    assert put.body["properties"] == {
        "storageProfile": {"source": {"id": image}},
        "publishingProfile": {
            "replicaCount": 1,
            "storageAccountType": "Standard_LRS",
            "targetRegions": [
                {"name": "westeurope", "regionalReplicaCount": 1},
                {"name": "northeurope", "regionalReplicaCount": 1},
            ],
        },
    }
    [version] = fake.of_type("Microsoft.Compute/galleries/images/versions")
    assert version["properties"]["provisioningState"] == "Succeeded"
    assert fake.resources[image.lower()]["tags"]["imagefactory-gallery-version"] == version["id"]
    drv.delete_image(image)
    assert fake.of_type("Microsoft.Compute/galleries/images/versions") == []
    assert image.lower() not in fake.resources


def test_a_gallery_without_the_image_definition_is_arms_404(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, settings=GALLERY)
    with pytest.raises(CloudAPIError, match=r"HTTP 404: .*/images/ubuntu-20.04 not found"):
        drv.publish_image(fake.seed_image(NAME), NAME, DESCRIPTION)
    with pytest.raises(ConfigError, match=r"has no YYYYMMDD\.N serial"):
        drv.publish_image(fake.seed_image("packer-x"), "packer-x", DESCRIPTION)


# --- the generic flow over this driver --------------------------------------------------------


def test_full_flow_launch_destroy_verdict_publish_retention(fake, drv, boot, log, tmp_path) -> None:
    old = [seed_published(fake, f"ubuntu-20.04-2026112{n}.1") for n in range(3)]
    other_family = [seed_published(fake, f"ubuntu-22.04-2026112{n}.1") for n in range(3)]
    image = fake.seed_image(NAME)

    assert clouds.sweep(drv, log) == []
    with clouds.launched(drv, drv.image_id(image), tmp_path / "work", log) as instance:
        [vm] = fake.of_type("Microsoft.Compute/virtualMachines")
        assert vm["tags"] == CHECK_LABELS
        user_data = fake.custom_data[vm["name"]]
        public_key = (tmp_path / "work/ssh/id_ed25519.pub").read_text().strip()
        assert yaml.safe_load(user_data)["ssh_authorized_keys"] == [public_key]
        keys = vm["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"]
        assert [k["keyData"] for k in keys] == instance.allowed_keys == [public_key]
        assert instance.target.label == "ubuntu@127.0.0.1:22"
    for kind in ("Compute/virtualMachines", "Network/networkInterfaces",
                 "Network/publicIPAddresses"):  # fmt: skip
        assert fake.of_type(f"Microsoft.{kind}") == []

    clouds.record_verdict(drv, image, "certified")
    assert fake.resources[image.lower()]["tags"][VERDICT] == "certified"
    assert clouds.publish(drv, image, NAME, DESCRIPTION, 2, log) == [
        f"managed image {NAME} (westeurope)"
    ]
    assert fake.resources[image.lower()]["tags"][VERDICT] == "published"
    images = {r["id"] for r in fake.of_type("Microsoft.Compute/images")}
    assert images == {old[2], image, *other_family}  # retention: this family's two oldest
    assert "retention (keep 2): deleting ubuntu-20.04-20261120.1" in log.out.getvalue()


def test_launched_destroys_a_vm_that_fails(fake, drv, boot, log, tmp_path) -> None:
    fake.failing_vms = "OSProvisioningTimedOut"
    with (
        pytest.raises(CloudError, match="is Failed: OSProvisioningTimedOut"),
        clouds.launched(drv, fake.seed_image(NAME), tmp_path / "work", log),
    ):
        pass
    assert fake.of_type("Microsoft.Compute/virtualMachines") == []
    assert fake.of_type("Microsoft.Network/publicIPAddresses") == []


def test_launched_destroys_when_the_checks_raise(fake, drv, boot, log, tmp_path) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        clouds.launched(drv, fake.seed_image(NAME), tmp_path / "work", log),
    ):
        raise KeyboardInterrupt
    assert fake.of_type("Microsoft.Network/publicIPAddresses") == []


AZURE_PROVIDER = CloudProvider(
    name="azure-arm",
    title="Microsoft Azure",
    plugin_source="github.com/hashicorp/azure",
    secret_env=("ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_SUBSCRIPTION_ID", "ARM_TENANT_ID"),
    aliases=("azure",),
    build_user="packer",
    driver_module="azure",
)


def test_the_flow_through_a_cloud_provider_for_this_driver(
    fake, boot, log, tmp_path, monkeypatch
) -> None:
    """CloudProvider imports imagefactory.azure and calls driver(settings) with the real
    environment and no test options: operations must be quick in the fake."""
    fake.polls_until_done, fake.retry_after = 0, "0"
    for name, value in fake.environment().items():
        monkeypatch.setenv(name, value)
    old = seed_published(fake, "ubuntu-20.04-20261001.1")
    image = fake.seed_image(NAME)
    definition = SimpleNamespace(provider=lambda name: SETTINGS, release="20.04")
    record = SimpleNamespace(
        artifact=image, image="ubuntu-20.04", serial="20261126.1", certification=None,
        state="certified", sha256="0" * 64,
    )  # fmt: skip
    AZURE_PROVIDER.recover(definition, SimpleNamespace(), log)
    with AZURE_PROVIDER.instance(record, definition, tmp_path / "work", tmp_path, log) as inst:
        assert inst.target.label == "ubuntu@127.0.0.1:22"
        assert len(fake.of_type("Microsoft.Compute/virtualMachines")) == 1
    AZURE_PROVIDER.record_verdict(record, definition, log)
    where = AZURE_PROVIDER.publish(record, definition, SimpleNamespace(keep=1), log)
    assert where == f"Microsoft Azure image {image} (managed image {NAME} (westeurope))"
    assert fake.resources[image.lower()]["tags"][VERDICT] == "published"
    assert old.lower() not in fake.resources
    assert fake.of_type("Microsoft.Compute/virtualMachines") == []


def test_the_azure_provider_uses_this_driver() -> None:
    provider = PROVIDERS["azure-arm"]
    assert isinstance(provider, CloudProvider)
    assert provider.driver_module == "azure"


# --- HTTP faults ---------------------------------------------------------------------------


def test_429_honours_retry_after(fake, drv, sleeps) -> None:
    fake.faults.append(Fault(429, retry_after="7", path=f"{COMPUTE}/virtualMachines"))
    assert drv.servers_labelled(CHECK_LABELS) == []
    assert sleeps == [7.0] and drv.stats.retries == 1


def test_5xx_on_gets_and_puts_is_retried_arm_puts_are_idempotent(fake, drv, sleeps) -> None:
    fake.faults += [Fault(503, method="GET"), Fault(500, method="PUT", path=f"{COMPUTE}/")]
    drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, CHECK_LABELS)
    assert len(fake.calls("PUT", f"{COMPUTE}/virtualMachines/")) == 2
    assert len(fake.of_type("Microsoft.Compute/virtualMachines")) == 1
    assert sleeps == [1.0, 1.0]


def test_5xx_on_the_tags_patch_and_the_login_is_retried(fake, sleeps) -> None:
    fake.faults.append(Fault(502, path="/entra/"))
    drv = make_driver(fake, sleeps)
    assert len(logins(fake)) == 2
    image = fake.seed_image(NAME)
    fake.faults.append(Fault(500, method="PATCH"))
    drv.label_image(image, MANAGED)
    assert len(fake.calls("PATCH")) == 2 and sleeps == [1.0, 1.0]


def test_a_timeout_is_one_line(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.3), retries=0)
    fake.faults.append(Fault(delay=0.6, method="GET", path=f"{COMPUTE}/images"))
    with pytest.raises(CloudAPIError) as timeout:
        drv.images_labelled(PUBLISHED)
    assert str(timeout.value) == (
        f"Azure Resource Manager: GET /subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}"
        "/providers/Microsoft.Compute/images: ReadTimeout"
    )


def test_a_timed_out_vm_put_is_sent_again_and_makes_one_vm(fake, sleeps) -> None:
    drv = make_driver(fake, sleeps, timeout=(1, 0.3))
    fake.faults.append(Fault(delay=0.6, method="PUT", path=f"{COMPUTE}/virtualMachines/"))
    drv.create_server("imagefactory-check-1", fake.seed_image(NAME), USER_DATA, CHECK_LABELS)
    assert len(fake.of_type("Microsoft.Compute/virtualMachines")) == 1


def test_an_operation_that_never_ends_times_out(fake, drv) -> None:
    fake.polls_until_done = 10**6
    drv.operation_timeout_s = -1
    with pytest.raises(CloudError, match=r"networkSecurityGroups/imagefactory-check-nsg: not done"):
        drv.create_server("c", fake.seed_image(NAME), USER_DATA, CHECK_LABELS)


# --- a run killed between launch and destroy ------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import azure, clouds
from imagefactory.definitions import AzureSettings
from imagefactory.steps import StepLog

clouds.POLL_S = 0
clouds.wait_until_ready = lambda *args, **kwargs: ({}, "running")  # no SSH into a fake
settings = AzureSettings(publisher="p", offer="o", sku="s", location=sys.argv[3],
                         resource_group=sys.argv[4])
driver = azure.driver(settings)
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_an_instance_the_next_sweep_removes(fake, drv, log, tmp_path) -> None:
    fake.retry_after = "0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARM_", "AZURE_"))}
    env |= fake.environment()
    args = [sys.executable, "-c", CHILD, fake.seed_image(NAME), str(tmp_path / "work"),
            LOCATION, GROUP]  # fmt: skip
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
    assert TOKEN not in stderr and SECRET not in stderr
    [left] = fake.names("Microsoft.Compute/virtualMachines")

    assert clouds.sweep(drv, log) == [left]
    for kind in ("Compute/virtualMachines", "Network/networkInterfaces",
                 "Network/publicIPAddresses"):  # fmt: skip
        assert fake.of_type(f"Microsoft.{kind}") == []
    assert f"destroying check instance {left} left by an earlier run" in log.out.getvalue()
    assert clouds.sweep(drv, log) == []


# --- neither the secret nor a token appears anywhere -----------------------------------------


def test_secret_and_token_appear_nowhere(fake, sleeps, boot, log, tmp_path, capfd, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    drv = make_driver(fake, sleeps)
    seed_published(fake, "ubuntu-20.04-20261101.1")
    image = fake.seed_image(NAME)
    with clouds.launched(drv, image, tmp_path / "work", log):
        fake.revoke_tokens()  # a renewal mid-run
    clouds.publish(drv, image, NAME, DESCRIPTION, 1, log)
    failures = []
    for call in (
        lambda: make_driver(fake, sleeps, env={"ARM_CLIENT_SECRET": SECRET + "x"}),
        lambda: make_driver(fake, sleeps, retries=0).servers_labelled(CHECK_LABELS),
        lambda: drv.create_server("x", image + "-missing", USER_DATA, CHECK_LABELS),
        lambda: drv.image_id(SECRET),
    ):
        fake.faults.append(Fault(500, method="GET"))
        try:
            call()
        except Exception as exc:
            failures.append(exc)
        with contextlib.suppress(ValueError):
            fake.faults.clear()
    assert len(failures) == 4
    errors = [text for e in failures for text in (str(e), repr(e), *traceback.format_exception(e))]
    errors = [e.replace(repr(SECRET), "") for e in errors]  # image_id quotes what it was given
    out, err = capfd.readouterr()
    texts = [out, err, log.out.getvalue(), caplog.text, repr(drv), str(drv.__dict__), *errors]
    for text in texts:
        assert TOKEN not in text and SECRET not in text
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        assert TOKEN.encode() not in path.read_bytes() and SECRET.encode() not in path.read_bytes()
    for request in fake.requests:
        sent = f"{request.path} {request.query} {json.dumps(request.body)}"
        assert TOKEN not in sent
        assert (SECRET in sent) == request.path.startswith("/entra/")
        assert request.authorization.startswith(f"Bearer {TOKEN}") != request.path.startswith(
            "/entra/"
        )


# --- measure -------------------------------------------------------------------------------

NAMES = re.compile(r"(imagefactory-check-[0-9a-f]{12}|ubuntu-\d+\.\d+-\d{8}\.\d+|[0-9a-f-]{36})")


@pytest.mark.parametrize("older", [0, 3])
def test_measure_the_full_flow(fake, sleeps, polls, boot, log, tmp_path, older) -> None:
    """API calls and wall time of login → sweep → launch → destroy → verdict → publish
    (+ retention), as one driver does them; each operation InProgress once (Retry-After 3)."""
    for n in range(older):
        seed_published(fake, f"ubuntu-20.04-2026110{n}.1")
    image = fake.seed_image(NAME)
    started = time.monotonic()
    drv = make_driver(fake, sleeps, polls)
    clouds.sweep(drv, log)
    with clouds.launched(drv, image, tmp_path / "work", log):
        pass
    clouds.record_verdict(drv, image, "certified")
    clouds.publish(drv, image, NAME, DESCRIPTION, 2, log)
    elapsed = time.monotonic() - started
    by_call: dict[str, int] = {}
    for call, count in drv.stats.by_call.items():
        shape = NAMES.sub("{name}", call).replace(f"/resourceGroups/{GROUP}", "/resourceGroups/rg")
        by_call[shape] = by_call.get(shape, 0) + count
    print(
        f"\nAzure full flow ({older} older published, keep 2): {drv.stats.calls} calls, "
        f"{elapsed:.3f} s wall, {drv.stats.seconds:.3f} s in HTTP, "
        f"{sum(polls):.0f} s of operation waits asked for\n"
        + json.dumps(by_call, indent=1, sort_keys=True)
    )
    assert drv.stats.retries == 0
    assert drv.stats.calls == len(fake.requests)
    assert len(fake.of_type("Microsoft.Compute/images")) == min(older + 1, 2)
