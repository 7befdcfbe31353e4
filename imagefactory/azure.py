"""Microsoft Azure (Resource Manager REST API) in the verbs of clouds.CloudDriver: a VM of
Packer's managed image is the check instance (with its own public IP and NIC, in a small
shared VNet whose NSG lets SSH in), labels are ARM tags, and publishing tags the image and,
when a gallery is configured, replicates it as an Azure Compute Gallery image version.

Credentials are a service principal's ARM_* variables (those Packer's azure-arm builder
reads), from the environment only. The driver gets an OAuth2 client-credentials token from
Microsoft Entra ID, renews it shortly before it expires and once when a call is refused with
401, and never shows the secret or the token. Creates and deletes are ARM long-running
operations: they are followed (Azure-AsyncOperation, else Location) to the end, at the pace
the service asks for with Retry-After."""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import requests
import yaml

from .cloudapi import APIClient, CallStats, CloudAPIError, Page
from .clouds import MANAGED, ROLE, CloudError, CloudImage
from .definitions import AzureSettings
from .errors import ConfigError

T = TypeVar("T")

TITLE = "Microsoft Azure"
REQUIRED_ENV = ("ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_TENANT_ID", "ARM_SUBSCRIPTION_ID")
AUTHORITY_ENV = "AZURE_AUTHORITY_HOST"  # what the Azure SDKs read too (sovereign clouds)
ARM_URL_ENV = "AZURE_RESOURCE_MANAGER_URL"
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
DEFAULT_ARM_URL = "https://management.azure.com"
SCOPE = "https://management.azure.com/.default"
COMPUTE_API = "2023-03-01"
NETWORK_API = "2023-05-01"
GALLERY_API = "2022-03-03"
TAGS_API = "2021-04-01"
# Renew this long before the token expires: a long poll must not start with a dying token.
RENEW_MARGIN_S = 300.0
# The shared network of check instances: created once per resource group, then reused.
CHECK_VNET = "imagefactory-check-vnet"
CHECK_SUBNET = "default"
CHECK_NSG = "imagefactory-check-nsg"
CHECK_PREFIX = "10.73.0.0/24"
# Azure requires an admin user. cloud-init's Azure datasource makes it the default user in
# place of cloud.cfg's: naming it as cloud.cfg does ("ubuntu") leaves the instance with the
# same one account as on every other cloud, the one the hygiene check allows.
ADMIN_USER = "ubuntu"
ID_PART = r"[A-Za-z0-9][A-Za-z0-9._()-]{0,89}"
IMAGE_ID = re.compile(
    rf"^/subscriptions/([0-9a-fA-F-]{{36}})/resourceGroups/({ID_PART})"
    rf"/providers/Microsoft\.Compute/images/({ID_PART})$",
    re.IGNORECASE,
)
IMAGE_NAME = re.compile(rf"^{ID_PART}$")
TAG_KEY_FORBIDDEN = set("<>%&\\?/")
DONE = frozenset({"Succeeded", "Failed", "Canceled"})
# Where publish_image notes the gallery version it made, so retention can remove it too.
GALLERY_VERSION_TAG = "imagefactory-gallery-version"


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: str = field(repr=False)
    tenant_id: str
    subscription_id: str


def driver(
    settings: AzureSettings, env: Mapping[str, str] = os.environ, **client_options: Any
) -> AzureDriver:
    authority = (env.get(AUTHORITY_ENV) or DEFAULT_AUTHORITY).strip().rstrip("/")
    arm_url = (env.get(ARM_URL_ENV) or DEFAULT_ARM_URL).strip().rstrip("/")
    return AzureDriver(settings, credentials(env), authority, arm_url, client_options)


def credentials(env: Mapping[str, str]) -> Credentials:
    missing = [name for name in REQUIRED_ENV if not (env.get(name) or "").strip()]
    if missing:
        raise ConfigError(
            f"Microsoft Azure: set {', '.join(missing)} (a service principal's credentials); "
            "they are read from the environment only"
        )
    return Credentials(
        client_id=env["ARM_CLIENT_ID"].strip(),
        client_secret=env["ARM_CLIENT_SECRET"],  # as given: it may end in a space
        tenant_id=env["ARM_TENANT_ID"].strip(),
        subscription_id=env["ARM_SUBSCRIPTION_ID"].strip(),
    )


