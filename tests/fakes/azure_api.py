"""Just enough of Azure on 127.0.0.1 for the driver tests: Microsoft Entra ID's client-
credentials token endpoint and Azure Resource Manager for one resource group (public IPs,
NSGs, VNets and their subnets, NICs, VMs, managed images, gallery image versions, the tags
API), in the documented shapes (learn.microsoft.com/rest/api).

Long-running operations as ARM runs them: a PUT answers 201/200 with Azure-AsyncOperation,
a DELETE 202 with Azure-AsyncOperation and Location (image deletes: Location only); the
operation reports InProgress, with Retry-After, for ``polls_until_done`` polls, then
Succeeded (or Failed with ``failing_vms`` as the message) and only then takes effect. A NIC
a VM uses and a public IP a NIC uses cannot be deleted (as in Azure). Lists come in pages
of ``page_size`` chained by an absolute ``nextLink``. Each resource type accepts exactly the
api-version the driver is meant to use, so a typo fails a test."""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .cloud_server import FakeCloud, Request

SUBSCRIPTION = "5f0a8c1e-2b7d-4e39-9c61-0d4a7b3e8f12"
TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CLIENT_ID = "0e4d1c5a-9b8f-4a2e-8d3c-6f7b1a2c9e04"
GROUP = "imagefactory-test"
LOCATION = "westeurope"
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)
API = {
    "Microsoft.Compute/virtualMachines": "2023-03-01",
    "Microsoft.Compute/images": "2023-03-01",
    "Microsoft.Compute/galleries/images/versions": "2022-03-03",
    "Microsoft.Network/publicIPAddresses": "2023-05-01",
    "Microsoft.Network/networkInterfaces": "2023-05-01",
    "Microsoft.Network/networkSecurityGroups": "2023-05-01",
    "Microsoft.Network/virtualNetworks": "2023-05-01",
    "Microsoft.Network/virtualNetworks/subnets": "2023-05-01",
}
TAGS_API = "2021-04-01"
# Azure refuses these as adminUsername (Compute's documented list, shortened).
RESERVED_USERS = {"admin", "administrator", "root", "user", "guest", "test", "sys", "support"}

Answer = tuple[Any, ...]  # (status, body) or (status, body, headers)


@dataclass
class AzureRequest(Request):
    content_type: str = ""


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Operation:
    kind: str  # "put" | "delete"
    resource_id: str  # lower-cased key of ``resources``
    polls: int = 0
    status: str = "InProgress"
    error: str = ""


