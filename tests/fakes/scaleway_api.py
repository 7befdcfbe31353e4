"""Just enough of the Scaleway Instance API v1 (https://www.scaleway.com/en/developers/api/
instance/) for the driver tests, under /instance/v1/zones/<zone>.

In memory: servers with their local volumes, images with the snapshots they are made of, and
user data, in the documented shapes (``{"server": {...}}``, ``{"servers": [...]}`` with an
X-Total-Count header, ``{"image": {...}}``) and Scaleway's error shape ``{"type", "message",
...}``. Authentication is the X-Auth-Token header, not ``Authorization: Bearer``; user data is
a ``text/plain`` body, not JSON. A server is "stopped" when created; a power-on makes it
"starting", and it runs (public IPv4 127.0.0.1) after ``polls_until_running`` GETs, or falls
back to "stopped" if ``boot_fails``. Actions follow ``allowed_actions`` as the API does: no
terminate while starting, no DELETE unless stopped, no snapshot deletion while an image uses
it. Stricter than the real API on purpose: unknown request fields are a 400.
"""

from __future__ import annotations

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

from .cloud_server import FakeCloud, Handler, Request

UUID = r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)
SERVER_FIELDS = {
    "name", "dynamic_ip_required", "routed_ip_enabled", "commercial_type", "image", "volumes",
    "enable_ipv6", "public_ip", "public_ips", "boot_type", "organization", "project", "tags",
    "security_group", "placement_group", "protected",
}  # fmt: skip
IMAGE_FIELDS = {"name", "arch", "extra_volumes", "tags", "public"}
STOPPED_ACTIONS = ["poweron", "backup"]
RUNNING_ACTIONS = ["poweroff", "terminate", "reboot", "stop_in_place", "backup"]
DENIED = {
    "type": "denied_authentication",
    "message": "authentication is denied",
    "method": "api_key",
    "reason": "invalid_argument",
}

Answer = tuple[Any, ...]  # (status, body) or (status, body, headers)


class InvalidArguments(Exception):
    """Raised by handlers: answered as 400 invalid_arguments naming the argument."""

    def __init__(self, argument: str, reason: str = "constraint") -> None:
        super().__init__(argument)
        self.argument, self.reason = argument, reason


@dataclass
class ScalewayRequest(Request):
    content_type: str = ""