@dataclass
class ARMClient(APIClient):
    """APIClient that also keeps the last status: 201/202 start a long-running operation,
    and a Location poll is over on 200/204, which the body alone cannot tell."""

    last_status: int = 0

    def _send(self, *args: Any, **kwargs: Any) -> requests.Response | None:
        response = super()._send(*args, **kwargs)
        if response is not None:
            self.last_status = response.status_code
        return response


@dataclass
class AzureDriver:
    settings: AzureSettings
    credentials: Credentials = field(repr=False)
    authority: str = DEFAULT_AUTHORITY
    arm_url: str = DEFAULT_ARM_URL
    client_options: dict[str, Any] = field(default_factory=dict, repr=False)
    stats: CallStats = field(default_factory=CallStats)  # Entra ID and ARM together
    title: str = TITLE
    ssh_port: int = 22
    poll_s: float = 5.0  # between looks at an operation when ARM does not say (Retry-After)
    max_poll_s: float = 60.0
    operation_timeout_s: float = 1800.0  # VM deletes take minutes, replication longer
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep  # between operation polls
    _arm: ARMClient | None = field(init=False, default=None, repr=False)  # carries the token
    _renew_at: float = field(init=False, default=0.0, repr=False)
    _subnet_id: str = field(init=False, default="", repr=False)
    _creations: dict[str, str] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.login()

    @property
    def login_user(self) -> str:
        return self.admin_user

    @property
    def admin_user(self) -> str:
        return self.settings.admin_username or ADMIN_USER

    @property
    def group_path(self) -> str:
        return (
            f"/subscriptions/{self.credentials.subscription_id}"
            f"/resourceGroups/{self.settings.resource_group}"
        )

    def image_id(self, artifact_id: str) -> str:
        """Packer reports the managed image's resource id; a bare image name is taken to be
        in the settings' resource group."""
        given = artifact_id.strip()
        if IMAGE_NAME.match(given):
            return f"{self.group_path}/providers/Microsoft.Compute/images/{given}"
        if not IMAGE_ID.match(given):
            raise ConfigError(
                f"Microsoft Azure: {artifact_id!r} is not a managed image id "
                "(/subscriptions/…/resourceGroups/…/providers/Microsoft.Compute/images/NAME)"
            )
        return given

    # --- authentication ----------------------------------------------------------------

    def login(self) -> None:
        """A client-credentials token for ARM; a new ARM client carrying it."""
        creds = self.credentials
        entra = APIClient(
            title="Microsoft Entra ID",
            base_url=self.authority,
            headers={},
            stats=self.stats,
            **self.client_options,
        )
        form = {
            "client_id": creds.client_id,
            "client_secret": creds.client_secret,
            "grant_type": "client_credentials",
            "scope": SCOPE,
        }
        asked = self.clock()
        try:
            # A token request changes nothing: safe to repeat after a 5xx.
            body = entra.request(
                "POST",
                f"/{creds.tenant_id}/oauth2/v2.0/token",
                data=urlencode(form),
                content_type="application/x-www-form-urlencoded",
                idempotent=True,
            )
        except CloudAPIError as exc:
            if exc.status in (400, 401):
                raise CloudAPIError(
                    f"{exc} (check ARM_TENANT_ID, ARM_CLIENT_ID and ARM_CLIENT_SECRET)",
                    exc.status,
                ) from None
            raise
        token = str(body.get("access_token") or "")
        if not token:
            raise CloudAPIError("Microsoft Entra ID: the token answer carries no access_token")
        lifetime = float(body.get("expires_in") or 3600)
        self._renew_at = asked + max(0.0, lifetime - RENEW_MARGIN_S)
        self._arm = ARMClient(
            title="Azure Resource Manager",
            base_url=self.arm_url,
            headers={"Authorization": f"Bearer {token}"},
            stats=self.stats,
            **self.client_options,
        )

    def _renewing(self, call: Callable[[ARMClient], T]) -> T:
        """``call`` with a fresh token: renewed before it expires, and once more when ARM
        refuses it anyway (revoked, or a clock that disagrees)."""
        if self._arm is None or self.clock() >= self._renew_at:
            self.login()
        assert self._arm is not None
        try:
            return call(self._arm)
        except CloudAPIError as exc:
            if exc.status != 401:
                raise
        self.login()
        return call(self._arm)

    def _request(
        self, method: str, path: str, api: str, **options: Any
    ) -> tuple[dict[str, Any], int, dict[str, str]]:
        """One ARM call: body, status and headers (those of this very call)."""

        def call(arm: ARMClient) -> tuple[dict[str, Any], int, dict[str, str]]:
            # Operation URLs and next pages carry their own api-version.
            params = {"api-version": api} if api and "api-version=" not in path else None
            body = arm.request(method, path, params=params, **options)
            return body, arm.last_status, arm.last_headers

        return self._renewing(call)

    def _listing(self, path: str, api: str) -> list[dict[str, Any]]:
        """Every item of an ARM list (``value``, pages chained by ``nextLink``); restarts
        as a whole after a renewal: its pages belong together."""

        def call(arm: ARMClient) -> list[dict[str, Any]]:
            pages = arm.paginate(path, "value", {"api-version": api}, style=next_link)
            return list(pages)

        return self._renewing(call)

    # --- long-running operations -------------------------------------------------------

    def _put(self, path: str, api: str, body: dict[str, Any], wait: bool = True) -> dict:
        answer, status, headers = self._request("PUT", path, api, json=body)
        if wait:
            self._follow(path, api, status, headers, answer)
        return answer

    def _delete(self, path: str, api: str) -> None:
        """Gone afterwards (404 included): deletes of things still attached fail otherwise."""
        answer, status, headers = self._request("DELETE", path, api, ok_missing=True)
        if status != 404:
            self._follow(path, api, status, headers, answer)

    def _follow(
        self, path: str, api: str, status: int, headers: dict[str, str], answer: dict
    ) -> None:
        """Wait for the operation a PUT or DELETE started (ARM's async operation rules)."""
        operation = _header(headers, "Azure-AsyncOperation")
        location = _header(headers, "Location")
        if operation:
            self._poll_operation(path, operation, _retry_after(headers))
        elif location and status == 202:
            self._poll_location(path, location, _retry_after(headers))
        elif status == 201 or _state(answer) not in (*DONE, ""):
            self._poll_resource(path, api, _retry_after(headers))
        elif _state(answer) in ("Failed", "Canceled"):
            raise CloudError(f"Microsoft Azure: {_name(path)}: {_state(answer)}")

    def _poll_operation(self, path: str, url: str, told: float | None) -> None:
        deadline = self.clock() + self.operation_timeout_s
        while True:
            self._pause(told, path, deadline)
            body, _, headers = self._request("GET", url, "")
            status = str(body.get("status") or "")
            if status == "Succeeded":
                return
            if status in DONE:
                raise CloudError(f"Microsoft Azure: {_name(path)}: {status}: {_error(body)}")
            told = _retry_after(headers)

    def _poll_location(self, path: str, url: str, told: float | None) -> None:
        deadline = self.clock() + self.operation_timeout_s
        while True:
            self._pause(told, path, deadline)
            _, status, headers = self._request("GET", url, "")
            if status != 202:
                return  # 200 or 204: done; a failure was raised as an HTTP error
            told = _retry_after(headers)

    def _poll_resource(self, path: str, api: str, told: float | None) -> None:
        deadline = self.clock() + self.operation_timeout_s
        while True:
            self._pause(told, path, deadline)
            body, _, headers = self._request("GET", path, api)
            state = _state(body)
            if state == "Succeeded":
                return
            if state in ("Failed", "Canceled"):
                raise CloudError(f"Microsoft Azure: {_name(path)}: {state}")
            told = _retry_after(headers)

    def _pause(self, told: float | None, path: str, deadline: float) -> None:
        if self.clock() > deadline:
            raise CloudError(
                f"Microsoft Azure: {_name(path)}: not done after {self.operation_timeout_s:.0f} s"
            )
        self.sleep(min(self.max_poll_s, told if told is not None else self.poll_s))

    # --- check instances ---------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        """Public IP, NIC, then the VM (not waited for: server_address watches it).
        The server id is the VM's name; its IP and NIC are named after it."""
        tags = _tags(labels)
        location = self.settings.location
        subnet = self._check_subnet()
        ip = self._put(
            self._network(f"publicIPAddresses/{name}-ip"),
            NETWORK_API,
            {
                "location": location,
                "tags": tags,
                "sku": {"name": "Standard", "tier": "Regional"},
                "properties": {
                    "publicIPAllocationMethod": "Static",
                    "publicIPAddressVersion": "IPv4",
                },
            },
        )
        nic = self._put(
            self._network(f"networkInterfaces/{name}-nic"),
            NETWORK_API,
            {
                "location": location,
                "tags": tags,
                "properties": {
                    "ipConfigurations": [
                        {
                            "name": "ipconfig1",
                            "properties": {
                                "subnet": {"id": subnet},
                                "privateIPAllocationMethod": "Dynamic",
                                "publicIPAddress": {"id": ip.get("id") or self._ip_id(name)},
                            },
                        }
                    ]
                },
            },
        )
        vm = self._vm_body(name, image_id, user_data, tags, nic.get("id") or self._nic_id(name))
        _, _, headers = self._request("PUT", self._vm_path(name), COMPUTE_API, json=vm)
        if operation := _header(headers, "Azure-AsyncOperation"):
            self._creations[name] = operation  # its error message, should the VM fail
        return name

    def _vm_body(
        self, name: str, image_id: str, user_data: str, tags: dict[str, str], nic_id: str
    ) -> dict[str, Any]:
        admin = self.admin_user
        keys = [
            {"path": f"/home/{admin}/.ssh/authorized_keys", "keyData": key}
            for key in _boot_keys(user_data)
        ]
        return {
            "location": self.settings.location,
            "tags": tags,
            "properties": {
                "hardwareProfile": {"vmSize": self.settings.vm_size},
                "storageProfile": {
                    "imageReference": {"id": image_id},
                    "osDisk": {
                        "createOption": "FromImage",
                        "deleteOption": "Delete",
                        "managedDisk": {"storageAccountType": "Standard_LRS"},
                    },
                },
                "osProfile": {
                    "computerName": name,
                    "adminUsername": admin,
                    "customData": base64.b64encode(user_data.encode()).decode(),
                    "linuxConfiguration": {
                        "disablePasswordAuthentication": True,
                        "ssh": {"publicKeys": keys},
                    },
                },
                "networkProfile": {
                    "networkInterfaces": [
                        {"id": nic_id, "properties": {"primary": True, "deleteOption": "Delete"}}
                    ]
                },
            },
        }

    def server_address(self, server_id: str) -> str | None:
        vm, _, _ = self._request("GET", self._vm_path(server_id), COMPUTE_API)
        state = _state(vm)
        if state in ("Failed", "Canceled"):
            raise CloudError(f"Microsoft Azure: VM {server_id} is {state}{self._why(server_id)}")
        if state != "Succeeded":
            return None
        ip, _, _ = self._request("GET", self._ip_id(server_id), NETWORK_API)
        address = (ip.get("properties") or {}).get("ipAddress")
        if not address:
            raise CloudError(f"Microsoft Azure: VM {server_id} runs without a public IPv4")
        return str(address)

    def _why(self, name: str) -> str:
        """The failed creation's own message, when this driver started it."""
        if name not in self._creations:
            return ""
        body, _, _ = self._request("GET", self._creations[name], "")
        message = _error(body)
        return f": {message}" if message else ""

    def delete_server(self, server_id: str) -> None:
        """VM (its OS disk and NIC go with it), then NIC and IP: each waits for the one
        before, as a NIC in use or an IP still attached cannot be deleted."""
        self._delete(self._vm_path(server_id), COMPUTE_API)
        self._delete(self._network(f"networkInterfaces/{server_id}-nic"), NETWORK_API)
        self._delete(self._network(f"publicIPAddresses/{server_id}-ip"), NETWORK_API)

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        """VMs carrying the labels, and the ones whose creation a killed run left at its
        IP or NIC: all are found by the names their pieces are given."""
        found: set[str] = set()
        for path, api, suffix in (
            (self._compute("virtualMachines"), COMPUTE_API, ""),
            (self._network("networkInterfaces"), NETWORK_API, "-nic"),
            (self._network("publicIPAddresses"), NETWORK_API, "-ip"),
        ):
            for item in self._listing(path, api):
                name = str(item.get("name") or "")
                if _carries(item, labels) and name.endswith(suffix):
                    found.add(name.removesuffix(suffix) if suffix else name)
        return sorted(found)

    def _check_subnet(self) -> str:
        """The check subnet's id: reused when it exists, else created (idempotent PUTs)."""
        if self._subnet_id:
            return self._subnet_id
        vnet = self._network(f"virtualNetworks/{CHECK_VNET}")
        subnet, _, _ = self._request(
            "GET", f"{vnet}/subnets/{CHECK_SUBNET}", NETWORK_API, ok_missing=True
        )
        if _state(subnet) != "Succeeded":
            nsg_path = self._network(f"networkSecurityGroups/{CHECK_NSG}")
            nsg = self._put(nsg_path, NETWORK_API, self._nsg_body())
            self._put(vnet, NETWORK_API, self._vnet_body(nsg.get("id") or ""))
        self._subnet_id = f"{vnet}/subnets/{CHECK_SUBNET}"
        return self._subnet_id

    def _nsg_body(self) -> dict[str, Any]:
        # Standard public IPs are closed to inbound traffic until an NSG opens a port.
        ssh = {
            "protocol": "Tcp",
            "sourceAddressPrefix": "*",
            "sourcePortRange": "*",
            "destinationAddressPrefix": "*",
            "destinationPortRange": str(self.ssh_port),
            "access": "Allow",
            "direction": "Inbound",
            "priority": 1000,
        }
        return {
            "location": self.settings.location,
            "tags": dict(MANAGED),
            "properties": {"securityRules": [{"name": "ssh-in", "properties": ssh}]},
        }

    def _vnet_body(self, nsg_id: str) -> dict[str, Any]:
        nsg = nsg_id or self._network(f"networkSecurityGroups/{CHECK_NSG}")
        subnet = {"addressPrefix": CHECK_PREFIX, "networkSecurityGroup": {"id": nsg}}
        return {
            "location": self.settings.location,
            "tags": dict(MANAGED),
            "properties": {
                "addressSpace": {"addressPrefixes": [CHECK_PREFIX]},
                "subnets": [{"name": CHECK_SUBNET, "properties": subnet}],
            },
        }

    # --- images ------------------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        """Merge: these values for these keys, Packer's own tags kept; one call, safe to
        repeat."""
        self._merge_tags(image_id, _tags(labels))

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        """Managed images cannot be renamed (Packer named it already) or shared: the name
        and description go into tags; with a gallery configured, a gallery image version
        replicated to the publish regions is what users boot."""
        tags = {"imagefactory-name": name, "imagefactory-description": description[:256]}
        where = [f"managed image {image_id.rsplit('/', 1)[-1]} ({self.settings.location})"]
        gallery = self.settings.gallery
        if gallery:
            version = self._gallery_version(image_id, name)
            tags[GALLERY_VERSION_TAG] = version
            regions = ", ".join(self._regions())
            where.append(f"gallery version {version.split('/galleries/', 1)[1]} ({regions})")
        self._merge_tags(image_id, tags)
        return where

    def _gallery_version(self, image_id: str, name: str) -> str:
        gallery = self.settings.gallery  # type: ignore[attr-defined]
        definition = self.settings.gallery_image or name.rsplit("-", 1)[0]
        path = self._compute(
            f"galleries/{gallery}/images/{definition}/versions/{gallery_version(name)}"
        )
        body = {
            "location": self.settings.location,
            "tags": _tags(MANAGED | {ROLE: "image"}),
            "properties": {
                "storageProfile": {"source": {"id": image_id}},
                "publishingProfile": {
                    "replicaCount": 1,
                    "storageAccountType": "Standard_LRS",
                    "targetRegions": [
                        {"name": region, "regionalReplicaCount": 1} for region in self._regions()
                    ],
                },
            },
        }
        self._put(path, GALLERY_API, body)
        return path

    def _regions(self) -> list[str]:
        extra = list(self.settings.publish_regions)
        return list(dict.fromkeys([self.settings.location, *extra]))

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        images = self._listing(self._compute("images"), COMPUTE_API)
        return [_cloud_image(i) for i in images if _carries(i, labels)]

    def delete_image(self, image_id: str) -> None:
        """The image, and the gallery version publish_image made of it (gone already is
        fine for both)."""
        image, _, _ = self._request("GET", image_id, COMPUTE_API, ok_missing=True)
        version = (image.get("tags") or {}).get(GALLERY_VERSION_TAG, "")
        if version.startswith(f"{self.group_path}/providers/Microsoft.Compute/galleries/"):
            self._delete(version, GALLERY_API)
        if image:
            self._delete(image_id, COMPUTE_API)

    def _merge_tags(self, resource_id: str, tags: dict[str, str]) -> None:
        body = {"operation": "Merge", "properties": {"tags": tags}}
        path = f"{resource_id}/providers/Microsoft.Resources/tags/default"
        self._request("PATCH", path, TAGS_API, json=body, idempotent=True)

    # --- paths -------------------------------------------------------------------------

    def _compute(self, rest: str) -> str:
        return f"{self.group_path}/providers/Microsoft.Compute/{rest}"

    def _network(self, rest: str) -> str:
        return f"{self.group_path}/providers/Microsoft.Network/{rest}"

    def _vm_path(self, name: str) -> str:
        return self._compute(f"virtualMachines/{name}")

    def _ip_id(self, name: str) -> str:
        return self._network(f"publicIPAddresses/{name}-ip")

    def _nic_id(self, name: str) -> str:
        return self._network(f"networkInterfaces/{name}-nic")


# --- shapes ---------------------------------------------------------------------------


def next_link(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
    """ARM: ``nextLink`` is the absolute URL of the next page (api-version included)."""
    following = body.get("nextLink")
    return (str(following), None) if following else None


def gallery_version(name: str) -> str:
    """A gallery version (Major.Minor.Patch, 32-bit each) from "<image>-YYYYMMDD.N"."""
    found = re.search(r"-(\d{4})(\d{4})\.(\d+)$", name)
    if not found:
        raise ConfigError(f"Microsoft Azure: {name!r} has no YYYYMMDD.N serial for a version")
    year, month_day, build = found.groups()
    return f"{int(year)}.{int(month_day)}.{int(build)}"


def _boot_keys(user_data: str) -> list[str]:
    """The keys clouds.check_user_data authorises: Azure wants them in osProfile too."""
    config = yaml.safe_load(user_data) if user_data.strip() else None
    keys = config.get("ssh_authorized_keys") if isinstance(config, dict) else None
    if not keys:
        raise ConfigError("Microsoft Azure: the user data authorises no SSH key")
    return [str(key).strip() for key in keys]


def _tags(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not key or len(key) > 512 or len(value) > 256 or TAG_KEY_FORBIDDEN & set(key):
            raise ConfigError(f"Microsoft Azure: label {key}={value!r} cannot be an ARM tag")
    return dict(labels)


def _carries(resource: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    tags = resource.get("tags") or {}
    return all(tags.get(key) == value for key, value in labels.items())


def _cloud_image(image: dict[str, Any]) -> CloudImage:
    # Packer names the managed image "<image>-<serial>": the name retention groups by.
    system = image.get("systemData") or {}
    return CloudImage(
        id=str(image["id"]),
        name=str(image.get("name") or ""),
        created=str(system.get("createdAt") or ""),
        labels=dict(image.get("tags") or {}),
    )


def _state(resource: Mapping[str, Any]) -> str:
    return str((resource.get("properties") or {}).get("provisioningState") or "")


def _error(operation: Mapping[str, Any]) -> str:
    error = operation.get("error") or {}
    return str(error.get("message") or error.get("code") or "")[:300]


def _name(path: str) -> str:
    """A resource as errors show it: type and name, not the subscription."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    return "/".join(parts[-2:])


def _header(headers: Mapping[str, str], name: str) -> str:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), "").strip()


def _retry_after(headers: Mapping[str, str]) -> float | None:
    told = _header(headers, "Retry-After")
    try:
        return max(0.0, float(told)) if told else None
    except ValueError:
        return None