@dataclass
class FakeAzure(FakeCloud):
    """``token`` is the prefix of every access token issued; ``client_secret`` the one the
    service principal has."""

    client_secret: str = "secret"
    client_id: str = CLIENT_ID
    tenant: str = TENANT
    subscription: str = SUBSCRIPTION
    group: str = GROUP
    location: str = LOCATION
    page_size: int = 2
    polls_until_done: int = 1
    retry_after: str = "3"
    token_lifetime: int = 3599
    failing_vms: str = ""  # VM creations end Failed with this message
    tokens: set[str] = field(default_factory=set)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # lower-cased id ->
    operations: dict[str, Operation] = field(default_factory=dict)
    custom_data: dict[str, str] = field(default_factory=dict)  # VM name -> decoded
    gallery_images: set[str] = field(default_factory=set)  # lower-cased definition ids
    handler_errors: list[str] = field(default_factory=list)
    _serials: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _ticks: Iterator[int] = field(default_factory=itertools.count)
    _pending: dict[str, str] = field(default_factory=dict)  # resource -> its last operation
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def group_id(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.group}"

    def environment(self, **overrides: str) -> dict[str, str]:
        return {
            "ARM_CLIENT_ID": self.client_id,
            "ARM_CLIENT_SECRET": self.client_secret,
            "ARM_TENANT_ID": self.tenant,
            "ARM_SUBSCRIPTION_ID": self.subscription,
            "AZURE_AUTHORITY_HOST": f"{self.url}/entra",
            "AZURE_RESOURCE_MANAGER_URL": f"{self.url}/arm",
        } | overrides

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    # --- seeding ------------------------------------------------------------------------

    def seed_image(self, name: str, tags: dict[str, str] | None = None) -> str:
        """A managed image as Packer leaves it (its full resource id)."""
        image_id = f"{self.group_id}/providers/Microsoft.Compute/images/{name}"
        self.resources[image_id.lower()] = {
            "id": image_id, "name": name, "type": "Microsoft.Compute/images",
            "location": self.location, "tags": dict(tags or {}),
            "systemData": {"createdAt": self._now(), "createdByType": "Application"},
            "properties": {"provisioningState": "Succeeded", "hyperVGeneration": "V2",
                           "storageProfile": {"osDisk": {"osType": "Linux",
                                                         "osState": "Generalized"}}},
        }  # fmt: skip
        return image_id

    def seed_gallery_image(self, gallery: str, definition: str) -> str:
        path = f"{self.group_id}/providers/Microsoft.Compute/galleries/{gallery}"
        path += f"/images/{definition}"
        self.gallery_images.add(path.lower())
        return path

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.resources.values() if r["type"].lower() == kind.lower()]

    def names(self, kind: str) -> set[str]:
        return {r["name"] for r in self.of_type(kind)}

    # --- requests: form bodies, Entra and ARM -------------------------------------------

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length).decode() if length else ""
        content_type = http.headers.get("Content-Type", "")
        body: Any = None
        if raw:
            try:
                body = parse_qs(raw) if "form-urlencoded" in content_type else json.loads(raw)
            except ValueError:
                body = raw
        request = AzureRequest(
            method, parts.path, parse_qs(parts.query), body,
            http.headers.get("Authorization", ""), content_type=content_type,
        )  # fmt: skip
        self.requests.append(request)
        if fault := self._fault_for(method, parts.path):
            time.sleep(fault.delay)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return self._answer(http, fault.status, _error("Fault", "injected"), headers)
        with self._lock:
            answer = self._dispatch(request)
        self._answer(http, answer[0], copy.deepcopy(answer[1]), *answer[2:])

    def _dispatch(self, request: AzureRequest) -> Answer:
        try:
            if request.path.startswith("/entra/"):
                return self._issue_token(request)
            if not request.path.startswith("/arm/"):
                raise Refused(404, "NotFound", "no such endpoint")
            if not request.authorization.startswith("Bearer ") or (
                request.authorization.removeprefix("Bearer ") not in self.tokens
            ):
                raise Refused(401, "InvalidAuthenticationToken", "The access token is invalid.")
            return self._arm(request, request.path.removeprefix("/arm"))
        except Refused as exc:
            return exc.status, _error(exc.code, str(exc))
        except Exception as exc:  # a bug in the fake: make it visible to the test
            self.handler_errors.append(f"{request.method} {request.path}: {exc!r}")
            return 500, _error("InternalServerError", "fake handler crashed")

    # --- Entra ID -----------------------------------------------------------------------

    def _issue_token(self, request: AzureRequest) -> Answer:
        if request.method != "POST" or request.path != f"/entra/{self.tenant}/oauth2/v2.0/token":
            return 400, {"error": "invalid_request",
                         "error_description": "AADSTS90002: Tenant not found."}  # fmt: skip
        form = {k: v[-1] for k, v in (request.body or {}).items()}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type", "error_description": "AADSTS70003"}
        if form.get("scope") != "https://management.azure.com/.default":
            return 400, {"error": "invalid_scope", "error_description": "AADSTS70011"}
        if (form.get("client_id"), form.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            message = "AADSTS7000215: Invalid client secret provided."
            return 401, {"error": "invalid_client", "error_description": message}
        token = f"{self.token}{next(self._serials)}"
        self.tokens.add(token)
        return 200, {"token_type": "Bearer", "expires_in": self.token_lifetime,
                     "ext_expires_in": self.token_lifetime, "access_token": token}  # fmt: skip

    # --- ARM ----------------------------------------------------------------------------

    def _arm(self, request: AzureRequest, path: str) -> Answer:
        segments = path.strip("/").split("/")
        if len(segments) >= 6 and segments[2] == "providers" and segments[4] == "locations":
            return self._poll(request, segments)
        prefix = f"{self.group_id}/providers/".lower()
        if not path.lower().startswith(prefix):
            raise Refused(404, "ResourceGroupNotFound", f"Resource group '{path}' not found.")
        if "/providers/microsoft.resources/tags/default" in path.lower():
            return self._tags(request, path)
        namespace, *rest = path[len(prefix) :].split("/")
        kind = "/".join([namespace, *rest[0::2]])
        api = next((v for k, v in API.items() if k.lower() == kind.lower()), None)
        if api is None:
            raise Refused(400, "NoRegisteredProviderFound", f"No registered provider for {kind}")
        asked = (request.query.get("api-version") or [""])[-1]
        if asked != api:
            raise Refused(400, "InvalidApiVersionParameter", f"api-version '{asked}' for {kind}")
        if len(rest) % 2:
            if request.method != "GET":
                raise Refused(405, "MethodNotAllowed", "collections are only listed")
            return self._list(request, path, kind, api)
        handler = getattr(self, f"_{request.method.lower()}", None)
        if handler is None:
            raise Refused(405, "MethodNotAllowed", f"{request.method} {kind}")
        return handler(request, path, kind)

    def _get(self, request: AzureRequest, path: str, kind: str) -> Answer:
        if kind == "Microsoft.Network/virtualNetworks/subnets":
            return 200, self._subnet(path)
        resource = self._find(path)
        # Time passes between looks: a resource being created gets on as if polled.
        op_id = self._pending.get(path.lower())
        if op_id and self.operations[op_id].status == "InProgress":
            self._advance(self.operations[op_id])
        return 200, resource

    def _subnet(self, path: str) -> dict[str, Any]:
        vnet = self._find(path.rsplit("/subnets/", 1)[0])
        name = path.rsplit("/", 1)[1]
        for subnet in vnet["properties"]["subnets"]:
            if subnet["name"] == name:
                state = vnet["properties"]["provisioningState"]
                return subnet | {"properties": subnet["properties"] | {"provisioningState": state}}
        raise Refused(404, "NotFound", f"Resource {path} not found.")

    def _list(self, request: AzureRequest, path: str, kind: str, api: str) -> Answer:
        items = sorted(self.of_type(kind), key=lambda r: r["name"])
        start = int((request.query.get("$skiptoken") or ["0"])[-1])
        chunk = items[start : start + self.page_size]
        body: dict[str, Any] = {"value": chunk}
        if start + self.page_size < len(items):
            following = start + self.page_size
            body["nextLink"] = f"{self.url}/arm{path}?api-version={api}&$skiptoken={following}"
        return 200, body

    def _put(self, request: AzureRequest, path: str, kind: str) -> Answer:
        body = request.body
        if not isinstance(body, dict) or not isinstance(body.get("properties"), dict):
            raise Refused(400, "InvalidRequestContent", "properties are required")
        if body.get("location") != self.location:
            raise Refused(400, "LocationRequired", f"location must be {self.location}")
        name = path.rsplit("/", 1)[1]
        resource_id = path
        checker = getattr(self, f"_check_{kind.rsplit('/', 1)[1]}", None)
        if checker is None:
            raise Refused(405, "MethodNotAllowed", f"PUT {kind}")
        properties = checker(name, resource_id, body)
        existing = self.resources.get(resource_id.lower())
        resource = {
            "id": resource_id, "name": name, "type": kind, "location": body["location"],
            "tags": dict(body.get("tags") or {}),
            "properties": properties | {"provisioningState": "Updating" if existing
                                        else "Creating"},
        }  # fmt: skip
        if "sku" in body:
            resource["sku"] = body["sku"]
        self.resources[resource_id.lower()] = resource
        return self._start(Operation("put", resource_id.lower()), 200 if existing else 201)

    def _delete(self, request: AzureRequest, path: str, kind: str) -> Answer:
        resource = self.resources.get(path.lower())
        if resource is None:
            return 204, None  # ARM: deleting what is not there succeeds
        props = resource["properties"]
        users = {
            "Microsoft.Network/networkInterfaces": ("virtualMachine", "NicInUse"),
            "Microsoft.Network/publicIPAddresses": ("ipConfiguration", "InUse"),
        }
        if kind in users:
            user, code = users[kind]
            holder = (props.get(user) or {}).get("id", "")
            if holder and self._holder(holder).lower() in self.resources:
                raise Refused(400, code, f"{resource['name']} is in use by {holder}")
        props["provisioningState"] = "Deleting"
        location_only = kind == "Microsoft.Compute/images"
        return self._start(Operation("delete", path.lower()), 202, location_only)

    def _patch(self, request: AzureRequest, path: str, kind: str) -> Answer:
        raise Refused(405, "MethodNotAllowed", "use the tags API")

    def _tags(self, request: AzureRequest, path: str) -> Answer:
        scope = path[: path.lower().index("/providers/microsoft.resources/tags/default")]
        if (request.query.get("api-version") or [""])[-1] != TAGS_API:
            raise Refused(400, "InvalidApiVersionParameter", "tags api-version")
        if request.method != "PATCH":
            raise Refused(405, "MethodNotAllowed", request.method)
        resource = self._find(scope)
        body = request.body or {}
        tags = (body.get("properties") or {}).get("tags")
        operation = body.get("operation")
        if operation not in ("Merge", "Replace", "Delete") or not isinstance(tags, dict):
            raise Refused(400, "InvalidTagsRequest", "operation and properties.tags required")
        for key, value in tags.items():
            if set("<>%&\\?/") & set(key) or len(str(value)) > 256:
                raise Refused(400, "InvalidTagNameCharacters", f"tag {key!r}")
        if operation == "Replace":
            resource["tags"] = dict(tags)
        elif operation == "Merge":
            resource["tags"] |= tags
        else:
            resource["tags"] = {k: v for k, v in resource["tags"].items() if k not in tags}
        return 200, {"id": f"{resource['id']}/providers/Microsoft.Resources/tags/default",
                     "name": "default", "type": "Microsoft.Resources/tags",
                     "properties": {"tags": resource["tags"]}}  # fmt: skip

    # --- what each resource type requires (and becomes) --------------------------------

    def _check_publicIPAddresses(self, name: str, rid: str, body: dict) -> dict:
        props = body["properties"]
        if (body.get("sku") or {}).get("name") != "Standard":
            raise Refused(400, "BasicSkuRetired", "Basic SKU public IPs are retired")
        if props.get("publicIPAllocationMethod") != "Static":
            raise Refused(400, "StandardSkuPublicIPAddressesMustBeStatic", "must be Static")
        return {"publicIPAllocationMethod": "Static",
                "publicIPAddressVersion": props.get("publicIPAddressVersion", "IPv4")}  # fmt: skip

    def _check_networkSecurityGroups(self, name: str, rid: str, body: dict) -> dict:
        rules = body["properties"].get("securityRules") or []
        for rule in rules:
            props = rule.get("properties") or {}
            needed = {
                "protocol", "access", "direction", "priority", "destinationPortRange",
                "sourceAddressPrefix", "sourcePortRange", "destinationAddressPrefix",
            }  # fmt: skip
            if not rule.get("name") or needed - set(props):
                raise Refused(400, "InvalidSecurityRule", f"rule {rule.get('name')} incomplete")
            if not 100 <= int(props["priority"]) <= 4096:
                raise Refused(400, "SecurityRuleInvalidPriority", "priority 100..4096")
        return {"securityRules": rules}

    def _check_virtualNetworks(self, name: str, rid: str, body: dict) -> dict:
        props = body["properties"]
        if not (props.get("addressSpace") or {}).get("addressPrefixes"):
            raise Refused(400, "InvalidAddressSpace", "addressSpace.addressPrefixes required")
        subnets = []
        for subnet in props.get("subnets") or []:
            sprops = subnet.get("properties") or {}
            if not subnet.get("name") or not sprops.get("addressPrefix"):
                raise Refused(400, "InvalidSubnet", "subnet name and addressPrefix required")
            nsg = (sprops.get("networkSecurityGroup") or {}).get("id")
            if nsg:
                self._find(nsg)
            subnets.append({"id": f"{rid}/subnets/{subnet['name']}", "name": subnet["name"],
                            "properties": sprops})  # fmt: skip
        return {"addressSpace": props["addressSpace"], "subnets": subnets}

    def _check_networkInterfaces(self, name: str, rid: str, body: dict) -> dict:
        configs = body["properties"].get("ipConfigurations") or []
        if len(configs) != 1 or not configs[0].get("name"):
            raise Refused(400, "InvalidIpConfiguration", "one named ipConfiguration expected")
        props = configs[0].get("properties") or {}
        if (
            self._subnet((props.get("subnet") or {}).get("id", ""))["properties"][
                "provisioningState"
            ]
            != "Succeeded"
        ):
            raise Refused(400, "ReferencedResourceNotProvisioned", "subnet not ready")
        ip = self._find((props.get("publicIPAddress") or {}).get("id", ""))
        if ip["properties"]["provisioningState"] != "Succeeded":
            raise Refused(400, "ReferencedResourceNotProvisioned", f"{ip['name']} not ready")
        config_id = f"{rid}/ipConfigurations/{configs[0]['name']}"
        holder = (ip["properties"].get("ipConfiguration") or {}).get("id", "")
        if holder and not holder.lower().startswith(rid.lower() + "/"):
            raise Refused(400, "PublicIPAddressInUse", f"{ip['name']} is in use")
        ip["properties"]["ipConfiguration"] = {"id": config_id}
        config = {"id": config_id, "name": configs[0]["name"], "properties": props}
        return {"ipConfigurations": [config]}

    def _check_virtualMachines(self, name: str, rid: str, body: dict) -> dict:
        props = body["properties"]
        if not (props.get("hardwareProfile") or {}).get("vmSize"):
            raise Refused(400, "InvalidParameter", "hardwareProfile.vmSize required")
        storage = props.get("storageProfile") or {}
        image = (storage.get("imageReference") or {}).get("id", "")
        if image.lower() not in self.resources:
            raise Refused(404, "NotFound", f"The Image '{image}' cannot be found.")
        if (storage.get("osDisk") or {}).get("createOption") != "FromImage":
            raise Refused(400, "InvalidParameter", "osDisk.createOption must be FromImage")
        self._check_os_profile(name, props.get("osProfile") or {})
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        if not nics:
            raise Refused(400, "InvalidParameter", "networkProfile.networkInterfaces required")
        for reference in nics:
            nic = self._find(reference.get("id", ""))
            if nic["properties"]["provisioningState"] != "Succeeded":
                raise Refused(400, "ReferencedResourceNotProvisioned", f"{nic['name']} not ready")
            holder = (nic["properties"].get("virtualMachine") or {}).get("id", "")
            if holder and holder.lower() != rid.lower():
                raise Refused(400, "NicInUse", f"{nic['name']} is attached to {holder}")
            nic["properties"]["virtualMachine"] = {"id": rid}
        stored = copy.deepcopy(props)
        stored["osProfile"].pop("customData", None)  # ARM never returns it
        return stored | {"vmId": str(uuid.uuid4())}

    def _check_os_profile(self, name: str, os_profile: dict) -> None:
        admin = os_profile.get("adminUsername", "")
        if not admin or admin.lower() in RESERVED_USERS or not os_profile.get("computerName"):
            raise Refused(400, "InvalidParameter", f"adminUsername {admin!r} is not allowed")
        linux = os_profile.get("linuxConfiguration") or {}
        keys = (linux.get("ssh") or {}).get("publicKeys") or []
        if linux.get("disablePasswordAuthentication") is not True or "adminPassword" in os_profile:
            raise Refused(400, "InvalidParameter", "the check VM must have no password")
        if not keys or any(k.get("path") != f"/home/{admin}/.ssh/authorized_keys" for k in keys):
            raise Refused(400, "InvalidParameter", "ssh.publicKeys with the admin's path needed")
        try:
            data = base64.b64decode(os_profile.get("customData", ""), validate=True)
        except binascii.Error:
            raise Refused(400, "InvalidParameter", "customData must be base64") from None
        self.custom_data[name] = data.decode()

    def _check_versions(self, name: str, rid: str, body: dict) -> dict:
        definition = rid.rsplit("/versions/", 1)[0]
        if definition.lower() not in self.gallery_images:
            raise Refused(404, "ParentResourceNotFound", f"{definition} not found")
        props = body["properties"]
        source = ((props.get("storageProfile") or {}).get("source") or {}).get("id", "")
        self._find(source)
        regions = (props.get("publishingProfile") or {}).get("targetRegions") or []
        if not regions or not all(r.get("name") for r in regions):
            raise Refused(400, "InvalidParameter", "publishingProfile.targetRegions required")
        return copy.deepcopy(props)

    # --- long-running operations --------------------------------------------------------

    def _start(self, operation: Operation, status: int, location_only: bool = False) -> Answer:
        op_id = str(uuid.uuid4())
        self.operations[op_id] = operation
        self._pending[operation.resource_id] = op_id
        namespace = self.resources[operation.resource_id]["type"].split("/", 1)[0]
        base = f"{self.url}/arm/subscriptions/{self.subscription}/providers/{namespace}"
        headers = {"Retry-After": self.retry_after}
        if not location_only:
            headers["Azure-AsyncOperation"] = (
                f"{base}/locations/{self.location}/operations/{op_id}?api-version=2023-03-01"
            )
        if operation.kind == "delete":
            headers["Location"] = (
                f"{base}/locations/{self.location}/operationResults/{op_id}?api-version=2023-03-01"
            )
        if self.polls_until_done <= 0:
            self._finish(operation)
        body = self.resources.get(operation.resource_id) if operation.kind == "put" else None
        return status, body, headers

    def _poll(self, request: AzureRequest, segments: list[str]) -> Answer:
        operation = self.operations.get(segments[-1])
        if operation is None or request.method != "GET":
            raise Refused(404, "NotFound", "no such operation")
        self._advance(operation)
        pending = operation.status == "InProgress"
        if segments[-2] == "operationResults":
            if pending:
                return 202, None, {"Retry-After": self.retry_after, "Location": request.path}
            if operation.status == "Failed":
                raise Refused(409, "OperationFailed", operation.error)
            return 204, None
        body: dict[str, Any] = {"name": segments[-1], "status": operation.status}
        if operation.error:
            body["error"] = {"code": "OperationFailed", "message": operation.error}
        return 200, body, ({"Retry-After": self.retry_after} if pending else {})

    def _advance(self, operation: Operation) -> None:
        operation.polls += 1
        if operation.status == "InProgress" and operation.polls > self.polls_until_done:
            self._finish(operation)

    def _finish(self, operation: Operation) -> None:
        resource = self.resources.get(operation.resource_id)
        if resource is None:
            operation.status = "Succeeded"
            return
        if operation.kind == "delete":
            self._remove(resource)
            operation.status = "Succeeded"
            return
        kind = resource["type"]
        if kind == "Microsoft.Compute/virtualMachines" and self.failing_vms:
            resource["properties"]["provisioningState"] = "Failed"
            operation.status, operation.error = "Failed", self.failing_vms
            return
        if kind == "Microsoft.Network/publicIPAddresses":
            resource["properties"]["ipAddress"] = "127.0.0.1"
        if kind.endswith("/versions"):
            published = {"publishedDate": self._now(), "replicaCount": 1}
            resource["properties"]["publishingProfile"] |= published
        resource["properties"]["provisioningState"] = "Succeeded"
        operation.status = "Succeeded"

    def _remove(self, resource: dict[str, Any]) -> None:
        del self.resources[resource["id"].lower()]
        props = resource["properties"]
        for nic_ref in (props.get("networkProfile") or {}).get("networkInterfaces") or []:
            nic = self.resources.get(nic_ref["id"].lower())
            if nic is None:
                continue
            nic["properties"].pop("virtualMachine", None)
            if (nic_ref.get("properties") or {}).get("deleteOption") == "Delete":
                self._remove(nic)
        for config in props.get("ipConfigurations") or []:
            ip_id = ((config.get("properties") or {}).get("publicIPAddress") or {}).get("id", "")
            if ip := self.resources.get(ip_id.lower()):
                ip["properties"].pop("ipConfiguration", None)

    # --- plumbing -----------------------------------------------------------------------

    def _find(self, resource_id: str) -> dict[str, Any]:
        resource = self.resources.get(resource_id.lower())
        if resource is None:
            name = resource_id.rsplit("/", 1)[-1]
            raise Refused(404, "ResourceNotFound", f"The Resource '{name}' was not found.")
        return resource

    @staticmethod
    def _holder(reference: str) -> str:
        """The resource an ipConfiguration id belongs to (its NIC)."""
        return reference.split("/ipConfigurations/", 1)[0]

    def _now(self) -> str:
        """A clock that moves a minute per call: creation order is unambiguous."""
        return (EPOCH + timedelta(minutes=next(self._ticks))).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
