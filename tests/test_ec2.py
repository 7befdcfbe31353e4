"""The EC2 driver against moto's EC2 server on 127.0.0.1 (one per module, reset before each
test): each verb, the launch → destroy → verdict → publish (a copy to a second region, launch
permissions) → retention flow, faults (throttling, 5xx, an unreachable endpoint, unknown AMIs),
a run killed mid-check, and the secret access key kept out of everything."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

import boto3
import botocore.retries.standard
import pytest
import yaml
from botocore.awsrequest import AWSResponse
from moto.ec2.models import ec2_backends
from moto.server import ThreadedMotoServer

from imagefactory import clouds, ec2
from imagefactory.cloudapi import CloudAPIError
from imagefactory.clouds import MANAGED, ROLE, VERDICT, CloudError
from imagefactory.definitions import AmazonSettings
from imagefactory.errors import ConfigError
from imagefactory.providers import PROVIDERS, CloudProvider
from imagefactory.settings import REPO_ROOT
from imagefactory.steps import StepLog

ACCESS_KEY = "AKIAIMAGEFACTORYTEST"
SECRET = "ec2TESTsecret/Zx9VwPlM4nR8+QmZs3TkLa7Yb2Wc"  # distinctive: searched for afterwards
ACCOUNT = "123456789012"  # moto's account
SHARED_WITH = "111122223333"
HOME, AWAY = "us-east-1", "eu-west-1"
READY = ({"ssh": 1.0, "cloud_init": 2.0, "system_ready": 3.0}, "running")
CHECK = MANAGED | {ROLE: "check-instance"}
PUBLISHED = MANAGED | {ROLE: "image", VERDICT: "published"}
NAME = "ubuntu-20.04-20261126.1"
DESCRIPTION = f"{NAME}: Ubuntu 20.04 for strongSwan, certified by imagefactory"


SETTINGS = AmazonSettings(
    owner="099720109477",
    name_filter="ubuntu/images/hvm-ssd/ubuntu-focal-20.04-amd64-server-*",
    publish_regions=[HOME, AWAY],
    launch_permissions=[SHARED_WITH],
)
PLAIN = AmazonSettings(owner="099720109477", name_filter="ubuntu/*")


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        # No stock AMIs: loading 1300 of them takes ~2 s per region and reset.
        patch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture(autouse=True)
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> str:
    """A clean moto, and an environment where boto3 finds only our fake key pair."""
    reset = urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")
    urllib.request.urlopen(reset).close()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    nowhere = tmp_path_factory.mktemp("aws")  # outside tmp_path: that is searched for SECRET
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto_url)
    return moto_url


@pytest.fixture
def drv() -> ec2.EC2Driver:
    driver = ec2.driver(SETTINGS)
    driver.poll_s = 0
    return driver


@pytest.fixture
def no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SSH into moto's instances: ready as soon as they have an address."""
    monkeypatch.setattr(clouds, "wait_until_ready", lambda *args, **kwargs: READY)
    monkeypatch.setattr(clouds, "POLL_S", 0)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """botocore's retry delays are not slept; the attempts that would have slept are kept."""
    attempts: list[int] = []

    def delay(self, context) -> float:
        attempts.append(context.attempt_number)
        return 0.0

    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", delay)
    return attempts


@pytest.fixture
def log() -> StepLog:
    return StepLog(out=io.StringIO())


# --- the cloud as the tests see it (a separate client: its calls are not counted) ------------


def raw(region: str = HOME) -> Any:
    return boto3.client("ec2", region_name=region, endpoint_url=os.environ["AWS_ENDPOINT_URL_EC2"])


def packer_ami(name: str = "packer-1764158400") -> str:
    """An AMI made the way Packer's amazon-ebs makes one: an instance of a base AMI, imaged."""
    client = raw()
    base = client.register_image(Name="ubuntu-focal-base", RootDeviceName="/dev/sda1")
    builder = client.run_instances(ImageId=base["ImageId"], MinCount=1, MaxCount=1)
    builder_id = builder["Instances"][0]["InstanceId"]
    ami = client.create_image(InstanceId=builder_id, Name=name)["ImageId"]
    client.terminate_instances(InstanceIds=[builder_id])
    return ami


