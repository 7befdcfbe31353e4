"""Amazon EC2 in the verbs of clouds.CloudDriver, through boto3: EC2's API needs SigV4 request
signing, which the official SDK does. A check instance is an instance of Packer's AMI, labels
are EC2 tags, and publishing copies the AMI to more regions and shares it with accounts.

Credentials are boto3's business: its own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/
AWS_SESSION_TOKEN, AWS_PROFILE and the shared files, SSO, a container or instance role) finds
them and signs with them. Nothing here reads, keeps or prints them, and errors carry only the
operation, AWS's error code and its message."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.loaders
import botocore.session
from botocore import xform_name
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)

from .cloudapi import CallStats, CloudAPIError
from .clouds import MANAGED, ROLE, VERDICT, CloudError, CloudImage
from .definitions import AmazonSettings
from .errors import ConfigError

TITLE = "Amazon EC2"
NO_CREDENTIALS = (
    "Amazon EC2: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
)
# Standard mode retries throttling and 5xx with jittered exponential backoff. Creates are safe
# to retry: botocore fills RunInstances' and CopyImage's ClientToken once per call, so a retry
# is the same request to EC2, never a second instance.
CLIENT_CONFIG: dict[str, Any] = {
    "retries": {"max_attempts": 5, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
    "user_agent_extra": "imagefactory",
}
NAME_TAG = "Name"  # what the console shows; AMI names themselves cannot be changed
# On copies in publish regions: "<home region>:<source AMI>", so retention and a repeated
# publish find them again.
SOURCE_TAG = "imagefactory-source"
AMI_ID = re.compile(r"^ami-[0-9a-f]{8,17}$")
LIVE = ("pending", "running", "stopping", "stopped")  # all but shutting-down/terminated
# Instance states that will never turn "running": waiting longer would only burn time.
DEAD = frozenset({"shutting-down", "terminated", "stopping", "stopped"})
# AMI states a copy in progress will not leave.
FAILED = frozenset({"failed", "error", "invalid", "deregistered", "disabled"})
# Error codes meaning "it is not there" (deleting it again, or not visible yet).
INSTANCE_MISSING = ("InvalidInstanceID.NotFound",)
IMAGE_MISSING = ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable")
SNAPSHOT_MISSING = ("InvalidSnapshot.NotFound",)


class EC2APIError(CloudAPIError):
    """EC2 refused a call; ``code`` is AWS's error code (InvalidAMIID.NotFound …)."""

    def __init__(self, message: str, status: int | None, code: str) -> None:
        super().__init__(message, status)
        self.code = code


def driver(
    settings: AmazonSettings, env: Mapping[str, str] = os.environ, **options: Any
) -> EC2Driver:
    """``env`` supplies the region and endpoint overrides; ``options`` override botocore
    Config settings (retries, timeouts). Fails here, in one line, without credentials."""
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or settings.region
    try:
        session = _session()
        found = session.get_credentials()  # resolves boto3's chain; the values stay in it
    except ProfileNotFound as exc:
        raise ConfigError(f"{TITLE}: {exc}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise ConfigError(NO_CREDENTIALS) from None
    except BotoCoreError as exc:
        raise ConfigError(f"{TITLE}: AWS credentials: {type(exc).__name__}") from None
    if found is None:
        raise ConfigError(NO_CREDENTIALS)
    config = Config(**(CLIENT_CONFIG | options))
    made = EC2Driver(settings, region, session, config, endpoint_url(env))
    made.client()  # a malformed endpoint fails now, not mid-run
    return made


def _session() -> boto3.session.Session:
    """A new session (its own credential chain), sharing the parsed API models: EC2's is
    megabytes of JSON that every new session would otherwise parse again (~0.1 s)."""
    core = botocore.session.Session()
    core.register_component("data_loader", _models(core.get_config_variable("data_path")))
    return boto3.session.Session(botocore_session=core)


@functools.cache
def _models(data_path: str | None) -> botocore.loaders.Loader:
    return botocore.loaders.create_loader(data_path)


def endpoint_url(env: Mapping[str, str]) -> str | None:
    """AWS_ENDPOINT_URL_EC2, else AWS_ENDPOINT_URL. botocore reads both itself, but only from
    os.environ; passing the value makes a given ``env`` mean the same."""
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    url = env.get("AWS_ENDPOINT_URL_EC2") or env.get("AWS_ENDPOINT_URL") or None
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"{TITLE}: endpoint {url!r} is not an http(s) URL")
    return url


