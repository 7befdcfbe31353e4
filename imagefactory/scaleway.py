"""Scaleway Instance API v1 in the verbs of clouds.CloudDriver: a server is a check instance,
the image Packer's scaleway builder made (backed by a snapshot) is the image, and labels are
tags "key=value" (Scaleway tags are plain strings).

Every call goes through cloudapi.APIClient (retries, Retry-After, call counts). The secret key
and the project come from SCW_SECRET_KEY and SCW_DEFAULT_PROJECT_ID only, as for Packer's
scaleway builder; SCW_API_URL (the CLI's and SDKs' variable) points elsewhere for tests."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cloudapi import APIClient, CallStats, Page, Pager
from .clouds import CloudError, CloudImage
from .definitions import ScalewaySettings
from .errors import ConfigError

DEFAULT_URL = "https://api.scaleway.com"
KEY_ENV = "SCW_SECRET_KEY"
PROJECT_ENV = "SCW_DEFAULT_PROJECT_ID"
PER_PAGE = 100  # the API's maximum page size
ZONE = re.compile(r"^[a-z]{2}-[a-z]{3}-\d$")  # fr-par-1; it becomes part of every path
# Scaleway images have no description field: a short one is kept in this tag.
DESCRIPTION_TAG = "imagefactory-description"
# Scaleway documents no tag limit we could find; this bound keeps a publish from failing on
# an overlong description (which is only informative: the record holds the provenance).
TAG_MAX = 128
# States a server passes through on its way somewhere else: nothing can be done but wait.
SETTLED = frozenset({"running", "stopped", "stopped in place", "locked"})


def driver(
    settings: ScalewaySettings, env: Mapping[str, str] = os.environ, **client_options: Any
) -> ScalewayDriver:
    key, project = env.get(KEY_ENV, "").strip(), env.get(PROJECT_ENV, "").strip()
    missing = [name for name, value in ((KEY_ENV, key), (PROJECT_ENV, project)) if not value]
    if missing:
        raise ConfigError(
            f"Scaleway: set {' and '.join(missing)} (the API secret key and the project id); "
            "they are read from the environment only"
        )
    # Both are UUIDs; anything else (an access key SCW…, a pasted header) would only earn a
    # 401 later, or make requests quote the value in its own error.
    if not _is_uuid(key):
        raise ConfigError(f"Scaleway: {KEY_ENV} is not a secret key (a UUID)")
    if not _is_uuid(project):
        raise ConfigError(f"Scaleway: {PROJECT_ENV} is not a project id (a UUID)")
    if not ZONE.match(settings.zone):
        raise ConfigError(f"Scaleway: {settings.zone!r} is not a zone (e.g. fr-par-1)")
    client = APIClient(
        title="Scaleway API",
        base_url=env.get("SCW_API_URL") or DEFAULT_URL,
        headers={"X-Auth-Token": key},
        **client_options,
    )
    return ScalewayDriver(settings, client, project.lower())


@dataclass
class ScalewayDriver:
    settings: ScalewaySettings
    client: APIClient = field(repr=False)  # its headers carry the secret key
    project: str
    title: str = "Scaleway"
    login_user: str = "root"
    ssh_port: int = 22
    poll_s: float = 2.0  # between looks at a server still starting or stopping
    delete_timeout_s: float = 300.0  # how long a server may stay in transition before delete
    clock: Callable[[], float] = time.monotonic

    @property
    def stats(self) -> CallStats:
        return self.client.stats

    @property
    def zone(self) -> str:
        return self.settings.zone

    def image_id(self, artifact_id: str) -> str:
        # Packer's artifact id is "<zone>:<image id>" (1.6.6: fr-par-1:…; older: par1:…).
        zone, _, image = artifact_id.rpartition(":")
        if not _is_uuid(image):
            raise ConfigError(f"Scaleway: {artifact_id!r} is not an image id (fr-par-1:<uuid>)")
        if zone and ZONE.match(zone) and zone != self.zone:
            raise ConfigError(
                f"Scaleway: image {image} is in zone {zone}, but the image definition's "
                f"scaleway zone is {self.zone}"
            )
        return image.lower()

    # --- check instances ---------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        body = {
            "name": name,
            "commercial_type": self.settings.commercial_type,
            "image": image_id,
            "project": self.project,
            "tags": _tags(labels),
            "dynamic_ip_required": True,  # a public IPv4 that goes with the server
        }
        server_id = self.client.request("POST", self._path("/servers"), json=body)["server"]["id"]
        try:
            # cloud-init reads it at first boot: it must be there before the power-on.
            self.client.request(
                "PATCH",
                self._path(f"/servers/{server_id}/user_data/cloud-init"),
                data=user_data,
                content_type="text/plain",
                idempotent=True,  # setting a key again is harmless
            )
            self._act(server_id, "poweron")
        except BaseException:
            # clouds.launched only knows the server once this returns: clean up here.
            with contextlib.suppress(Exception):
                self.delete_server(server_id)
            raise
        return server_id

    def server_address(self, server_id: str) -> str | None:
        server = self._server(server_id)
        if server.get("state") == "locked":
            raise CloudError(
                f"Scaleway: server {server_id} is locked ({server.get('state_detail')})"
            )
        if server.get("state") != "running":
            return None
        ips = [server.get("public_ip") or {}, *(server.get("public_ips") or [])]
        v4 = [
            ip["address"] for ip in ips if ip.get("address") and ip.get("family", "inet") == "inet"
        ]
        return v4[0] if v4 else None

    def delete_server(self, server_id: str) -> None:
        """Running: terminate (server, volumes and dynamic IP go). Stopped (a power-on that
        never happened or failed): delete, then its volumes, which a delete leaves behind.
        Starting or stopping: neither is allowed yet, so wait for it to settle."""
        deadline = self.clock() + self.delete_timeout_s
        while server := self._server(server_id, ok_missing=True):
            state = server.get("state", "")
            if "terminate" in (server.get("allowed_actions") or []):
                self._act(server_id, "terminate", ok_missing=True)
                return
            if state in ("stopped", "stopped in place"):
                self.client.request("DELETE", self._path(f"/servers/{server_id}"), ok_missing=True)
                for volume in (server.get("volumes") or {}).values():
                    self._delete_volume(volume)
                return
            if state in SETTLED or self.clock() > deadline:
                raise CloudError(f"Scaleway: cannot delete server {server_id} while it is {state}")
            time.sleep(self.poll_s)

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        return [server["id"] for server in self._listing("/servers", "servers", labels)]

    # --- images ------------------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        current = self._image(image_id).get("tags") or []
        self._update_image(image_id, tags=_merge(current, _tags(labels)))

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        """Name it and keep it (private: publishing here means named, tagged and retained);
        the description becomes a tag when one can carry it."""
        current = self._image(image_id).get("tags") or []
        described = _description_tag(name, description)
        self._update_image(image_id, name=name, tags=_merge(current, described))
        return [f"{self.zone} image {image_id}"]

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        return [
            CloudImage(i["id"], i.get("name") or "", i.get("creation_date") or "", _labels(i))
            for i in self._listing("/images", "images", labels)
        ]

    def delete_image(self, image_id: str) -> None:
        """The image, then the snapshots it was made of (an image in use keeps them busy;
        left alone they would go on costing money)."""
        image = self._image(image_id, ok_missing=True)
        if not image:
            return
        self.client.request("DELETE", self._path(f"/images/{image_id}"), ok_missing=True)
        volumes = [image.get("root_volume") or {}, *(image.get("extra_volumes") or {}).values()]
        for snapshot in volumes:
            if not snapshot.get("id"):
                continue
            # Images on Block Storage (sbs_snapshot) keep their snapshots in the Block API.
            api = "block/v1alpha1" if snapshot.get("volume_type") == "sbs_snapshot" else None
            path = f"/{api}/zones/{self.zone}" if api else self._path("")
            self.client.request("DELETE", f"{path}/snapshots/{snapshot['id']}", ok_missing=True)

    # --- mechanics ---------------------------------------------------------------------

    def _path(self, path: str) -> str:
        return f"/instance/v1/zones/{self.zone}{path}"

    def _server(self, server_id: str, ok_missing: bool = False) -> dict[str, Any]:
        body = self.client.request(
            "GET", self._path(f"/servers/{server_id}"), ok_missing=ok_missing
        )
        return body.get("server") or {}

    def _act(self, server_id: str, action: str, ok_missing: bool = False) -> None:
        self.client.request(
            "POST",
            self._path(f"/servers/{server_id}/action"),
            json={"action": action},
            ok_missing=ok_missing,
            # A repeated terminate finds the server gone (404, fine); a repeated power-on
            # would be refused while it starts, so that one is not retried on a 5xx.
            idempotent=action == "terminate",
        )

    def _delete_volume(self, volume: dict[str, Any]) -> None:
        if volume.get("id") and volume.get("volume_type", "l_ssd") in ("l_ssd", "b_ssd"):
            self.client.request("DELETE", self._path(f"/volumes/{volume['id']}"), ok_missing=True)

    def _image(self, image_id: str, ok_missing: bool = False) -> dict[str, Any]:
        body = self.client.request("GET", self._path(f"/images/{image_id}"), ok_missing=ok_missing)
        return body.get("image") or {}

    def _update_image(self, image_id: str, **fields: Any) -> None:
        # PATCH sets exactly these fields (tags as a whole): repeating it is harmless.
        self.client.request(
            "PATCH", self._path(f"/images/{image_id}"), json=fields, idempotent=True
        )

    def _listing(self, path: str, key: str, labels: dict[str, str]) -> Iterator[dict[str, Any]]:
        """This project's resources carrying every label tag: the API filters, and so do
        we (a filter the API ignored must not make us delete someone else's server)."""
        wanted = _tags(labels)
        query = {"project": self.project, "tags": ",".join(wanted), "per_page": PER_PAGE}
        pages = self.client.paginate(
            self._path(path), key, query, style=total_count_pager(self.client, key)
        )
        for item in pages:
            if set(wanted) <= set(item.get("tags") or []) and item.get("project") in (
                None,
                self.project,
            ):
                yield item


def total_count_pager(client: APIClient, key: str) -> Pager:
    """Scaleway pages by ``page``/``per_page`` and says how many items there are in all in
    an X-Total-Count header; without one, a short page is the last."""

    def following(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
        items = len(body.get(key) or [])
        page, per_page = int(query.get("page", 1)), int(query["per_page"])
        total = _header(client.last_headers, "X-Total-Count")
        if total is not None and total.isdigit():
            done = (page - 1) * per_page + items >= int(total)
        else:
            done = items < per_page
        return None if done or not items else (path, query | {"page": page + 1})

    return following


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # last_headers is a plain dict: the case is whatever the server (or HTTP/2) sent.
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def _tags(labels: Mapping[str, str]) -> list[str]:
    tags = [f"{key}={value}" for key, value in labels.items()]
    for tag, key in zip(tags, labels, strict=True):
        # A comma would split the tag in a listing's filter; "=" in the key, the label.
        if "=" in key or not _valid_tag(tag):
            raise ConfigError(f"Scaleway: label {tag!r} cannot be a tag")
    return tags


def _valid_tag(tag: str) -> bool:
    return 0 < len(tag) <= TAG_MAX and tag.isprintable() and "," not in tag


def _labels(resource: Mapping[str, Any]) -> dict[str, str]:
    """Tags "key=value" back to labels; tags of other origins (no "=") are not labels."""
    pairs = (tag.split("=", 1) for tag in resource.get("tags") or [] if "=" in tag)
    return {key: value for key, value in pairs}


def _merge(current: list[str], wanted: list[str]) -> list[str]:
    """``current`` with the keys of ``wanted`` replaced, other tags kept in their order."""
    replaced = {tag.split("=", 1)[0] for tag in wanted}
    kept = [tag for tag in current if "=" not in tag or tag.split("=", 1)[0] not in replaced]
    return kept + wanted


def _description_tag(name: str, description: str) -> list[str]:
    """The description as one tag: without the name it repeats, commas (which would split
    it in a filter) as semicolons; none if it still does not fit."""
    text = description.removeprefix(f"{name}:").strip().replace(",", ";")
    tag = f"{DESCRIPTION_TAG}={text}"
    return [tag] if text and text != name and _valid_tag(tag) else []


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False