def seed_published(name: str, day: int, labels: dict[str, str] = PUBLISHED) -> str:
    """An image an earlier run published on 2026-11-<day>."""
    ami = packer_ami(name)
    raw().create_tags(Resources=[ami], Tags=ec2._tags(labels | {"Name": name}))
    # CreationDate cannot be set through the API; moto keeps it on its (in-process) AMI.
    ec2_backends[ACCOUNT][HOME].amis[ami].creation_date = datetime(2026, 11, day, tzinfo=UTC)
    return ami


def image(ami: str, region: str = HOME) -> dict[str, Any]:
    [found] = raw(region).describe_images(ImageIds=[ami])["Images"]
    return found


def images(region: str = HOME) -> dict[str, dict[str, Any]]:
    return {i["ImageId"]: i for i in raw(region).describe_images(Owners=["self"])["Images"]}


def instances(*states: str) -> list[dict[str, Any]]:
    filters = [{"Name": "instance-state-name", "Values": list(states)}] if states else []
    pages = raw().describe_instances(Filters=filters)["Reservations"]
    return [i for r in pages for i in r["Instances"]]


def tags(resource: dict[str, Any]) -> dict[str, str]:
    return ec2._labels(resource)


def snapshots(region: str = HOME) -> set[str]:
    return {s["SnapshotId"] for s in raw(region).describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def image_snapshots(found: dict[str, Any]) -> set[str]:
    return {m["Ebs"]["SnapshotId"] for m in found["BlockDeviceMappings"] if "Ebs" in m}


def launch_permissions(ami: str, region: str = HOME) -> list[dict[str, str]]:
    client = raw(region)
    return client.describe_image_attribute(ImageId=ami, Attribute="launchPermission")[
        "LaunchPermissions"
    ]


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, *args: object, **kwargs: object) -> Iterator[bytes]:
        yield self.data


def inject(driver: ec2.EC2Driver, operation: str, *faults: tuple[int, str]) -> list[bytes]:
    """The next requests of ``operation`` answered with these (status, code) errors instead of
    reaching moto; returns every request body of it sent (answered by moto or not)."""
    queue, sent = list(faults), []

    def answer(request, **kwargs: object) -> AWSResponse | None:
        body = request.body
        sent.append(body if isinstance(body, bytes) else body.encode())
        if not queue:
            return None
        status, code = queue.pop(0)
        xml = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>injected {code}\nsecond line"
            "</Message></Error></Errors><RequestID>r-1</RequestID></Response>"
        )
        return AWSResponse(request.url, status, {}, _Body(xml.encode()))

    driver.client().meta.events.register(f"before-send.ec2.{operation}", answer)
    return sent


# --- configuration ----------------------------------------------------------------------------


def test_identity_region_endpoint_and_retry_configuration(aws: str) -> None:
    driver = ec2.driver(SETTINGS)
    assert (driver.title, driver.login_user, driver.ssh_port) == ("Amazon EC2", "ubuntu", 22)
    assert (driver.region, driver.endpoint_url) == (HOME, aws)
    client = driver.client()
    assert client.meta.endpoint_url == aws
    assert client.meta.region_name == HOME
    # botocore's max_attempts counts retries: 5 retries, 6 attempts in all.
    assert client.meta.config.retries == {"total_max_attempts": 6, "mode": "standard"}
    assert (client.meta.config.connect_timeout, client.meta.config.read_timeout) == (10, 60)
    assert SECRET not in repr(driver) and ACCESS_KEY not in repr(driver)

    assert ec2.driver(SETTINGS, {"AWS_DEFAULT_REGION": AWAY}).region == AWAY
    both = {"AWS_REGION": "eu-central-1", "AWS_DEFAULT_REGION": AWAY}
    assert ec2.driver(SETTINGS, both).region == "eu-central-1"
    assert ec2.driver(SETTINGS, {"AWS_ENDPOINT_URL": "http://a:1"}).endpoint_url == "http://a:1"
    env = {"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_EC2": "http://b:2"}
    assert ec2.driver(SETTINGS, env).endpoint_url == "http://b:2"
    with pytest.raises(ConfigError, match="is not an http"):
        ec2.driver(SETTINGS, {"AWS_ENDPOINT_URL_EC2": "127.0.0.1:5000"})


