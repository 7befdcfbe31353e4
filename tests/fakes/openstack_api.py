"""Just enough of OpenStack on 127.0.0.1 for the driver tests: Keystone v3 password tokens
with a service catalog pointing back at this server, Nova v2.1 servers and flavors, Glance v2
images (tags, JSON patch, protection) and Neutron's network listing, in the documented
shapes (docs.openstack.org/api-ref).

Every catalog URL is ``{base}/{region}-{interface}/<service>``: the first path segment
(``Request.site``) tells a test which endpoint the driver chose; Keystone lives at
``{base}/identity/v3``. Servers turn ACTIVE (IPv4 127.0.0.1, floating by default) after
``polls_until_active`` GETs. Errors come in each service's own shape: Keystone's
``{"error": {...}}`` (also keystonemiddleware's 401 in front of every service), Nova's
``{"itemNotFound": {"code", "message"}}``, and Glance's webob HTML pages. Stricter than the
real services on purpose (unknown server fields are a 400), so a typo fails a test.
"""

from __future__ import annotations

import base64
import binascii
import copy
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from .cloud_server import FakeCloud, Handler, Request

INTERFACES = ("public", "internal", "admin")
ID = r"([0-9a-f-]{36})"
NOVA = "/compute/v2.1"
GLANCE = "/image"
NEUTRON = "/network"
PROJECT_ID = "8a3b1fb6c9e04f5d9d0e4f0c2b7a6d51"
DEFAULT_DOMAIN = {"id": "default", "name": "Default"}
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)
SERVER_FIELDS = {
    "name", "imageRef", "flavorRef", "networks", "user_data", "metadata", "key_name",
    "security_groups", "availability_zone", "config_drive", "block_device_mapping_v2",
    "min_count", "max_count", "description", "accessIPv4", "accessIPv6", "adminPass",
}  # fmt: skip
# Glance: what a JSON patch may not touch; tags and protection are changed on their own.
READ_ONLY = {
    "id", "status", "created_at", "updated_at", "checksum", "size", "virtual_size", "self",
    "file", "schema", "owner", "os_hash_algo", "os_hash_value", "direct_url", "locations",
}  # fmt: skip
CORE = {"name", "visibility", "protected", "tags", "min_disk", "min_ram", "disk_format",
        "container_format", "os_hidden"}  # fmt: skip
PATCH_TYPES = ("application/openstack-images-v2.1-json-patch",
               "application/openstack-images-v2.0-json-patch")  # fmt: skip
NOVA_FAULTS = {400: "badRequest", 403: "forbidden", 404: "itemNotFound",
               409: "conflictingRequest", 413: "overLimit", 429: "overLimit"}  # fmt: skip
REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           409: "Conflict", 415: "Unsupported Media Type", 429: "Too Many Requests"}  # fmt: skip

Answer = tuple[Any, ...]  # (status, body) or (status, body, headers)


@dataclass
class OSRequest(Request):
    """``authorization`` holds the X-Auth-Token header (empty for Keystone's login)."""

    site: str = ""  # "identity" or "<region>-<interface>": which catalog entry was used
    content_type: str = ""
    microversion: str = ""  # the compute microversion asked for ("" : 2.1)


class Html(str):
    """A webob error page, as Glance answers (requests sends Accept: */*)."""