@dataclass
class EC2Driver:
    settings: AmazonSettings
    region: str  # where Packer's AMI is and the check instances run
    session: boto3.session.Session = field(repr=False)  # holds the credentials
    config: Config = field(repr=False)
    # An override serves every region (copies included): meant for a local or test endpoint.
    endpoint_url: str | None = None
    title: str = TITLE
    ssh_port: int = 22
    page_size: int = 1000  # the most DescribeInstances/DescribeImages return per page
    poll_s: float = 15.0  # between looks at a copy in progress (copies take minutes)
    copy_timeout_s: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    stats: CallStats = field(default_factory=CallStats)
    login_user: str = field(init=False)
    _clients: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.login_user = self.settings.ssh_username  # cloud-init's default user on the AMI

    def image_id(self, artifact_id: str) -> str:
        """The AMI in this region from Packer's "us-east-1:ami-1,eu-west-1:ami-2"."""
        amis = dict(_region_and_ami(part) for part in artifact_id.split(","))
        ami = amis.get(self.region) or (amis.get("") if len(amis) == 1 else None)
        if not ami or not AMI_ID.match(ami):
            raise ConfigError(
                f"{TITLE}: Packer artifact {artifact_id!r} has no AMI in {self.region}"
            )
        return ami

    # --- check instances ---------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        tags = _tags(labels | {NAME_TAG: name})
        params = {
            "ImageId": image_id,
            "InstanceType": self.settings.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": user_data,  # boto3 base64-encodes it
            # A poweroff inside the guest ends the instance rather than parking it, stopped.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "BlockDeviceMappings": self._root_goes_with_instance(image_id),
            # The volume carries the labels too: anything left behind is recognisably ours.
            "TagSpecifications": [
                {"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")
            ],
        } | self._network()
        reservation = self._call("RunInstances", **params)
        return reservation["Instances"][0]["InstanceId"]

    def server_address(self, server_id: str) -> str | None:
        # Just after RunInstances the instance may not be visible yet (eventual consistency).
        body = self._call("DescribeInstances", missing=INSTANCE_MISSING, InstanceIds=[server_id])
        instances = [i for r in body.get("Reservations", []) for i in r["Instances"]]
        if not instances:
            return None
        instance = instances[0]
        state = instance["State"]["Name"]
        if state in DEAD:
            reason = (instance.get("StateReason") or {}).get("Message") or "no reason given"
            raise CloudError(f"{TITLE}: instance {server_id} is {state} ({reason})")
        if state != "running":
            return None
        address = instance.get("PublicIpAddress")
        if not address:
            raise CloudError(
                f"{TITLE}: instance {server_id} runs without a public IPv4 address "
                "(its subnet does not assign one)"
            )
        return address

    def delete_server(self, server_id: str) -> None:
        self._call("TerminateInstances", missing=INSTANCE_MISSING, InstanceIds=[server_id])

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        # Terminated instances stay listed for about an hour: only the ones still there count.
        filters = [*_filters(labels), {"Name": "instance-state-name", "Values": list(LIVE)}]
        pages = self._pages("DescribeInstances", Filters=filters)
        return [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]

    # --- images (AMIs) -----------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        # CreateTags overwrites the value of a key the AMI has: no read, no removal needed.
        self._call("CreateTags", Resources=[image_id], Tags=_tags(labels))

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        """Name it, copy it to every publish region (all copies started before waiting for
        any: they run in parallel), then share the AMI and its copies with the accounts."""
        accounts = self._launch_accounts()  # a typo fails before anything is copied
        self._call("CreateTags", Resources=[image_id], Tags=_tags({NAME_TAG: name}))
        copies = {
            region: self._copy(image_id, region, name, description)
            for region in self._publish_regions()
        }
        self._wait_until_available(image_id, copies)
        self._share(image_id, self.region, accounts)
        for region, copy in copies.items():
            self._share(copy, region, accounts)
            labels = self._copy_labels(image_id, name) | {VERDICT: "published"}
            self._call("CreateTags", region, Resources=[copy], Tags=_tags(labels))
        return [f"{region} {ami}" for region, ami in {self.region: image_id, **copies}.items()]

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        pages = self._pages("DescribeImages", Owners=["self"], Filters=_filters(labels))
        # A deregistered AMI stays listed for a while; it is no longer an image to keep.
        return [_cloud_image(i) for p in pages for i in p["Images"] if _exists(i)]

    def delete_image(self, image_id: str) -> None:
        """The AMI, its copies in the publish regions, and their snapshots. Copies first: if
        this is interrupted, the source is still listed and the next retention finishes."""
        for region in self._publish_regions():
            for copy in self._copies(image_id, region):
                self._deregister(copy, region)
        found = self._images(self.region, ImageIds=[image_id])
        for image in found:
            self._deregister(image, self.region)

    # --- publishing mechanics ----------------------------------------------------------

    def _publish_regions(self) -> list[str]:
        wanted = self.settings.publish_regions
        return [r for r in dict.fromkeys(wanted) if r != self.region]

    def _launch_accounts(self) -> list[str]:
        return list(dict.fromkeys(self.settings.launch_permissions))

    def _copy_labels(self, image_id: str, name: str) -> dict[str, str]:
        source = f"{self.region}:{image_id}"
        return MANAGED | {ROLE: "image", NAME_TAG: name, SOURCE_TAG: source}

    def _copy(self, image_id: str, region: str, name: str, description: str) -> str:
        """The copy in ``region``: one an earlier, interrupted publish started, or a new one
        (tagged as it is created, so an interruption from here on leaves it findable)."""
        # A failed copy stays listed (as failed): start another rather than wait on it.
        earlier = [c for c in self._copies(image_id, region) if c.get("State") not in FAILED]
        if earlier:
            return earlier[0]["ImageId"]
        tags = _tags(self._copy_labels(image_id, name))
        body = self._call(
            "CopyImage",
            region,
            SourceImageId=image_id,
            SourceRegion=self.region,
            Name=name,
            Description=description[:255],  # EC2's limit
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}],
        )
        return body["ImageId"]

    def _copies(self, image_id: str, region: str) -> list[dict[str, Any]]:
        source = {SOURCE_TAG: f"{self.region}:{image_id}"}
        return self._images(region, Owners=["self"], Filters=_filters(source))

    def _wait_until_available(self, image_id: str, copies: dict[str, str]) -> None:
        deadline = self.clock() + self.copy_timeout_s
        waiting = dict(copies)
        while waiting:
            for region, copy in list(waiting.items()):
                # Not found yet is eventual consistency, right after CopyImage: keep looking.
                [image] = self._images(region, ImageIds=[copy]) or [{"State": "pending"}]
                if image["State"] == "available":
                    del waiting[region]
                elif image["State"] in FAILED:
                    reason = (image.get("StateReason") or {}).get("Message") or image["State"]
                    raise CloudError(f"{TITLE}: copying {image_id} to {region} failed: {reason}")
            if waiting and self.clock() > deadline:
                late = ", ".join(f"{region} ({copy})" for region, copy in waiting.items())
                raise CloudError(
                    f"{TITLE}: copying {image_id} to {late}: not available after "
                    f"{self.copy_timeout_s:.0f} s"
                )
            if waiting:
                time.sleep(self.poll_s)

    def _share(self, image_id: str, region: str, accounts: list[str]) -> None:
        if accounts:
            permission = {"Add": [{"UserId": account} for account in accounts]}
            self._call(
                "ModifyImageAttribute", region, ImageId=image_id, LaunchPermission=permission
            )

    def _deregister(self, image: dict[str, Any], region: str) -> None:
        """Deregister, then delete its snapshots (EC2 refuses while an AMI uses them)."""
        self._call("DeregisterImage", region, missing=IMAGE_MISSING, ImageId=image["ImageId"])
        for mapping in image.get("BlockDeviceMappings") or []:
            snapshot = (mapping.get("Ebs") or {}).get("SnapshotId")
            if snapshot:
                self._call("DeleteSnapshot", region, missing=SNAPSHOT_MISSING, SnapshotId=snapshot)

    # --- instance mechanics ------------------------------------------------------------

    def _root_goes_with_instance(self, image_id: str) -> list[dict[str, Any]]:
        """Delete the root volume with the instance whatever the AMI says: a check instance
        leaves nothing behind. (An unknown AMI fails here, in one line.)"""
        [image] = self._call("DescribeImages", ImageIds=[image_id]).get("Images") or [{}]
        if not _exists(image):
            raise CloudError(f"{TITLE}: AMI {image_id} in {self.region} is deregistered")
        device = image.get("RootDeviceName") or "/dev/sda1"
        ebs: dict[str, Any] = {"DeleteOnTermination": True}
        if size := _volume_size(image, device):
            ebs["VolumeSize"] = size  # the AMI's own (moto insists on a size or a snapshot)
        return [{"DeviceName": device, "Ebs": ebs}]

    def _network(self) -> dict[str, Any]:
        """The default VPC's default subnet and security group, unless settings name others."""
        groups = list(self.settings.security_group_ids)
        subnet = self.settings.subnet_id
        return ({"SecurityGroupIds": groups} if groups else {}) | (
            {"SubnetId": subnet} if subnet else {}
        )

    # --- calls ---------------------------------------------------------------------------

    def client(self, region: str | None = None) -> Any:
        """The EC2 client for ``region`` (this driver's by default), made once."""
        region = region or self.region
        if region not in self._clients:
            try:
                made = self.session.client(
                    "ec2", region_name=region, endpoint_url=self.endpoint_url, config=self.config
                )
            except (BotoCoreError, ValueError) as exc:  # ValueError: a malformed endpoint
                raise ConfigError(f"{TITLE}: {region}: {type(exc).__name__}") from None
            # Once per HTTP request, retries included (pages of a listing each count).
            made.meta.events.register("response-received.ec2", self._count)
            self._clients[region] = made
        return self._clients[region]

    def _call(
        self, operation: str, region: str | None = None, missing: tuple[str, ...] = (), **params
    ) -> dict[str, Any]:
        """One operation; {} when it fails with one of the ``missing`` codes."""
        method = getattr(self.client(region), xform_name(operation))
        try:
            with self._api(operation):
                return method(**params)
        except EC2APIError as exc:
            if exc.code in missing:
                return {}
            raise

    def _pages(self, operation: str, region: str | None = None, **params) -> list[dict[str, Any]]:
        paginator = self.client(region).get_paginator(xform_name(operation))
        with self._api(operation):
            return list(paginator.paginate(**params, PaginationConfig={"PageSize": self.page_size}))

    def _images(self, region: str, **params) -> list[dict[str, Any]]:
        """DescribeImages, [] for an AMI id that is not there. Not for paginated listings:
        MaxResults cannot go with ImageIds."""
        body = self._call("DescribeImages", region, missing=IMAGE_MISSING, **params)
        return [i for i in body.get("Images", []) if _exists(i)]

    @contextlib.contextmanager
    def _api(self, operation: str) -> Iterator[None]:
        """botocore's failures as one line each: AWS's code and message, never a credential."""
        started = time.monotonic()
        try:
            yield
        except ClientError as exc:
            raise _api_error(operation, exc) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise ConfigError(NO_CREDENTIALS) from None
        except BotoCoreError as exc:
            # Their messages can quote request parameters: the class (and host) say enough.
            host = urlsplit(str(getattr(exc, "kwargs", {}).get("endpoint_url", ""))).hostname
            where = f" ({host})" if host else ""
            raise CloudAPIError(f"{TITLE}: {operation}: {type(exc).__name__}{where}") from None
        finally:
            self.stats.seconds += time.monotonic() - started

    def _count(self, event_name: str = "", context: Any = None, **kwargs: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        self.stats.calls += 1
        self.stats.by_call[operation] = self.stats.by_call.get(operation, 0) + 1
        attempt = ((context or {}).get("retries") or {}).get("attempt", 1)
        self.stats.retries += attempt > 1


def _api_error(operation: str, exc: ClientError) -> EC2APIError:
    error = exc.response.get("Error") or {}
    code = str(error.get("Code") or "Unknown")
    message = " ".join(str(error.get("Message") or "no details").split())[:300]
    status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return EC2APIError(f"{TITLE}: {operation}: {code}: {message}", status, code)


def _volume_size(image: Mapping[str, Any], device: str) -> int | None:
    for mapping in image.get("BlockDeviceMappings") or []:
        if mapping.get("DeviceName") == device:
            return (mapping.get("Ebs") or {}).get("VolumeSize")
    return None


def _region_and_ami(part: str) -> tuple[str, str]:
    region, _, ami = part.strip().rpartition(":")
    return region, ami


def _tags(labels: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": key, "Value": value} for key, value in labels.items()]


def _labels(resource: Mapping[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in resource.get("Tags") or []}


def _filters(labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Resources carrying every one of ``labels`` (EC2 ANDs filters, ORs a filter's values)."""
    return [{"Name": f"tag:{key}", "Values": [value]} for key, value in labels.items()]


def _exists(image: Mapping[str, Any]) -> bool:
    return bool(image) and image.get("State") != "deregistered"


def _cloud_image(image: Mapping[str, Any]) -> CloudImage:
    labels = _labels(image)
    return CloudImage(
        id=image["ImageId"],
        name=labels.get(NAME_TAG) or image.get("Name") or "",
        created=image.get("CreationDate") or "",
        labels=labels,
    )