def test_botocore_itself_honours_the_endpoint_variables(aws: str, monkeypatch) -> None:
    """Verified for the pinned botocore: AWS_ENDPOINT_URL_EC2 wins over AWS_ENDPOINT_URL."""
    assert boto3.client("ec2", region_name=HOME).meta.endpoint_url == aws
    monkeypatch.delenv("AWS_ENDPOINT_URL_EC2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert boto3.client("ec2", region_name=HOME).meta.endpoint_url == "http://127.0.0.1:9"
    assert ec2.driver(SETTINGS).client().meta.endpoint_url == "http://127.0.0.1:9"


def test_image_id_from_packers_artifact_id(drv: ec2.EC2Driver) -> None:
    assert drv.image_id("us-east-1:ami-0123456789abcdef0") == "ami-0123456789abcdef0"
    assert drv.image_id("eu-west-1:ami-11111111,us-east-1:ami-22222222") == "ami-22222222"
    assert drv.image_id("ami-0123456789abcdef0") == "ami-0123456789abcdef0"
    for wrong in ("eu-west-1:ami-11111111", "us-east-1:snap-11111111", "us-east-1:"):
        with pytest.raises(ConfigError, match=f"has no AMI in {HOME}"):
            drv.image_id(wrong)


@pytest.mark.parametrize("keep", [(), ("AWS_ACCESS_KEY_ID",)])
def test_missing_credentials_is_one_line(monkeypatch, keep: tuple[str, ...]) -> None:
    for name in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} - set(keep):
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as refused:
        ec2.driver(SETTINGS)
    assert str(refused.value) == (
        "Amazon EC2: no AWS credentials "
        "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    )


def test_credentials_from_a_profile(monkeypatch, tmp_path_factory) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path_factory.mktemp("profile") / "credentials"
    profile = {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET}
    credentials.write_text("[factory]\n" + "".join(f"{k} = {v}\n" for k, v in profile.items()))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "factory")
    assert ec2.driver(SETTINGS).servers_labelled(CHECK) == []
    monkeypatch.setenv("AWS_PROFILE", "nonesuch")
    with pytest.raises(ConfigError, match=r"^Amazon EC2: The config profile \(nonesuch\)"):
        ec2.driver(SETTINGS)


# --- each verb --------------------------------------------------------------------------------