class Refused(Exception):
    """Raised by handlers: answered in the service's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class FakeOpenStack(FakeCloud):
    """``token`` is the prefix of every token issued; ``password`` is the demo user's."""

    password: str = "secret"
    username: str = "demo"
    project_name: str = "demo"
    regions: list[str] = field(default_factory=lambda: ["RegionOne", "RegionTwo"])
    services: set[str] = field(default_factory=lambda: {"identity", "compute", "image",
                                                        "network"})  # fmt: skip
    image_suffix: str = ""  # e.g. "/v2": some catalogs list Glance with its version
    link_prefix: str = ""  # Nova's osapi_compute_link_prefix (default: the URL asked)
    polls_until_active: int = 1
    floating_ips: bool = True  # ACTIVE servers: fixed 10.0.0.x + floating 127.0.0.1
    failing_servers: bool = False  # servers end in ERROR instead of ACTIVE
    max_limit: int = 1000  # Nova's and Glance's page cap
    tokens: set[str] = field(default_factory=set)  # valid ones
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_data: dict[str, str] = field(default_factory=dict)  # decoded; Nova never returns it
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    flavors: list[dict[str, Any]] = field(default_factory=list)
    networks: list[dict[str, Any]] = field(default_factory=list)
    handler_errors: list[str] = field(default_factory=list)  # bugs in this fake
    _ticks: Iterator[int] = field(default_factory=itertools.count)
    _serials: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _polls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.flavors = self.flavors or [
            _flavor(flavor_id, name)
            for flavor_id, name in (("1", "m1.tiny"), ("2", "m1.small"), ("3", "m1.medium"),
                                    ("4", "m1.large"), ("d1", "ds512M"))
        ]  # fmt: skip
        self.networks = self.networks or [self.network("private"), self.network("public")]
        for method, pattern, handler in (
            ("POST", "/v3/auth/tokens", self._issue_token),
            ("POST", f"{NOVA}/servers", self._create_server),
            ("GET", f"{NOVA}/servers/detail", self._list_servers),
            ("GET", f"{NOVA}/servers/{ID}", self._get_server),
            ("DELETE", f"{NOVA}/servers/{ID}", self._delete_server),
            ("GET", f"{NOVA}/flavors", self._list_flavors),
            ("GET", f"{GLANCE}/v2/images", self._list_images),
            ("GET", f"{GLANCE}/v2/images/{ID}", self._get_image),
            ("PATCH", f"{GLANCE}/v2/images/{ID}", self._patch_image),
            ("DELETE", f"{GLANCE}/v2/images/{ID}", self._delete_image),
            ("PUT", f"{GLANCE}/v2/images/{ID}/tags/([^/]+)", self._add_tag),
            ("DELETE", f"{GLANCE}/v2/images/{ID}/tags/([^/]+)", self._remove_tag),
            ("GET", f"{NEUTRON}/v2.0/networks", self._list_networks),
        ):
            self.route(method, pattern, handler)

    # --- requests: X-Auth-Token and answer headers --------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Handlers run one at a time and answer their own errors (Refused)."""

        def guarded(*groups: str, request: OSRequest) -> Answer:
            with self._lock:
                try:
                    return copy.deepcopy(handler(*groups, request=request))
                except Refused as exc:
                    return exc.status, self._error(request, exc.status, str(exc))
                except Exception as exc:  # a bug in the fake: make it visible to the test
                    self.handler_errors.append(f"{method} {pattern}: {exc!r}")
                    return 500, self._error(request, 500, "fake handler crashed")

        super().route(method, pattern, guarded)

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(http.path)
        site, _, rest = parts.path.lstrip("/").partition("/")
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        request = OSRequest(
            method, f"/{rest}", parse_qs(parts.query), body,
            http.headers.get("X-Auth-Token", ""), site=site,
            content_type=http.headers.get("Content-Type", ""),
            microversion=_microversion(http.headers),
        )  # fmt: skip
        self.requests.append(request)
        fault = self._fault_for(method, request.path)
        if fault:
            time.sleep(fault.delay)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            message = f"injected HTTP {fault.status}"
            return self._reply(http, fault.status, self._error(request, fault.status, message),
                               headers)  # fmt: skip
        if site not in self._sites():
            return self._reply(http, 404, Html(_page(404, "The resource could not be found.")))
        if site != "identity" and request.authorization not in self.tokens:
            # keystonemiddleware answers for every service, in Keystone's shape.
            body = _keystone_error(401, "The request you have made requires authentication.")
            return self._reply(http, 401, body, {"WWW-Authenticate": "Keystone uri='...'"})
        for route_method, pattern, handler in self._routes:
            match = pattern.match(request.path)
            if route_method == method and match:
                return self._reply(http, *handler(*match.groups(), request=request))
        self._reply(http, 404, self._error(request, 404, "The resource could not be found."))

    @staticmethod
    def _reply(
        http: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        if isinstance(body, Html):
            data, content_type = body.encode(), "text/html; charset=UTF-8"
        else:
            data = b"" if body is None else json.dumps(body).encode()
            content_type = "application/json"
        try:
            http.send_response(status)
            for name, value in (headers or {}).items():
                http.send_header(name, value)
            http.send_header("Content-Type", content_type)
            http.send_header("Content-Length", str(len(data)))
            http.end_headers()
            http.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _sites(self) -> set[str]:
        return {"identity"} | {f"{r}-{i}" for r in self.regions for i in INTERFACES}

    def _error(self, request: OSRequest, status: int, message: str) -> Any:
        if request.site == "identity" or status == 401:
            return _keystone_error(status, message)
        if request.path.startswith(GLANCE):
            return Html(_page(status, message))
        if request.path.startswith(NEUTRON):
            return {"NeutronError": {"type": "HTTPError", "message": message, "detail": ""}}
        return {NOVA_FAULTS.get(status, "computeFault"): {"code": status, "message": message}}

    # --- test helpers -------------------------------------------------------------------

    def environment(self, **overrides: str) -> dict[str, str]:
        """The OS_* variables of an openrc file for this cloud."""
        return {
            "OS_AUTH_URL": f"{self.url}/identity/v3",
            "OS_USERNAME": self.username,
            "OS_PASSWORD": self.password,
            "OS_PROJECT_NAME": self.project_name,
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": self.regions[0],
            "OS_INTERFACE": "public",
        } | overrides

    def seed_image(
        self,
        name: str = "packer-build",
        tags: list[str] | tuple[str, ...] = (),
        *,
        protected: bool = False,
        status: str = "active",
        owner: str = PROJECT_ID,
    ) -> str:
        """A Glance image as Packer's openstack builder leaves it; each newer than the last."""
        image_id = str(uuid.uuid4())
        now = self._now()
        self.images[image_id] = {
            "id": image_id, "name": name, "status": status, "visibility": "private",
            "protected": protected, "tags": list(tags), "created_at": now, "updated_at": now,
            "owner": owner, "min_disk": 20, "min_ram": 0, "disk_format": "qcow2",
            "container_format": "bare", "size": 812646400, "virtual_size": 21474836480,
            "checksum": "9b0f2c1e8d7a6b5c4d3e2f1a0b9c8d7e", "os_hash_algo": "sha512",
            "os_hash_value": "0" * 128, "os_hidden": False,
            "self": f"/v2/images/{image_id}", "file": f"/v2/images/{image_id}/file",
            "schema": "/v2/schemas/image",
            # Packer's `metadata` becomes image properties.
            "imagefactory_image": name.rsplit("-", 1)[0], "imagefactory_state": "built",
        }  # fmt: skip
        return image_id

    def seed_server(self, name: str, metadata: dict[str, str]) -> str:
        """A server someone else (or an earlier run) created."""
        return self._new_server({"name": name, "metadata": metadata, "imageRef": "",
                                 "flavorRef": "2"})  # fmt: skip

    def network(self, name: str) -> dict[str, Any]:
        return {
            "id": str(uuid.uuid4()), "name": name, "status": "ACTIVE", "admin_state_up": True,
            "shared": False, "router:external": name == "public", "subnets": [],
            "project_id": PROJECT_ID, "tenant_id": PROJECT_ID, "mtu": 1450,
        }  # fmt: skip

    def revoke_tokens(self) -> None:
        """As when tokens expire: every one issued so far is refused from now on."""
        self.tokens.clear()

    def site_calls(self, prefix: str) -> set[str]:
        """The catalog entries (region-interface) calls under ``prefix`` went to."""
        return {r.site for r in self.requests if r.path.startswith(prefix)}

    # --- Keystone -----------------------------------------------------------------------

    def _issue_token(self, *, request: OSRequest) -> Answer:
        try:
            auth = request.body["auth"]
            identity = auth["identity"]
            user = identity["password"]["user"]
            project = auth["scope"]["project"]
            methods = identity["methods"]
        except (KeyError, TypeError):
            raise Refused(400, "Expecting to find auth in request body.") from None
        if methods != ["password"] or set(user) - {"name", "id", "domain", "password"}:
            raise Refused(400, "Invalid input for field 'identity'.")
        known = (
            user.get("name") == self.username
            and _is_default(user.get("domain"))
            and user.get("password") == self.password
            and (project.get("id") == PROJECT_ID
                 or (project.get("name") == self.project_name
                     and _is_default(project.get("domain"))))
        )  # fmt: skip
        if not known:
            raise Refused(401, "The request you have made requires authentication.")
        token = f"{self.token}{next(self._serials)}"
        self.tokens.add(token)
        domain = dict(DEFAULT_DOMAIN)
        body = {
            "token": {
                "methods": ["password"],
                "expires_at": "2026-11-01T01:00:00.000000Z",
                "issued_at": "2026-11-01T00:00:00.000000Z",
                "audit_ids": ["3T2dc1CGQxyJsHdDu1xkcw"],
                "user": {"id": "u-demo", "name": self.username, "domain": domain,
                         "password_expires_at": None},
                "project": {"id": PROJECT_ID, "name": self.project_name, "domain": domain},
                "roles": [{"id": "r-member", "name": "member"}],
                "is_domain": False,
                "catalog": self._catalog(),
            }
        }  # fmt: skip
        return 201, body, {"X-Subject-Token": token}

    def _catalog(self) -> list[dict[str, Any]]:
        services = (("identity", "keystone", None), ("compute", "nova", NOVA),
                    ("image", "glance", GLANCE + self.image_suffix),
                    ("network", "neutron", NEUTRON))  # fmt: skip
        return [
            {
                "id": f"{name}-service", "type": kind, "name": name,
                "endpoints": [
                    {"id": f"{name}-{region}-{interface}", "interface": interface,
                     "region": region, "region_id": region,
                     "url": f"{self.url}/identity/v3" if path is None
                     else f"{self.url}/{region}-{interface}{path}"}
                    for region in self.regions for interface in INTERFACES
                ],
            }
            for kind, name, path in services
            if kind in self.services
        ]  # fmt: skip

    # --- Nova ---------------------------------------------------------------------------

    def _create_server(self, *, request: OSRequest) -> Answer:
        body = request.body
        if not isinstance(body, dict) or not isinstance(body.get("server"), dict):
            raise Refused(400, "Invalid input for field/attribute server.")
        server = body["server"]
        for name in sorted(set(server) - SERVER_FIELDS):
            raise Refused(400, f"Additional properties are not allowed ('{name}' was unexpected)")
        for name in ("name", "flavorRef", "imageRef"):
            if not server.get(name):
                raise Refused(400, f"'{name}' is a required property")
        self._check_networks(server, _version(request.microversion))
        if not any(f["id"] == server["flavorRef"] for f in self.flavors):
            raise Refused(400, "Invalid flavorRef provided.")
        image = self.images.get(server["imageRef"])
        if image is None or image["status"] != "active":
            raise Refused(400, f"Image {server['imageRef']} could not be found.")
        for key, value in (server.get("metadata") or {}).items():
            if not (isinstance(value, str) and 0 < len(key) <= 255 and len(value) <= 255):
                raise Refused(400, "Invalid input for field/attribute metadata.")
        try:
            user_data = base64.b64decode(server.get("user_data") or "", validate=True)
        except binascii.Error:
            raise Refused(400, "User data needs to be valid base 64.") from None
        if len(server.get("user_data") or "") > 65535:
            raise Refused(400, "User data too large.")
        server_id = self._new_server(server)
        self.user_data[server_id] = user_data.decode()
        answer = {
            "id": server_id, "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": "default"}], "adminPass": "kqGw8Gx7SZh3",
            "links": [{"rel": "self", "href": f"{self.url}{NOVA}/servers/{server_id}"}],
        }  # fmt: skip
        return 202, {"server": answer}

    def _check_networks(self, server: dict[str, Any], version: tuple[int, int]) -> None:
        networks = server.get("networks")
        if networks is None:
            if version >= (2, 37):
                raise Refused(400, "'networks' is a required property")
            return
        if isinstance(networks, str):
            if version < (2, 37) or networks not in ("auto", "none"):
                raise Refused(400, "Invalid input for field/attribute networks.")
            return
        known = {n["id"] for n in self.networks}
        for network in networks:
            if set(network) != {"uuid"} or network["uuid"] not in known:
                raise Refused(400, f"Network {network.get('uuid')} could not be found.")

    def _new_server(self, request: dict[str, Any]) -> str:
        server_id = str(uuid.uuid4())
        now = self._now()
        self.servers[server_id] = {
            "id": server_id, "name": request["name"], "status": "BUILD",
            "tenant_id": PROJECT_ID, "user_id": "u-demo", "metadata": dict(
                request.get("metadata") or {}), "hostId": "", "image": {
                "id": request["imageRef"]}, "flavor": {"id": request["flavorRef"]},
            "created": now, "updated": now, "addresses": {}, "accessIPv4": "",
            "accessIPv6": "", "progress": 0, "key_name": None, "config_drive": "",
            "OS-EXT-STS:vm_state": "building", "OS-EXT-STS:task_state": "scheduling",
            "OS-EXT-STS:power_state": 0, "OS-EXT-AZ:availability_zone": "",
            "security_groups": [{"name": "default"}], "locked": False, "description": None,
            "tags": [], "os-extended-volumes:volumes_attached": [],
            "links": [{"rel": "self", "href": f"{self.url}{NOVA}/servers/{server_id}"}],
        }  # fmt: skip
        return server_id

    def _get_server(self, server_id: str, *, request: OSRequest) -> Answer:
        server = self._find_server(server_id)
        self._polls[server_id] = polls = self._polls.get(server_id, 0) + 1
        if server["status"] == "BUILD" and polls > self.polls_until_active:
            self._finish_build(server)
        return 200, {"server": server}

    def _finish_build(self, server: dict[str, Any]) -> None:
        server.update({"OS-EXT-STS:task_state": None, "updated": self._now()})
        if self.failing_servers:
            server.update({"status": "ERROR", "OS-EXT-STS:vm_state": "error", "fault": {
                "code": 500, "created": server["updated"], "message":
                "No valid host was found. There are not enough hosts available."}})  # fmt: skip
            return
        mac = "fa:16:3e:5c:1a:0b"
        if self.floating_ips:
            addresses = {"private": [
                _address("10.0.0.7", 4, "fixed", mac), _address("fd5e::7", 6, "fixed", mac),
                _address("127.0.0.1", 4, "floating", mac)]}  # fmt: skip
        else:  # a provider network: the fixed address is the public one
            addresses = {"public": [_address("2001:db8::7", 6, "fixed", mac),
                                    _address("127.0.0.1", 4, "fixed", mac)]}  # fmt: skip
        server.update({"status": "ACTIVE", "OS-EXT-STS:vm_state": "active",
                       "OS-EXT-STS:power_state": 1, "addresses": addresses})  # fmt: skip

    def _delete_server(self, server_id: str, *, request: OSRequest) -> Answer:
        self._find_server(server_id)
        del self.servers[server_id]
        return 204, None

    def _list_servers(self, *, request: OSRequest) -> Answer:
        query = request.query
        pattern = re.compile(_one(query, "name") or "")
        found = [s for s in self.servers.values() if pattern.search(s["name"])]
        found.sort(key=lambda s: (s["created"], s["id"]), reverse=True)  # Nova: newest first
        return 200, self._nova_page(request, "servers", found)

    def _list_flavors(self, *, request: OSRequest) -> Answer:
        return 200, self._nova_page(request, "flavors", self.flavors)

    def _nova_page(self, request: OSRequest, key: str, items: list[dict]) -> dict[str, Any]:
        """A page, and "<key>_links" with rel next when the page is full (as Nova does)."""
        chunk, limit = self._page(request.query, items)
        body: dict[str, Any] = {key: chunk}
        if chunk and len(chunk) == limit:
            params = {k: v[0] for k, v in request.query.items()} | {"marker": chunk[-1]["id"]}
            prefix = self.link_prefix or f"{self.url}/{request.site}{NOVA}"
            resource = request.path.removeprefix(NOVA)
            body[f"{key}_links"] = [
                {"rel": "next", "href": f"{prefix}{resource}?{urlencode(params)}"}
            ]
        return body

    def _page(self, query: dict[str, list[str]], items: list[dict]) -> tuple[list[dict], int]:
        try:
            limit = min(int(_one(query, "limit") or self.max_limit), self.max_limit)
        except ValueError:
            raise Refused(400, "limit param must be an integer") from None
        if limit < 1:
            raise Refused(400, "limit param must be positive")
        start = 0
        if marker := _one(query, "marker"):
            ids = [item["id"] for item in items]
            if marker not in ids:
                raise Refused(400, f"marker [{marker}] not found")
            start = ids.index(marker) + 1
        return items[start : start + limit], limit

    def _find_server(self, server_id: str) -> dict[str, Any]:
        server = self.servers.get(server_id)
        if server is None:
            raise Refused(404, f"Instance {server_id} could not be found.")
        return server

    # --- Glance -------------------------------------------------------------------------

    def _list_images(self, *, request: OSRequest) -> Answer:
        wanted, owners = request.query.get("tag", []), request.query.get("owner")
        found = [
            i
            for i in self.images.values()
            if set(wanted) <= set(i["tags"]) and (owners is None or i["owner"] in owners)
        ]
        found.sort(key=lambda i: (i["created_at"], i["id"]), reverse=True)
        query = request.query if "limit" in request.query else request.query | {"limit": ["25"]}
        chunk, limit = self._page(query, found)
        params = {k: v for k, v in request.query.items() if k != "marker"}
        body = {"images": chunk, "schema": "/v2/schemas/images",
                "first": f"/v2/images?{urlencode(params, doseq=True)}"}  # fmt: skip
        if chunk and len(chunk) == limit:
            following = urlencode(params | {"marker": [chunk[-1]["id"]]}, doseq=True)
            body["next"] = f"/v2/images?{following}"
        return 200, body

    def _get_image(self, image_id: str, *, request: OSRequest) -> Answer:
        return 200, self._image(image_id)

    def _patch_image(self, image_id: str, *, request: OSRequest) -> Answer:
        image = self._image(image_id)
        if request.content_type not in PATCH_TYPES:
            raise Refused(415, f"Unsupported Content-Type {request.content_type!r}")
        if not isinstance(request.body, list):
            raise Refused(400, "Request body must be a JSON array of operation objects.")
        changed = dict(image)
        for op in request.body:
            _apply(changed, op)
        image.update(changed)
        for name in set(image) - set(changed):
            del image[name]
        image["updated_at"] = self._now()
        return 200, image

    def _delete_image(self, image_id: str, *, request: OSRequest) -> Answer:
        if self._image(image_id)["protected"]:
            raise Refused(403, f"Image {image_id} is protected and cannot be deleted.")
        del self.images[image_id]
        return 204, None

    def _add_tag(self, image_id: str, tag: str, *, request: OSRequest) -> Answer:
        image, tag = self._image(image_id), unquote(tag)
        if len(tag) > 255:
            raise Refused(400, "Provided object does not match schema 'image': tag too long")
        if tag not in image["tags"]:
            image["tags"].append(tag)
        return 204, None

    def _remove_tag(self, image_id: str, tag: str, *, request: OSRequest) -> Answer:
        image, tag = self._image(image_id), unquote(tag)
        if tag not in image["tags"]:
            raise Refused(404, f"Tag {tag} not found.")
        image["tags"].remove(tag)
        return 204, None

    def _image(self, image_id: str) -> dict[str, Any]:
        image = self.images.get(image_id)
        if image is None:
            raise Refused(404, f"No image found with ID {image_id}")
        return image

    # --- Neutron ------------------------------------------------------------------------

    def _list_networks(self, *, request: OSRequest) -> Answer:
        names = request.query.get("name")
        found = [n for n in self.networks if names is None or n["name"] in names]
        return 200, {"networks": found}

    # --- plumbing -----------------------------------------------------------------------

    def _now(self) -> str:
        """A clock that moves a minute per call: creation order is unambiguous."""
        return (EPOCH + timedelta(minutes=next(self._ticks))).strftime("%Y-%m-%dT%H:%M:%SZ")