@dataclass
class FakeScaleway(FakeCloud):
    project: str = "0d1e2a3b-4c5d-4e6f-8a9b-0c1d2e3f4a5b"
    zone: str = "fr-par-1"
    polls_until_running: int = 1  # GET /servers/{id} answers "starting" this many times
    boot_fails: bool = False  # a power-on ends "stopped" again
    filters_tags: bool = True  # False: listings ignore ?tags= (the driver must filter)
    total_count_header: str | None = "X-Total-Count"  # None: no header (count the items)
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_data: dict[str, dict[str, str]] = field(default_factory=dict)  # server -> key -> text
    handler_errors: list[str] = field(default_factory=list)  # bugs in this fake, for asserts
    _ticks: Iterator[int] = field(default_factory=itertools.count)
    _polls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        zone = f"/instance/v1/zones/{self.zone}"
        for method, pattern, handler in (
            ("POST", "/servers", self._create_server),
            ("GET", "/servers", self._list_servers),
            ("GET", f"/servers/{UUID}", self._get_server),
            ("DELETE", f"/servers/{UUID}", self._delete_server),
            ("POST", f"/servers/{UUID}/action", self._server_action),
            ("PATCH", f"/servers/{UUID}/user_data/([A-Za-z0-9_-]+)", self._set_user_data),
            ("DELETE", f"/volumes/{UUID}", self._delete_volume),
            ("GET", "/images", self._list_images),
            ("GET", f"/images/{UUID}", self._get_image),
            ("PATCH", f"/images/{UUID}", self._update_image),
            ("DELETE", f"/images/{UUID}", self._delete_image),
            ("DELETE", f"/snapshots/{UUID}", self._delete_snapshot),
        ):
            self.route(method, f"{zone}{pattern}", handler)

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Handlers run one at a time (the server is threaded) and answer their own errors."""

        def guarded(*groups: str, query: dict[str, list[str]], body: Any) -> Answer:
            with self._lock:
                try:
                    return copy.deepcopy(handler(*groups, query=query, body=body))
                except InvalidArguments as exc:
                    return 400, self._invalid(exc.argument, exc.reason)
                except Exception as exc:  # a bug in the fake: make it visible to the test
                    self.handler_errors.append(f"{method} {pattern}: {exc!r}")
                    return 500, self.error_body("internal_error", "fake handler crashed")

        super().route(method, pattern, guarded)

    # --- HTTP: X-Auth-Token, text bodies, response headers -------------------------------

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(http.path)
        query = parse_qs(parts.query)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        content_type = (http.headers.get("Content-Type") or "").split(";")[0].strip()
        token = http.headers.get("X-Auth-Token", "")
        try:
            body = _decode(raw, content_type)
        except ValueError:
            body = raw
        self.requests.append(ScalewayRequest(method, parts.path, query, body, token, content_type))
        fault = self._fault_for(method, parts.path)
        if fault:
            time.sleep(fault.delay)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            error = self.error_body("fault", f"injected HTTP {fault.status}")
            return self._answer(http, fault.status, error, headers)
        if token != self.token:
            return self._answer(http, 401, DENIED)
        if body is raw and raw:
            return self._answer(http, 400, self.error_body("invalid_request", "invalid JSON"))
        for route_method, pattern, handler in self._routes:
            match = pattern.match(parts.path)
            if route_method == method and match:
                status, answer, *headers = handler(*match.groups(), query=query, body=body)
                return self._answer(http, status, answer, headers[0] if headers else None)
        self._answer(http, 404, self.error_body("not_found", "resource is not found"))

    def error_body(self, code: str, message: str) -> Any:
        return {"type": code, "message": message}

    # --- test helpers -------------------------------------------------------------------

    def seed_image(
        self, name: str = "packer-build", tags: list[str] | None = None, project: str = ""
    ) -> str:
        """An image as Packer's scaleway builder leaves it (from a snapshot of the build
        server's root volume); each one newer than the last."""
        project = project or self.project
        snapshot_id, image_id = str(uuid.uuid4()), str(uuid.uuid4())
        now = self._now()
        self.snapshots[snapshot_id] = {
            "id": snapshot_id,
            "name": f"{name}-snapshot",
            "organization": project,
            "project": project,
            "tags": [],
            "volume_type": "l_ssd",
            "size": 20_000_000_000,
            "state": "available",
            "base_volume": {"id": str(uuid.uuid4()), "name": "packer-build-volume"},
            "creation_date": now,
            "modification_date": now,
            "zone": self.zone,
            "error_reason": None,
        }
        self.images[image_id] = {
            "id": image_id,
            "name": name,
            "arch": "x86_64",
            "creation_date": now,
            "modification_date": now,
            "default_bootscript": None,
            "extra_volumes": {},
            "from_server": "",
            "organization": project,
            "project": project,
            "public": False,
            "root_volume": {
                "id": snapshot_id,
                "name": f"{name}-snapshot",
                "volume_type": "l_ssd",
                "size": 20_000_000_000,
            },
            "state": "available",
            "tags": list(tags or []),
            "zone": self.zone,
        }
        return image_id

    def seed_server(self, name: str, tags: list[str], *, running: bool = True) -> str:
        """A server someone else (or an earlier run) created."""
        image = self.seed_image(f"{name}-image")
        server = self._new_server(
            {"name": name, "commercial_type": "DEV1-S", "image": image, "tags": tags}
        )
        if running:
            self._run(server)
        return server["id"]

    # --- servers ------------------------------------------------------------------------

    def _create_server(self, *, query: dict, body: Any) -> Answer:
        _fields(body, SERVER_FIELDS, required=("name", "commercial_type", "image"))
        if body.get("project", self.project) != self.project:
            return 403, self.error_body("permissions_denied", "insufficient permissions")
        if body["image"] not in self.images:
            return self._missing("instance_image", body["image"])
        _string_list(body, "tags")
        return 201, {"server": self._new_server(body)}

    def _new_server(self, body: dict[str, Any]) -> dict[str, Any]:
        server_id, now = str(uuid.uuid4()), self._now()
        image = self.images[body["image"]]
        volume = {
            "id": str(uuid.uuid4()),
            "name": image["root_volume"]["name"],
            "volume_type": "l_ssd",
            "export_uri": None,
            "organization": self.project,
            "project": self.project,
            "server": {"id": server_id, "name": body["name"]},
            "size": image["root_volume"]["size"],
            "state": "available",
            "creation_date": now,
            "modification_date": now,
            "tags": [],
            "zone": self.zone,
            "boot": False,
        }
        self.volumes[volume["id"]] = volume
        self.servers[server_id] = server = {
            "id": server_id,
            "name": body["name"],
            "arch": "x86_64",
            "commercial_type": body["commercial_type"],
            "boot_type": "local",
            "organization": self.project,
            "project": self.project,
            "hostname": body["name"],
            "image": {k: image[k] for k in ("id", "name", "arch", "root_volume", "zone")},
            "volumes": {"0": volume},
            "tags": list(body.get("tags") or []),
            "state": "stopped",
            "protected": False,
            "state_detail": "",
            "public_ip": None,
            "public_ips": [],
            "mac_address": "de:00:00:c6:ec:bf",
            "routed_ip_enabled": True,
            "ipv6": None,
            "extra_networks": [],
            "dynamic_ip_required": bool(body.get("dynamic_ip_required", True)),
            "enable_ipv6": False,
            "private_ip": None,
            "creation_date": now,
            "modification_date": now,
            "bootscript": None,
            "security_group": {"id": str(uuid.uuid4()), "name": "Default security group"},
            "location": None,
            "maintenances": [],
            "allowed_actions": list(STOPPED_ACTIONS),
            "placement_group": None,
            "private_nics": [],
            "zone": self.zone,
        }
        return server

    def _list_servers(self, *, query: dict, body: Any) -> Answer:
        return self._page("servers", list(self.servers.values()), query)

    def _get_server(self, server_id: str, *, query: dict, body: Any) -> Answer:
        server = self.servers.get(server_id)
        if server is None:
            return self._missing("instance_server", server_id)
        if server["state"] == "starting" and self._poll(server_id) > self.polls_until_running:
            if self.boot_fails:
                server.update(state="stopped", state_detail="booting kernel failed",
                              allowed_actions=list(STOPPED_ACTIONS))  # fmt: skip
            else:
                self._run(server)
        return 200, {"server": server}

    def _run(self, server: dict[str, Any]) -> None:
        address = {
            "id": str(uuid.uuid4()),
            "address": "127.0.0.1",
            "dynamic": True,
            "gateway": "62.210.0.1",
            "netmask": "32",
            "family": "inet",
            "provisioning_mode": "dhcp",
            "tags": [],
            "state": "attached",
            "ipam_id": str(uuid.uuid4()),
        }
        server.update(state="running", state_detail="booted", public_ip=address,
                      public_ips=[address], allowed_actions=list(RUNNING_ACTIONS))  # fmt: skip

    def _server_action(self, server_id: str, *, query: dict, body: Any) -> Answer:
        server = self.servers.get(server_id)
        if server is None:
            return self._missing("instance_server", server_id)
        _fields(body, {"action", "name", "volumes", "disable_ipv6"}, required=("action",))
        action = body["action"]
        if action not in server["allowed_actions"]:
            message = f"action {action} is not allowed while the server is {server['state']}"
            return 400, self.error_body("precondition_failed", message)
        if action == "poweron":
            # Starting: nothing is allowed until it runs (or falls back to stopped).
            server.update(state="starting", allowed_actions=[])
        elif action == "terminate":
            # Asynchronous on Scaleway (the server lingers "stopping"); gone at once here.
            del self.servers[server_id]
            for volume in server["volumes"].values():
                self.volumes.pop(volume["id"], None)
        else:
            raise InvalidArguments("action", "not supported by this fake")
        task = {
            "id": str(uuid.uuid4()),
            "description": f"server_{action}",
            "status": "pending",
            "href_from": f"/servers/{server_id}/action",
            "href_result": f"/servers/{server_id}",
            "started_at": self._now(),
            "terminated_at": None,
            "progress": 0,
            "zone": self.zone,
        }
        return 202, {"task": task}

    def _delete_server(self, server_id: str, *, query: dict, body: Any) -> Answer:
        server = self.servers.get(server_id)
        if server is None:
            return self._missing("instance_server", server_id)
        if server["state"] not in ("stopped", "stopped in place"):
            return 400, self.error_body("precondition_failed", "server should be stopped")
        del self.servers[server_id]
        for volume in server["volumes"].values():  # detached, not deleted
            self.volumes[volume["id"]]["server"] = None
        return 204, None

    def _set_user_data(self, server_id: str, key: str, *, query: dict, body: Any) -> Answer:
        if server_id not in self.servers:
            return self._missing("instance_server", server_id)
        if not isinstance(body, Text):
            raise InvalidArguments("body", "user data must be sent as text/plain")
        self.user_data.setdefault(server_id, {})[key] = body
        return 204, None

    def _delete_volume(self, volume_id: str, *, query: dict, body: Any) -> Answer:
        volume = self.volumes.get(volume_id)
        if volume is None:
            return self._missing("instance_volume", volume_id)
        if volume["server"]:
            return 400, self.error_body("precondition_failed", "volume is attached to a server")
        del self.volumes[volume_id]
        return 204, None

    # --- images and snapshots -------------------------------------------------------------

    def _list_images(self, *, query: dict, body: Any) -> Answer:
        found = list(self.images.values())
        if public := _one(query, "public"):
            found = [i for i in found if i["public"] == (public == "true")]
        return self._page("images", found, query)

    def _get_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(image_id)
        return (200, {"image": image}) if image else self._missing("instance_image", image_id)

    def _update_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(image_id)
        if image is None:
            return self._missing("instance_image", image_id)
        _fields(body, IMAGE_FIELDS)
        _string_list(body, "tags")
        if "name" in body and not (isinstance(body["name"], str) and body["name"]):
            raise InvalidArguments("name")
        image.update(body, modification_date=self._now())
        return 200, {"image": image}

    def _delete_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        if self.images.pop(image_id, None) is None:
            return self._missing("instance_image", image_id)
        return 204, None

    def _delete_snapshot(self, snapshot_id: str, *, query: dict, body: Any) -> Answer:
        if snapshot_id not in self.snapshots:
            return self._missing("instance_snapshot", snapshot_id)
        for image in self.images.values():
            used = [image["root_volume"], *image["extra_volumes"].values()]
            if any(v["id"] == snapshot_id for v in used):
                return 400, self.error_body("precondition_failed", "snapshot is used by an image")
        del self.snapshots[snapshot_id]
        return 204, None

    # --- plumbing -----------------------------------------------------------------------

    def _page(self, key: str, items: list[dict[str, Any]], query: dict) -> Answer:
        """Filters every listing shares, then one page; the total in X-Total-Count."""
        if project := _one(query, "project"):
            items = [i for i in items if i["project"] == project]
        wanted = [t for t in (_one(query, "tags") or "").split(",") if t]
        if wanted and self.filters_tags:
            items = [i for i in items if set(wanted) <= set(i["tags"])]
        try:
            page = int(_one(query, "page") or 1)
            per_page = int(_one(query, "per_page") or 50)
        except ValueError:
            raise InvalidArguments("page") from None
        if not (page >= 1 and 1 <= per_page <= 100):
            raise InvalidArguments("per_page", "a positive integer lower or equal to 100")
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {self.total_count_header: str(len(items))} if self.total_count_header else {}
        return 200, {key: chunk}, headers

    def _poll(self, resource_id: str) -> int:
        self._polls[resource_id] = self._polls.get(resource_id, 0) + 1
        return self._polls[resource_id]

    def _now(self) -> str:
        """A clock that moves a minute per call: creation order is unambiguous."""
        return (EPOCH + timedelta(minutes=next(self._ticks))).isoformat()

    def _missing(self, resource: str, resource_id: str) -> Answer:
        body = {"type": "not_found", "message": "resource is not found",
                "resource": resource, "resource_id": resource_id}  # fmt: skip
        return 404, body

    def _invalid(self, argument: str, reason: str) -> dict[str, Any]:
        details = [{"argument_name": argument, "reason": reason, "help_message": reason}]
        return {"type": "invalid_arguments", "message": "invalid argument(s)",
                "details": details}  # fmt: skip


class Text(str):
    """A request body sent as text/plain (user data), as opposed to JSON."""


def _decode(raw: bytes, content_type: str) -> Any:
    if content_type == "text/plain":
        return Text(raw.decode())  # possibly empty
    if not raw:
        return None
    if content_type == "application/json":
        return json.loads(raw)
    return raw.decode()


def _fields(body: Any, allowed: set[str], required: tuple[str, ...] = ()) -> None:
    if not isinstance(body, dict):
        raise InvalidArguments("body", "must be a JSON object")
    for name in sorted(set(body) - allowed):
        raise InvalidArguments(name, "unknown field")
    for name in required:
        if name not in body:
            raise InvalidArguments(name, "required")


def _string_list(body: dict[str, Any], name: str) -> None:
    value = body.get(name, [])
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise InvalidArguments(name)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None