def test_create_server(drv: ec2.EC2Driver) -> None:
    ami = packer_ami()
    server = drv.create_server("imagefactory-check-1", ami, "#cloud-config\n{}\n", CHECK)
    [instance] = instances("pending", "running")
    assert instance["InstanceId"] == server
    assert (instance["ImageId"], instance["InstanceType"]) == (ami, "t3.micro")
    assert tags(instance) == CHECK | {"Name": "imagefactory-check-1"}
    attribute = raw().describe_instance_attribute
    user_data = attribute(InstanceId=server, Attribute="userData")["UserData"]["Value"]
    assert base64.b64decode(user_data).decode() == "#cloud-config\n{}\n"
    shutdown = attribute(InstanceId=server, Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"] == {"Value": "terminate"}
    [root] = instance["BlockDeviceMappings"]
    assert root["DeviceName"] == image(ami)["RootDeviceName"]
    [volume] = raw().describe_volumes(VolumeIds=[root["Ebs"]["VolumeId"]])["Volumes"]
    assert tags(volume) == CHECK | {"Name": "imagefactory-check-1"}
    assert drv.stats.by_call == {"DescribeImages": 1, "RunInstances": 1}


def test_create_server_asks_for_the_root_volume_to_go_with_it(drv: ec2.EC2Driver) -> None:
    sent = inject(drv, "RunInstances")
    drv.create_server("c", packer_ami(), "", CHECK)
    assert b"BlockDeviceMapping.1.DeviceName=%2Fdev%2Fsda1" in sent[0]
    assert b"BlockDeviceMapping.1.Ebs.DeleteOnTermination=true" in sent[0]


def test_an_unknown_ami_is_a_one_line_api_error(drv: ec2.EC2Driver) -> None:
    with pytest.raises(CloudAPIError) as refused:
        drv.create_server("c", "ami-0123456789abcdef0", "", CHECK)
    message = str(refused.value)
    assert message.startswith("Amazon EC2: DescribeImages: InvalidAMIID.NotFound: ")
    assert "ami-0123456789abcdef0" in message and "\n" not in message
    assert refused.value.code == "InvalidAMIID.NotFound"
    assert refused.value.status == 400
    with pytest.raises(CloudAPIError, match=r"^Amazon EC2: CreateTags: InvalidAMIID.NotFound: "):
        drv.label_image("ami-0123456789abcdef0", MANAGED)
    assert instances() == []


def test_server_address_once_running(drv: ec2.EC2Driver) -> None:
    server = drv.create_server("c", packer_ami(), "", CHECK)
    [instance] = instances("running")
    assert drv.server_address(server) == instance["PublicIpAddress"]
    assert drv.server_address("i-0123456789abcdef0") is None  # not visible (yet)


def test_server_address_while_pending(drv: ec2.EC2Driver, monkeypatch) -> None:
    server = drv.create_server("c", packer_ami(), "", CHECK)

    def pending(parsed, **kwargs: object) -> None:
        parsed["Reservations"][0]["Instances"][0]["State"] = {"Code": 0, "Name": "pending"}

    drv.client().meta.events.register("after-call.ec2.DescribeInstances", pending)
    assert drv.server_address(server) is None


def test_a_terminated_server_never_gets_an_address(drv: ec2.EC2Driver) -> None:
    server = drv.create_server("c", packer_ami(), "", CHECK)
    raw().terminate_instances(InstanceIds=[server])
    with pytest.raises(CloudError, match=f"instance {server} is (shutting-down|terminated)"):
        drv.server_address(server)


def test_delete_server_twice(drv: ec2.EC2Driver) -> None:
    server = drv.create_server("c", packer_ami(), "", CHECK)
    drv.delete_server(server)
    drv.delete_server(server)  # terminated already: fine
    drv.delete_server("i-0123456789abcdef0")  # never existed: fine
    assert instances("pending", "running") == []
    assert drv.stats.by_call["TerminateInstances"] == 3


def test_servers_labelled_filters_and_follows_pages(drv: ec2.EC2Driver) -> None:
    ami = packer_ami()
    mine = [drv.create_server(f"c{n}", ami, "", CHECK) for n in range(12)]
    drv.create_server("image-role", ami, "", MANAGED | {ROLE: "image"})
    drv.create_server("not-ours", ami, "", {ROLE: "check-instance"})
    gone = drv.create_server("terminated", ami, "", CHECK)
    drv.delete_server(gone)
    drv.page_size = 5
    before = drv.stats.by_call.get("DescribeInstances", 0)
    assert sorted(drv.servers_labelled(CHECK)) == sorted(mine)
    assert drv.stats.by_call["DescribeInstances"] - before == 3  # 5 + 5 + 2


def test_label_image_overwrites_values_and_keeps_other_tags(drv: ec2.EC2Driver) -> None:
    ami = packer_ami()
    raw().create_tags(Resources=[ami], Tags=ec2._tags({"team": "vpn", VERDICT: "certified"}))
    drv.label_image(ami, MANAGED | {VERDICT: "rejected"})
    assert tags(image(ami)) == {"team": "vpn", VERDICT: "rejected", "imagefactory": "true"}
    assert drv.stats.by_call == {"CreateTags": 1}


def test_publish_copies_tags_and_shares(drv: ec2.EC2Driver) -> None:
    ami = packer_ami(NAME)
    clouds.record_verdict(drv, ami, "certified")
    where = drv.publish_image(ami, NAME, DESCRIPTION)

    [copy] = images(AWAY)
    assert where == [f"{HOME} {ami}", f"{AWAY} {copy}"]
    copied = image(copy, AWAY)
    assert copied["State"] == "available"
    assert (copied["Name"], copied["Description"]) == (NAME, DESCRIPTION)
    assert tags(copied) == PUBLISHED | {"Name": NAME, "imagefactory-source": f"{HOME}:{ami}"}
    assert tags(image(ami))["Name"] == NAME
    for found, region in ((ami, HOME), (copy, AWAY)):
        assert launch_permissions(found, region) == [{"UserId": SHARED_WITH}]
    assert drv.stats.by_call == {
        "CreateTags": 3,  # the verdict, the source's Name, the copy's final tags
        "DescribeImages": 2,  # an earlier copy? then: is it available?
        "CopyImage": 1,
        "ModifyImageAttribute": 2,
    }


def test_publish_waits_for_the_copies(drv: ec2.EC2Driver) -> None:
    looks = []

    def pending_twice(parsed, **kwargs: object) -> None:
        looks.append(1)
        if len(looks) <= 3:  # the first look is for an earlier copy (none)
            for found in parsed.get("Images", []):
                found["State"] = "pending"

    drv.client(AWAY).meta.events.register("after-call.ec2.DescribeImages", pending_twice)
    drv.publish_image(packer_ami(), NAME, DESCRIPTION)
    assert len(looks) == 4  # none earlier, pending, pending, available


def test_a_failed_or_slow_copy_is_an_error(drv: ec2.EC2Driver) -> None:
    state = {"State": "failed", "StateReason": {"Code": "x", "Message": "snapshot copy failed"}}

    def copy_state(parsed, **kwargs: object) -> None:
        for found in parsed.get("Images", []):
            found.update(state)

    drv.client(AWAY).meta.events.register("after-call.ec2.DescribeImages", copy_state)
    ami = packer_ami()
    with pytest.raises(CloudError, match=f"copying {ami} to {AWAY} failed: snapshot copy failed"):
        drv.publish_image(ami, NAME, DESCRIPTION)
    state = {"State": "pending"}
    drv.copy_timeout_s = -1
    with pytest.raises(CloudError, match=rf"copying {ami} to {AWAY} \(ami-\w+\): not available"):
        drv.publish_image(ami, NAME, DESCRIPTION)


def test_a_failed_copy_is_replaced_not_waited_on(drv: ec2.EC2Driver) -> None:
    copies: list[str] = []

    def first_copy_fails(parsed, **kwargs: object) -> None:
        for found in parsed.get("Images", []):
            if found["ImageId"] in copies[:1]:
                found["State"] = "failed"

    def copied(parsed, **kwargs: object) -> None:
        copies.append(parsed["ImageId"])

    client = drv.client(AWAY)
    client.meta.events.register("after-call.ec2.CopyImage", copied)
    client.meta.events.register("after-call.ec2.DescribeImages", first_copy_fails)
    ami = packer_ami()
    with pytest.raises(CloudError, match="failed"):
        drv.publish_image(ami, NAME, DESCRIPTION)
    # The tags CopyImage asked for (moto ignores them; EC2 applies them as it creates the copy).
    raw(AWAY).create_tags(Resources=copies[:1], Tags=ec2._tags({ec2.SOURCE_TAG: f"{HOME}:{ami}"}))
    where = drv.publish_image(ami, NAME, DESCRIPTION)
    assert len(copies) == 2 and where[1] == f"{AWAY} {copies[1]}"


def test_copies_are_tagged_as_they_are_created(drv: ec2.EC2Driver) -> None:
    """So an interrupted publish leaves a copy that retention and the next publish find.
    (moto ignores CopyImage's TagSpecifications: what was asked for is checked here.)"""
    client = drv.client(AWAY)
    sent: list[str] = []
    client.meta.events.register(
        "before-send.ec2.CopyImage", lambda request, **kw: sent.append(request.body)
    )
    ami = packer_ami()
    drv.publish_image(ami, NAME, DESCRIPTION)
    [body] = [parse_qs(b if isinstance(b, str) else b.decode()) for b in sent]
    tag = "TagSpecification.1.Tag.{}.{}"
    asked = {body[tag.format(n, "Key")][0]: body[tag.format(n, "Value")][0] for n in range(1, 5)}
    assert body["TagSpecification.1.ResourceType"] == ["image"]
    assert asked == MANAGED | {ROLE: "image", "Name": NAME, "imagefactory-source": f"{HOME}:{ami}"}
    assert body["SourceRegion"] == [HOME] and body["SourceImageId"] == [ami]


def test_publish_again_reuses_the_copy(drv: ec2.EC2Driver) -> None:
    ami = packer_ami()
    first = drv.publish_image(ami, NAME, DESCRIPTION)
    assert drv.publish_image(ami, NAME, DESCRIPTION) == first
    assert drv.stats.by_call["CopyImage"] == 1
    assert len(images(AWAY)) == 1


def test_publish_without_publish_settings_names_the_ami_only(drv: ec2.EC2Driver) -> None:
    drv.settings = PLAIN  # no publish_regions, no launch_permissions
    ami = packer_ami()
    assert drv.publish_image(ami, NAME, DESCRIPTION) == [f"{HOME} {ami}"]
    assert drv.stats.by_call == {"CreateTags": 1}
    assert launch_permissions(ami) == []


def test_images_labelled(drv: ec2.EC2Driver) -> None:
    named = seed_published("ubuntu-20.04-20261101.1", 1)
    untagged = packer_ami("ubuntu-20.04-20261102.1")  # its name is the AMI's own
    raw().create_tags(Resources=[untagged], Tags=ec2._tags(PUBLISHED))
    seed_published("certified", 3, MANAGED | {ROLE: "image", VERDICT: "certified"})
    seed_published("foreign", 4, {VERDICT: "published"})
    found = {i.id: i for i in drv.images_labelled(PUBLISHED)}
    assert set(found) == {named, untagged}
    assert found[named] == clouds.CloudImage(
        named,
        "ubuntu-20.04-20261101.1",
        "2026-11-01T00:00:00.000Z",
        PUBLISHED | {"Name": "ubuntu-20.04-20261101.1"},
    )
    assert found[untagged].name == "ubuntu-20.04-20261102.1"


def test_delete_image_with_its_copies_and_snapshots(drv: ec2.EC2Driver) -> None:
    ami = packer_ami()
    drv.publish_image(ami, NAME, DESCRIPTION)
    [copy] = images(AWAY)
    kept = packer_ami("unrelated")
    owned = {HOME: image_snapshots(image(ami)), AWAY: image_snapshots(image(copy, AWAY))}
    assert owned[HOME] <= snapshots(HOME) and owned[AWAY] <= snapshots(AWAY)
    drv.delete_image(ami)
    assert ami not in images(HOME) and kept in images(HOME) and images(AWAY) == {}
    assert not owned[HOME] & snapshots(HOME) and not owned[AWAY] & snapshots(AWAY)
    drv.delete_image(ami)  # gone already: fine
    drv.delete_image("ami-0123456789abcdef0")


# --- the generic flow over this driver ----------------------------------------------------------


def test_full_flow(drv: ec2.EC2Driver, no_ssh: None, log: StepLog, tmp_path: Path) -> None:
    old = seed_published("ubuntu-20.04-20261001.1", 1)
    drv.publish_image(old, "ubuntu-20.04-20261001.1", "old")  # it has a copy in AWAY too
    kept = seed_published("ubuntu-20.04-20261101.1", 2)
    other = [seed_published(f"ubuntu-22.04-2026090{n}.1", n) for n in (1, 2, 3)]
    ami = packer_ami(NAME)
    drv.stats = type(drv.stats)()
    started = time.perf_counter()

    assert clouds.sweep(drv, log) == []
    with clouds.launched(drv, drv.image_id(f"{HOME}:{ami}"), tmp_path / "work", log) as inst:
        [instance] = instances("pending", "running")
        assert tags(instance) == CHECK | {"Name": instance_name(log)}
        assert instance["ImageId"] == ami
        encoded = raw().describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="userData"
        )["UserData"]["Value"]
        user_data = base64.b64decode(encoded).decode()
        assert user_data.startswith("#cloud-config\n")
        public_key = (tmp_path / "work/ssh/id_ed25519.pub").read_text().strip()
        assert yaml.safe_load(user_data)["ssh_authorized_keys"] == [public_key]
        assert inst.allowed_keys == [public_key]
        assert inst.target.label == f"ubuntu@{instance['PublicIpAddress']}:22"
        assert (inst.timings, inst.system_state) == READY
    assert instances("pending", "running") == []
    checks = [i for i in instances() if tags(i).get(ROLE) == "check-instance"]
    assert [i["State"]["Name"] for i in checks] == ["terminated"]
    clouds.record_verdict(drv, ami, "certified")
    assert tags(image(ami))[VERDICT] == "certified"
    where = clouds.publish(drv, ami, NAME, DESCRIPTION, 2, log)
    elapsed = time.perf_counter() - started

    away = {i["Name"]: i["ImageId"] for i in images(AWAY).values()}
    assert where == [f"{HOME} {ami}", f"{AWAY} {away[NAME]}"]
    assert tags(image(ami)) == PUBLISHED | {"Name": NAME}
    assert launch_permissions(away[NAME], AWAY) == [{"UserId": SHARED_WITH}]
    # Retention, keep 2: the oldest of this family goes, with its copy; other families stay.
    ours = {i for i, found in images(HOME).items() if tags(found).get(ROLE) == "image"}
    assert ours == {kept, ami, *other}
    assert set(away) == {NAME}
    assert old not in images(HOME)
    assert f"retention (keep 2): deleting ubuntu-20.04-20261001.1 ({old})" in log.out.getvalue()
    stats = drv.stats
    print(
        f"\nAmazon EC2 full flow against moto (sweep, launch, destroy, verdict, publish with a "
        f"copy to {AWAY} and a launch permission, retention of 1): {stats.calls} API calls, "
        f"{stats.retries} retries, {elapsed:.3f} s wall, {stats.seconds:.3f} s in calls\n"
        + json.dumps(stats.by_call, indent=1, sort_keys=True)
    )
    assert stats.retries == 0