def _apply(image: dict[str, Any], op: Any) -> None:
    """One operation of a v2.1 JSON patch, with Glance's rules (api/v2/images.py)."""
    if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove"):
        raise Refused(400, "Unable to find 'op' in JSON Schema change")
    path = str(op.get("path", ""))
    name = path.lstrip("/")
    if not re.fullmatch(r"/[^/~]+", path):
        raise Refused(400, f"Invalid JSON pointer for this resource: '{path}'")
    if name in READ_ONLY:
        raise Refused(403, f"Attribute '{name}' is read-only.")
    if op["op"] == "remove":
        if name in CORE:
            raise Refused(403, f"Property {name} may not be removed.")
        if name not in image:
            raise Refused(409, f"Property {name} does not exist.")
        del image[name]
        return
    if "value" not in op:
        raise Refused(400, "Operation objects must contain exactly one member named 'value'")
    value = op["value"]
    if op["op"] == "replace" and name not in image and name not in CORE:
        raise Refused(409, f"Property {name} does not exist.")  # "add" sets either way
    if name == "protected" and not isinstance(value, bool):
        raise Refused(400, f"Invalid value for protected: {value!r}")
    if name not in CORE and not isinstance(value, str):
        raise Refused(400, f"Provided object does not match schema 'image': {name}")
    image[name] = value


