"""Just enough of the Hetzner Cloud API v1 (https://docs.hetzner.cloud/) for the driver tests.

In memory: servers, snapshots and actions, in the documented response shapes and with
Hetzner's error shape ``{"error": {"code", "message", "details"}}``. Servers turn "running"
(IPv4 127.0.0.1) after ``polls_until_running`` GETs; actions finish after ``polls_until_done``
GETs of /actions/{id}, and only then take effect (a protection change the driver does not wait
for never happens). Stricter than the real API on purpose: unknown request fields are a 400,
so a typo in the driver fails a test instead of being silently ignored.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .cloud_server import FakeCloud, Handler

V1 = "/v1"
ID = r"(\d+)"
EPOCH = datetime(2026, 11, 1, tzinfo=UTC)
SERVER_FIELDS = {
    "name", "server_type", "image", "location", "datacenter", "user_data", "labels",
    "start_after_create", "public_net", "ssh_keys", "volumes", "networks", "firewalls",
    "automount", "placement_group",
}  # fmt: skip
IMAGE_FIELDS = {"description", "labels", "type"}
_LABEL_KEY = re.compile(r"^(?:[a-z0-9.-]{1,253}/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")

Answer = tuple[int, Any]


class InvalidInput(Exception):
    """Raised by handlers: answered as 400 invalid_input."""


@dataclass
class FakeHetzner(FakeCloud):
    polls_until_running: int = 1  # GET /servers/{id} answers "initializing" this many times
    polls_until_done: int = 1  # GET /actions/{id} answers "running" this many times
    failing_commands: set[str] = field(default_factory=set)  # these actions end in "error"
    servers: dict[int, dict[str, Any]] = field(default_factory=dict)
    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    actions: dict[int, dict[str, Any]] = field(default_factory=dict)
    user_data: dict[int, str] = field(default_factory=dict)  # the API never returns it
    handler_errors: list[str] = field(default_factory=list)  # bugs in this fake, for asserts
    endpoint: str = ""  # base URL with /v1, as HCLOUD_ENDPOINT would give it
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(4711))
    _ticks: Iterator[int] = field(default_factory=itertools.count)
    _polls: dict[int, int] = field(default_factory=dict)
    _effects: dict[int, Callable[[], None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.route("POST", f"{V1}/servers", self._create_server)
        self.route("GET", f"{V1}/servers", self._list_servers)
        self.route("GET", f"{V1}/servers/{ID}", self._get_server)
        self.route("DELETE", f"{V1}/servers/{ID}", self._delete_server)
        self.route("GET", f"{V1}/images", self._list_images)
        self.route("GET", f"{V1}/images/{ID}", self._get_image)
        self.route("PUT", f"{V1}/images/{ID}", self._update_image)
        self.route("DELETE", f"{V1}/images/{ID}", self._delete_image)
        self.route("POST", f"{V1}/images/{ID}/actions/change_protection", self._protect)
        self.route("GET", f"{V1}/actions/{ID}", self._get_action)

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Handlers run one at a time (the server is threaded) and answer their own errors."""

        def guarded(*groups: str, query: dict[str, list[str]], body: Any) -> Answer:
            with self._lock:
                try:
                    status, answer = handler(*groups, query=query, body=body)
                    return status, copy.deepcopy(answer)  # serialised after the lock is gone
                except InvalidInput as exc:
                    return 400, self.error_body("invalid_input", str(exc))
                except Exception as exc:  # a bug in the fake: make it visible to the test
                    self.handler_errors.append(f"{method} {pattern}: {exc!r}")
                    return 500, self.error_body("server_error", "fake handler crashed")

        super().route(method, pattern, guarded)

    def start(self) -> str:
        url = super().start()
        self.endpoint = f"{url}{V1}"
        return url

    def error_body(self, code: str, message: str) -> Any:
        return {"error": {"code": code, "message": message, "details": {}}}

    # --- test helpers -------------------------------------------------------------------

    def seed_snapshot(
        self,
        description: str = "packer-build",
        labels: dict[str, str] | None = None,
        *,
        protected: bool = False,
        image_type: str = "snapshot",
    ) -> str:
        """A snapshot as Packer's hcloud builder leaves it; each one newer than the last."""
        image_id = next(self._ids)
        self.images[image_id] = {
            "id": image_id,
            "type": image_type,
            "status": "available",
            "name": None,
            "description": description,
            "image_size": 0.8,
            "disk_size": 20,
            "created": self._now(),
            "created_from": {"id": 1, "name": "packer-builder"},
            "bound_to": None,
            "os_flavor": "ubuntu",
            "os_version": None,
            "rapid_deploy": False,
            "protection": {"delete": protected},
            "deprecated": None,
            "deleted": None,
            "labels": dict(labels or {}),
            "architecture": "x86",
        }
        return str(image_id)

    def seed_server(self, name: str, labels: dict[str, str]) -> str:
        """A server someone else (or an earlier run) created."""
        body = {"name": name, "server_type": "cx23", "image": "ubuntu-24.04", "labels": labels}
        return str(self._new_server(body)["id"])

    def image(self, image_id: str | int) -> dict[str, Any]:
        return self.images[int(image_id)]

    # --- servers ------------------------------------------------------------------------

    def _create_server(self, *, query: dict, body: Any) -> Answer:
        _fields(body, SERVER_FIELDS, required=("name", "server_type", "image"))
        if any(s["name"] == body["name"] for s in self.servers.values()):
            return 409, self.error_body("uniqueness_error", "server name is already used")
        image = self.images.get(int(body["image"])) if str(body["image"]).isdigit() else None
        if image is None:
            raise InvalidInput("invalid input in field 'image'")
        _labels(body.get("labels"))
        server = self._new_server(body)
        self.user_data[server["id"]] = body.get("user_data", "")
        create = self._action("create_server", server["id"], "server")
        start = self._action("start_server", server["id"], "server")
        return 201, {"server": server, "action": create, "next_actions": [start],
                     "root_password": None}  # fmt: skip

    def _new_server(self, body: dict[str, Any]) -> dict[str, Any]:
        server_id = next(self._ids)
        self.servers[server_id] = server = {
            "id": server_id,
            "name": body["name"],
            "status": "initializing",
            "created": self._now(),
            "public_net": {"ipv4": None, "ipv6": None, "floating_ips": [], "firewalls": []},
            "server_type": {"name": body["server_type"]},
            "datacenter": {"location": {"name": body.get("location") or "fsn1"}},
            "image": {"id": body["image"]},
            "protection": {"delete": False, "rebuild": False},
            "labels": dict(body.get("labels") or {}),
        }
        return server

    def _list_servers(self, *, query: dict, body: Any) -> Answer:
        matching = [s for s in self.servers.values() if _selects(query, s["labels"])]
        return _page("servers", matching, query)

    def _get_server(self, server_id: str, *, query: dict, body: Any) -> Answer:
        server = self.servers.get(int(server_id))
        if server is None:
            return self._missing("server", server_id)
        if self._poll(server["id"]) > self.polls_until_running:
            server["status"] = "running"
            ipv4 = {"id": 1, "ip": "127.0.0.1", "blocked": False, "dns_ptr": "localhost"}
            server["public_net"]["ipv4"] = ipv4
        return 200, {"server": server}

    def _delete_server(self, server_id: str, *, query: dict, body: Any) -> Answer:
        if self.servers.pop(int(server_id), None) is None:
            return self._missing("server", server_id)
        return 200, {"action": self._action("delete_server", int(server_id), "server")}

    # --- images -------------------------------------------------------------------------

    def _list_images(self, *, query: dict, body: Any) -> Answer:
        types = query.get("type") or ["system", "app", "snapshot", "backup"]
        matching = [
            i for i in self.images.values() if i["type"] in types and _selects(query, i["labels"])
        ]
        return _page("images", matching, query)

    def _get_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        return (200, {"image": image}) if image else self._missing("image", image_id)

    def _update_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        if image is None:
            return self._missing("image", image_id)
        _fields(body, IMAGE_FIELDS)
        if "labels" in body:
            image["labels"] = dict(_labels(body["labels"]))  # replaced as a whole
        if "description" in body:
            image["description"] = body["description"]
        return 200, {"image": image}

    def _delete_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        if image is None:
            return self._missing("image", image_id)
        if image["protection"]["delete"]:
            return 423, self.error_body("protected", "image is delete-protected")
        del self.images[image["id"]]
        return 204, None

    def _protect(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        if image is None:
            return self._missing("image", image_id)
        _fields(body, {"delete"}, required=("delete",))
        if not isinstance(body["delete"], bool):
            raise InvalidInput("invalid input in field 'delete'")
        action = self._action("change_protection", image["id"], "image")
        self._effects[action["id"]] = lambda: image["protection"].update(delete=body["delete"])
        return 201, {"action": action}

    # --- actions ------------------------------------------------------------------------

    def _action(self, command: str, resource_id: int, resource_type: str) -> dict[str, Any]:
        action_id = next(self._ids)
        self.actions[action_id] = action = {
            "id": action_id,
            "command": command,
            "status": "running",
            "progress": 0,
            "started": self._now(),
            "finished": None,
            "resources": [{"id": resource_id, "type": resource_type}],
            "error": None,
        }
        return dict(action)

    def _get_action(self, action_id: str, *, query: dict, body: Any) -> Answer:
        action = self.actions.get(int(action_id))
        if action is None:
            return self._missing("action", action_id)
        if action["status"] == "running" and self._poll(action["id"]) > self.polls_until_done:
            self._finish(action)
        return 200, {"action": action}

    def _finish(self, action: dict[str, Any]) -> None:
        effect = self._effects.pop(action["id"], None)
        action.update(progress=100, finished=self._now())
        if action["command"] in self.failing_commands:
            action.update(status="error",
                          error={"code": "action_failed", "message": "Action failed"})  # fmt: skip
        else:
            action["status"] = "success"
            if effect:
                effect()

    # --- plumbing -----------------------------------------------------------------------

    def _poll(self, resource_id: int) -> int:
        self._polls[resource_id] = self._polls.get(resource_id, 0) + 1
        return self._polls[resource_id]

    def _now(self) -> str:
        """A clock that moves a minute per call: creation order is unambiguous."""
        return (EPOCH + timedelta(minutes=next(self._ticks))).isoformat()

    def _missing(self, kind: str, resource_id: str) -> Answer:
        return 404, self.error_body("not_found", f"{kind} with ID '{resource_id}' not found")


def _fields(body: Any, allowed: set[str], required: tuple[str, ...] = ()) -> None:
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    for name in sorted(set(body) - allowed) + [r for r in required if r not in body]:
        raise InvalidInput(f"invalid input in field '{name}'")


def _labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise InvalidInput("invalid input in field 'labels'")
    for key, value in labels.items():
        if not (_LABEL_KEY.match(key) and isinstance(value, str) and _LABEL_VALUE.match(value)):
            raise InvalidInput(f"invalid input in field 'labels': {key}={value!r}")
    return labels


def _selects(query: dict[str, list[str]], labels: dict[str, str]) -> bool:
    """Hetzner's label selector: comma-joined terms k=v, k==v, k!=v, k, !k (all must hold)."""
    for selector in query.get("label_selector", []):
        for term in filter(None, selector.split(",")):
            if not _term_holds(term.strip(), labels):
                return False
    return True


def _term_holds(term: str, labels: dict[str, str]) -> bool:
    if "!=" in term:
        key, value = term.split("!=", 1)
        return labels.get(key) != value
    if "=" in term:
        key, value = term.replace("==", "=", 1).split("=", 1)
        return labels.get(key) == value
    if term.startswith("!"):
        return term[1:] not in labels
    if not _LABEL_KEY.match(term):
        raise InvalidInput(f"invalid label_selector term {term!r}")
    return term in labels


def _page(key: str, items: list[dict[str, Any]], query: dict[str, list[str]]) -> Answer:
    """One page in Hetzner's shape; per_page defaults to 25, at most 50."""
    try:
        page = int(query.get("page", ["1"])[0])
        per_page = min(int(query.get("per_page", ["25"])[0]), 50)
    except ValueError:
        raise InvalidInput("invalid input in field 'page'") from None
    last = max(1, math.ceil(len(items) / per_page))
    pagination = {
        "page": page,
        "per_page": per_page,
        "previous_page": page - 1 if page > 1 else None,
        "next_page": page + 1 if page < last else None,
        "last_page": last,
        "total_entries": len(items),
    }
    chunk = items[(page - 1) * per_page : page * per_page]
    return 200, {key: chunk, "meta": {"pagination": pagination}}