def instance_name(log: StepLog) -> str:
    [line] = [line for line in log.out.getvalue().splitlines() if "==> launch " in line]
    return line.split("==> launch ", 1)[1].split()[0]


@pytest.mark.parametrize("interruption", [RuntimeError("checks crashed"), KeyboardInterrupt()])
def test_launched_terminates_when_the_body_raises(
    drv: ec2.EC2Driver, no_ssh: None, log: StepLog, tmp_path: Path, interruption: BaseException
) -> None:
    ami = packer_ami()
    with pytest.raises(type(interruption)), clouds.launched(drv, ami, tmp_path / "work", log):
        assert len(instances("pending", "running")) == 1
        raise interruption
    assert instances("pending", "running") == []
    assert "destroy imagefactory-check-" in log.out.getvalue()


def test_launched_terminates_when_the_boot_fails(
    drv: ec2.EC2Driver, monkeypatch, log: StepLog, tmp_path: Path
) -> None:
    def never_ready(*args: object, **kwargs: object) -> None:
        raise CloudError("no SSH after 900 s")

    monkeypatch.setattr(clouds, "wait_until_ready", never_ready)
    with (
        pytest.raises(CloudError, match="no SSH"),
        clouds.launched(drv, packer_ami(), tmp_path / "work", log),
    ):
        pass
    assert instances("pending", "running") == []


