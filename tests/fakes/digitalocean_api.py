"""An in-memory DigitalOcean API v2 on 127.0.0.1: droplets, snapshot images, tags and
actions in the documented response shapes, enough for imagefactory/digitalocean.py.

Droplets become active (public IPv4 127.0.0.1) after ``active_after`` GETs, image transfers
complete after ``transfer_after`` action GETs; listings paginate by ``per_page`` (default
20, as DigitalOcean's) with absolute ``links.pages.next`` URLs."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode

from .cloud_server import FakeCloud

TAG_NAME = re.compile(r"^[A-Za-z0-9:_-]{1,255}$")
NOW = "2026-11-26T12:00:00Z"
Answer = tuple[int, Any]


@dataclass
class FakeDigitalOcean(FakeCloud):
    active_after: int = 1  # droplet GETs before it runs
    transfer_after: int = 1  # action GETs before a transfer completes
    failing_regions: set[str] = field(default_factory=set)  # transfers there end "errored"
    droplets: dict[int, dict[str, Any]] = field(default_factory=dict)
    user_data: dict[int, str] = field(default_factory=dict)  # not part of the droplet shape
    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    actions: dict[int, dict[str, Any]] = field(default_factory=dict)
    _polls: dict[tuple[str, int], int] = field(default_factory=dict)
    _next_id: dict[str, int] = field(
        default_factory=lambda: {"droplet": 3164444, "image": 7555620, "action": 36804636}
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for method, pattern, handler in (
            ("POST", r"/v2/droplets", self._create_droplet),
            ("GET", r"/v2/droplets", self._list_droplets),
            ("GET", r"/v2/droplets/(\d+)", self._get_droplet),
            ("DELETE", r"/v2/droplets/(\d+)", self._delete_droplet),
            ("GET", r"/v2/images", self._list_images),
            ("GET", r"/v2/images/(\d+)", self._get_image),
            ("PUT", r"/v2/images/(\d+)", self._update_image),
            ("DELETE", r"/v2/images/(\d+)", self._delete_image),
            ("POST", r"/v2/images/(\d+)/actions", self._image_action),
            ("GET", r"/v2/actions/(\d+)", self._get_action),
            ("POST", r"/v2/tags", self._create_tag),
            ("POST", r"/v2/tags/([^/]+)/resources", self._tag_resources),
            ("DELETE", r"/v2/tags/([^/]+)/resources", self._untag_resources),
        ):
            self.route(method, pattern, self._locked(handler))

    def add_image(
        self,
        name: str,
        regions: list[str] | None = None,
        tags: list[str] | None = None,
        created_at: str = NOW,
        image_id: int | None = None,
    ) -> int:
        """Seed a snapshot, as Packer's builder leaves one."""
        image_id = image_id or self._new_id("image")
        self.tags.update(tags or [])
        self.images[image_id] = {
            "id": image_id,
            "name": name,
            "type": "snapshot",
            "distribution": "Ubuntu",
            "slug": None,
            "public": False,
            "regions": list(regions or ["nyc3"]),
            "created_at": created_at,
            "min_disk_size": 25,
            "size_gigabytes": 2.36,
            "description": "",
            "tags": list(tags or []),
            "status": "available",
            "error_message": "",
        }
        return image_id

    # --- droplets ---------------------------------------------------------------------

    def _create_droplet(self, *, query: dict, body: Any) -> Answer:
        missing = [k for k in ("name", "region", "size", "image") if not (body or {}).get(k)]
        if missing:
            return self._invalid(f"{', '.join(missing)} is required")
        if body["image"] not in self.images:
            return self._invalid("You specified an invalid image for Droplet creation.")
        tags = body.get("tags") or []
        if bad := [t for t in tags if not TAG_NAME.match(t)]:
            return self._invalid(f"invalid tag name {bad[0]!r}")
        self.tags.update(tags)  # creating a droplet creates its tags
        droplet_id = self._new_id("droplet")
        self.droplets[droplet_id] = {
            "id": droplet_id,
            "name": body["name"],
            "memory": 1024,
            "vcpus": 1,
            "disk": 25,
            "locked": False,
            "status": "new",
            "created_at": NOW,
            "image": {"id": body["image"]},
            "size_slug": body["size"],
            "region": {"slug": body["region"]},
            "networks": {"v4": [], "v6": []},
            "tags": list(tags),
            "features": ["monitoring"] if body.get("monitoring") else [],
        }
        self.user_data[droplet_id] = body.get("user_data", "")
        links = {"actions": [{"id": self._new_id("action"), "rel": "create", "href": ""}]}
        return 202, {"droplet": self.droplets[droplet_id], "links": links}

    def _get_droplet(self, droplet_id: str, *, query: dict, body: Any) -> Answer:
        droplet = self.droplets.get(int(droplet_id))
        if droplet is None:
            return self._not_found()
        if self._poll("droplet", droplet["id"]) >= self.active_after:
            droplet["status"] = "active"
            droplet["networks"]["v4"] = [
                {"ip_address": "10.116.0.2", "netmask": "255.255.240.0", "type": "private"},
                {"ip_address": "127.0.0.1", "netmask": "255.255.240.0", "type": "public"},
            ]
        return 200, {"droplet": droplet}

    def _list_droplets(self, *, query: dict, body: Any) -> Answer:
        found = list(self.droplets.values())
        if tag := _one(query, "tag_name"):
            found = [d for d in found if tag in d["tags"]]
        return 200, self._page("/v2/droplets", "droplets", found, query)

    def _delete_droplet(self, droplet_id: str, *, query: dict, body: Any) -> Answer:
        if self.droplets.pop(int(droplet_id), None) is None:
            return self._not_found()
        return 204, None

    # --- images and actions -----------------------------------------------------------

    def _list_images(self, *, query: dict, body: Any) -> Answer:
        found = list(self.images.values())
        if _one(query, "private") == "true":
            found = [i for i in found if not i["public"]]
        if tag := _one(query, "tag_name"):
            found = [i for i in found if tag in i["tags"]]
        return 200, self._page("/v2/images", "images", found, query)

    def _get_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        return (200, {"image": image}) if image else self._not_found()

    def _update_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        if image is None:
            return self._not_found()
        if unknown := set(body or {}) - {"name", "distribution", "description"}:
            return self._invalid(f"unknown attributes {sorted(unknown)}")
        image.update(body or {})
        return 200, {"image": image}

    def _delete_image(self, image_id: str, *, query: dict, body: Any) -> Answer:
        if self.images.pop(int(image_id), None) is None:
            return self._not_found()
        return 204, None

    def _image_action(self, image_id: str, *, query: dict, body: Any) -> Answer:
        image = self.images.get(int(image_id))
        if image is None:
            return self._not_found()
        if (body or {}).get("type") != "transfer" or not body.get("region"):
            return self._invalid("type must be transfer (with a region) or convert")
        if body["region"] in image["regions"]:
            return self._invalid("the image is already available in that region")
        action_id = self._new_id("action")
        self.actions[action_id] = {
            "id": action_id,
            "status": "in-progress",
            "type": "transfer",
            "started_at": NOW,
            "completed_at": None,
            "resource_id": image["id"],
            "resource_type": "image",
            "region": {"slug": body["region"]},
            "region_slug": body["region"],
        }
        return 201, {"action": self.actions[action_id]}

    def _get_action(self, action_id: str, *, query: dict, body: Any) -> Answer:
        action = self.actions.get(int(action_id))
        if action is None:
            return self._not_found()
        done = self._poll("action", action["id"]) >= self.transfer_after
        if action["status"] == "in-progress" and done:
            region = action["region_slug"]
            if region in self.failing_regions:
                action["status"] = "errored"
            else:
                action.update(status="completed", completed_at=NOW)
                if image := self.images.get(action["resource_id"]):
                    image["regions"].append(region)
        return 200, {"action": action}

    # --- tags -------------------------------------------------------------------------

    def _create_tag(self, *, query: dict, body: Any) -> Answer:
        name = (body or {}).get("name", "")
        if not TAG_NAME.match(name):
            return self._invalid("tag names may contain letters, numbers, colons, dashes, _")
        if name in self.tags:
            return self._invalid("tag already exists")
        self.tags.add(name)
        return 201, {"tag": {"name": name, "resources": {"count": 0}}}

    def _tag_resources(self, tag: str, *, query: dict, body: Any) -> Answer:
        return self._retag(unquote(tag), body, add=True)

    def _untag_resources(self, tag: str, *, query: dict, body: Any) -> Answer:
        return self._retag(unquote(tag), body, add=False)

    def _retag(self, tag: str, body: Any, *, add: bool) -> Answer:
        if tag not in self.tags:
            return self._not_found()
        resources = (body or {}).get("resources") or []
        if not resources:
            return self._invalid("resources is required")
        for resource in resources:
            kind, rid = resource.get("resource_type"), resource.get("resource_id")
            if not isinstance(rid, str):
                return self._invalid("resource_id must be a string")
            table = {"droplet": self.droplets, "image": self.images}.get(kind)
            if table is None or int(rid) not in table:
                return self._not_found()
            tags = table[int(rid)]["tags"]
            if add and tag not in tags:
                tags.append(tag)
            if not add and tag in tags:
                tags.remove(tag)
        return 204, None

    # --- mechanics --------------------------------------------------------------------

    def _page(self, path: str, key: str, items: list[Any], query: dict) -> dict[str, Any]:
        per_page = min(int(_one(query, "per_page") or 20), 200)
        page = int(_one(query, "page") or 1)
        body: dict[str, Any] = {
            key: items[(page - 1) * per_page : page * per_page],
            "links": {},
            "meta": {"total": len(items)},
        }
        if page * per_page < len(items):
            following = {k: v[0] for k, v in query.items()} | {"page": str(page + 1)}
            body["links"] = {"pages": {"next": f"{self.url}{path}?{urlencode(following)}"}}
        return body

    def _poll(self, kind: str, resource_id: int) -> int:
        key = (kind, resource_id)
        self._polls[key] = self._polls.get(key, 0) + 1
        return self._polls[key]

    def _new_id(self, kind: str) -> int:
        self._next_id[kind] += 1
        return self._next_id[kind]

    def _locked(self, handler):
        def locked(*args: Any, **kwargs: Any) -> Answer:
            with self._lock:
                return handler(*args, **kwargs)

        return locked

    def _invalid(self, message: str) -> Answer:
        return 422, self.error_body("unprocessable_entity", message)

    def _not_found(self) -> Answer:
        return 404, self.error_body(
            "not_found", "The resource you were accessing could not be found."
        )


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None