def _flavor(flavor_id: str, name: str) -> dict[str, Any]:
    return {"id": flavor_id, "name": name, "description": None,
            "links": [{"rel": "self", "href": f"/flavors/{flavor_id}"}]}  # fmt: skip


def _address(addr: str, version: int, kind: str, mac: str) -> dict[str, Any]:
    return {"addr": addr, "version": version, "OS-EXT-IPS:type": kind,
            "OS-EXT-IPS-MAC:mac_addr": mac}  # fmt: skip


def _is_default(domain: Any) -> bool:
    return isinstance(domain, dict) and (
        domain.get("id") == DEFAULT_DOMAIN["id"] or domain.get("name") == DEFAULT_DOMAIN["name"]
    )


def _keystone_error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "title": REASONS.get(status, "Error"), "message": message}}


def _page(status: int, message: str) -> str:
    """webob's HTML error page (what Glance answers a client accepting */*)."""
    title = f"{status} {REASONS.get(status, 'Error')}"
    return (f"<html>\n <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n"
            f"  {message}<br /><br />\n\n\n\n </body>\n</html>")  # fmt: skip


def _microversion(headers: Any) -> str:
    newer = headers.get("OpenStack-API-Version", "")
    return newer.removeprefix("compute ").strip() or headers.get("X-OpenStack-Nova-API-Version", "")


def _version(text: str) -> tuple[int, int]:
    major, _, minor = (text or "2.1").partition(".")
    return int(major), int(minor or 0)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None