def test_a_rejected_verdict_tags_the_ami_and_it_is_never_published(drv: ec2.EC2Driver) -> None:
    ami = packer_ami(NAME)
    clouds.record_verdict(drv, ami, "rejected")
    assert tags(image(ami)) == MANAGED | {ROLE: "image", VERDICT: "rejected"}
    assert drv.images_labelled(PUBLISHED) == []
    assert clouds.retired(drv, NAME, 0) == []
    assert images(AWAY) == {} and launch_permissions(ami) == []
    assert set(drv.stats.by_call) == {"CreateTags", "DescribeImages"}


def test_recertified_published_ami_stays_published(drv: ec2.EC2Driver) -> None:
    ami = seed_published(NAME, 1)
    provider = SimpleNamespace(driver=lambda image: drv)
    record = SimpleNamespace(artifact=f"{HOME}:{ami}", state="published")
    CloudProvider.record_verdict(provider, record, None, StepLog(io.StringIO()))
    assert tags(image(ami))[VERDICT] == "published"


def test_the_amazon_provider_uses_this_driver() -> None:
    provider = PROVIDERS["amazon-ebs"]
    assert isinstance(provider, CloudProvider)
    assert provider.driver_module == "ec2"
    driver = provider.driver(SimpleNamespace(provider=lambda name: SETTINGS))
    assert isinstance(driver, ec2.EC2Driver)
    assert driver.servers_labelled(CHECK) == []


# --- faults ----------------------------------------------------------------------------------


def test_throttling_and_5xx_are_retried(drv: ec2.EC2Driver, no_backoff: list[int]) -> None:
    server = drv.create_server("c", packer_ami(), "", CHECK)
    inject(drv, "DescribeInstances", (503, "Unavailable"), (400, "RequestLimitExceeded"))
    assert drv.server_address(server)
    assert no_backoff == [1, 2]
    assert drv.stats.retries == 2
    assert drv.stats.by_call["DescribeInstances"] == 3


def test_a_persistent_5xx_gives_up_in_one_line(drv: ec2.EC2Driver, no_backoff: list[int]) -> None:
    sent = inject(drv, "DescribeInstances", *[(500, "InternalError")] * 6)
    with pytest.raises(CloudAPIError) as failed:
        drv.servers_labelled(CHECK)
    assert str(failed.value) == (
        "Amazon EC2: DescribeInstances: InternalError: injected InternalError second line"
    )
    assert failed.value.status == 500
    assert len(sent) == 6 and drv.stats.retries == 5  # max_attempts 5: retries


def test_a_retried_create_is_one_instance(drv: ec2.EC2Driver, no_backoff: list[int]) -> None:
    """Unlike a retried POST elsewhere, a retried RunInstances is safe: same ClientToken."""
    ami = packer_ami()
    sent = inject(drv, "RunInstances", (503, "Unavailable"))
    drv.create_server("c", ami, "", CHECK)
    tokens = [parse_qs(body.decode())["ClientToken"] for body in sent]
    assert len(tokens) == 2 and tokens[0] == tokens[1]
    assert len(instances("pending", "running")) == 1


def test_an_unreachable_endpoint_is_one_line() -> None:
    env = {"AWS_ENDPOINT_URL_EC2": "http://127.0.0.1:9"}  # discard port: nothing listens
    driver = ec2.driver(SETTINGS, env, retries={"max_attempts": 1, "mode": "standard"})
    with pytest.raises(CloudAPIError) as failed:
        driver.servers_labelled(CHECK)
    assert str(failed.value) == (
        "Amazon EC2: DescribeInstances: EndpointConnectionError (127.0.0.1)"
    )


def test_credentials_missing_at_call_time_are_a_config_error(drv, monkeypatch) -> None:
    """E.g. a profile's SSO session expired after the driver was made."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    bare = ec2.EC2Driver(SETTINGS, HOME, boto3.session.Session(), drv.config, drv.endpoint_url)
    with pytest.raises(ConfigError, match=r"^Amazon EC2: no AWS credentials \(set "):
        bare.servers_labelled(CHECK)


# --- a run killed between launch and destroy ----------------------------------------------------

CHILD = """
import sys, time
from pathlib import Path
from imagefactory import clouds, ec2
from imagefactory.definitions import AmazonSettings
from imagefactory.steps import StepLog

clouds.wait_until_ready = lambda *args, **kwargs: ({"ssh": 1.0}, "running")
clouds.POLL_S = 0
driver = ec2.driver(AmazonSettings(owner="099720109477", name_filter="ubuntu/*"))
with clouds.launched(driver, sys.argv[1], Path(sys.argv[2]), StepLog()):
    print("launched", flush=True)
    time.sleep(120)
"""


def test_sweep_after_a_killed_run(drv: ec2.EC2Driver, log: StepLog, tmp_path: Path) -> None:
    ami = packer_ami()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, ami, str(tmp_path / "work")],
        env=dict(os.environ),
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
    assert SECRET not in stderr
    [left] = instances("pending", "running")  # the kill skipped the destroy
    assert tags(left) == CHECK | {"Name": tags(left)["Name"]}

    assert clouds.sweep(drv, log) == [left["InstanceId"]]
    assert instances("pending", "running") == []
    assert f"destroying check instance {left['InstanceId']} left by an earlier run" in (
        log.out.getvalue()
    )
    assert clouds.sweep(drv, log) == []


def read_line(stream: io.TextIOBase, timeout: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return "(nothing within the timeout)"
    return stream.readline()


# --- the secret access key appears nowhere ------------------------------------------------------


def test_the_secret_key_appears_nowhere(
    drv: ec2.EC2Driver,
    no_ssh: None,
    no_backoff: list[int],
    log: StepLog,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore logs requests, signing and credential lookup
    ami = packer_ami()
    with clouds.launched(drv, ami, tmp_path / "work", log):
        pass
    clouds.record_verdict(drv, ami, "certified")
    clouds.publish(drv, ami, NAME, DESCRIPTION, 1, log)
    errors: list[str] = []

    def failing(call) -> None:
        try:
            call()
        except (CloudAPIError, CloudError, ConfigError) as exc:
            errors.extend([str(exc), repr(exc), *traceback.format_exception(exc)])

    failing(lambda: drv.create_server("c", "ami-0123456789abcdef0", "", CHECK))
    failing(lambda: drv.label_image("ami-0123456789abcdef0", MANAGED))
    inject(drv, "DescribeInstances", *[(500, "InternalError")] * 6)
    failing(lambda: drv.servers_labelled(CHECK))
    unreachable = {"AWS_ENDPOINT_URL_EC2": "http://127.0.0.1:9"}
    retries = {"max_attempts": 1, "mode": "standard"}
    failing(lambda: ec2.driver(SETTINGS, unreachable, retries=retries).delete_server("i-1"))
    os.environ.pop("AWS_SECRET_ACCESS_KEY")
    failing(lambda: ec2.driver(SETTINGS))
    out, err = capfd.readouterr()

    assert len(errors) >= 5 * 3
    assert "Sending http request" in caplog.text  # botocore's debug log was on
    for text in [out, err, log.out.getvalue(), caplog.text, repr(drv), *errors]:
        assert SECRET not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files  # the check key pair, at least
    assert all(SECRET.encode() not in p.read_bytes() for p in files)
