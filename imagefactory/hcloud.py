"""Hetzner Cloud (API v1) as a CloudDriver: check servers from a Packer snapshot, labels on
snapshots for verdicts, and publishing as a described, delete-protected snapshot.

Every call goes through cloudapi.APIClient (retries, Retry-After, pagination, call counts).
The token comes from HCLOUD_TOKEN only, as for Packer's hcloud builder and the hcloud CLI."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .cloudapi import APIClient, CallStats, meta_next_page
from .clouds import CloudError, CloudImage
from .definitions import HetznerSettings
from .errors import ConfigError

DEFAULT_ENDPOINT = "https://api.hetzner.cloud/v1"
# Snapshots have no settable name: the published name lives in this label (and the description).
NAME_LABEL = "imagefactory-name"
PER_PAGE = 50  # the API's maximum page size
# Label values: at most 63 characters, alphanumeric at both ends, "-_." inside.
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


def driver(
    settings: HetznerSettings, env: Mapping[str, str] = os.environ, **client_options: Any
) -> HetznerDriver:
    token = env.get("HCLOUD_TOKEN", "").strip()
    if not token:
        raise ConfigError(
            "Hetzner Cloud: set HCLOUD_TOKEN (the API token); it is read from the environment only"
        )
    if not (token.isascii() and token.isprintable()) or " " in token:
        # requests would otherwise quote the whole header value (the token) in its error.
        raise ConfigError("Hetzner Cloud: HCLOUD_TOKEN contains spaces or control characters")
    client = APIClient(
        title="Hetzner Cloud API",
        base_url=env.get("HCLOUD_ENDPOINT") or DEFAULT_ENDPOINT,
        headers={"Authorization": f"Bearer {token}"},
        **client_options,
    )
    return HetznerDriver(client, settings)


@dataclass
class HetznerDriver:
    client: APIClient = field(repr=False)  # its repr shows the headers, i.e. the token
    settings: HetznerSettings
    poll_s: float = 1.0  # between polls of an action (a protection change takes about one)
    action_timeout_s: float = 300.0

    title = "Hetzner Cloud"
    login_user = "root"
    ssh_port = 22

    @property
    def stats(self) -> CallStats:
        return self.client.stats

    def image_id(self, artifact_id: str) -> str:
        return artifact_id  # Packer's hcloud artifact id is the snapshot id

    # --- servers ------------------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        body = self.client.request(
            "POST",
            "/servers",
            json={
                "name": name,
                "server_type": self.settings.server_type,
                "image": image_id,  # "ID or name"; a snapshot has only an id
                "location": self.settings.location,
                "user_data": user_data,
                "labels": labels,
                "start_after_create": True,
                # The checks reach it over IPv4; an unused IPv6 would only widen the surface.
                "public_net": {"enable_ipv4": True, "enable_ipv6": False},
            },
        )
        return str(body["server"]["id"])

    def server_address(self, server_id: str) -> str | None:
        server = self.client.request("GET", f"/servers/{server_id}")["server"]
        if server.get("status") != "running":
            return None
        ipv4 = (server.get("public_net") or {}).get("ipv4") or {}
        return ipv4.get("ip")

    def delete_server(self, server_id: str) -> None:
        # The delete action finishes on its own; nothing here depends on it being done.
        self.client.request("DELETE", f"/servers/{server_id}", ok_missing=True)

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        return [str(s["id"]) for s in self._list("/servers", "servers", labels)]

    # --- images (snapshots) -------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        self._update_image(image_id, labels)

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        if not _LABEL_VALUE.match(name):
            raise ConfigError(f"Hetzner Cloud: {name!r} is not a valid label value (63 max)")
        # The console lists snapshots by description: the name goes first.
        if not description.startswith(name):
            description = f"{name}: {description}"
        self._update_image(image_id, {NAME_LABEL: name}, description=description)
        self._protect(image_id, True)
        return [f"snapshot {image_id} (delete-protected)"]

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        return [
            _cloud_image(image)
            for image in self._list("/images", "images", labels, type="snapshot")
        ]

    def delete_image(self, image_id: str) -> None:
        if self._protect(image_id, False, ok_missing=True):
            self.client.request("DELETE", f"/images/{image_id}", ok_missing=True)

    # --- helpers ------------------------------------------------------------------------

    def _update_image(self, image_id: str, labels: dict[str, str], **fields: str) -> None:
        # PUT replaces the whole label set: merge into what is there.
        current = self.client.request("GET", f"/images/{image_id}")["image"].get("labels") or {}
        self.client.request(
            "PUT", f"/images/{image_id}", json={**fields, "labels": current | labels}
        )

    def _protect(self, image_id: str, delete: bool, ok_missing: bool = False) -> bool:
        """Set delete protection and wait for it; False if the image does not exist."""
        body = self.client.request(
            "POST",
            f"/images/{image_id}/actions/change_protection",
            json={"delete": delete},
            ok_missing=ok_missing,
        )
        if not body:
            return False
        self._wait_for_action(body["action"], f"image {image_id}")
        return True

    def _wait_for_action(self, action: dict[str, Any], what: str) -> None:
        deadline = time.monotonic() + self.action_timeout_s
        while action["status"] == "running":
            if time.monotonic() > deadline:
                raise CloudError(
                    f"{self.title}: {action['command']} on {what} (action {action['id']}) "
                    f"still running after {self.action_timeout_s:.0f} s"
                )
            time.sleep(self.poll_s)
            action = self.client.request("GET", f"/actions/{action['id']}")["action"]
        if action["status"] != "success":
            error = action.get("error") or {}
            reason = error.get("message") or error.get("code") or action["status"]
            raise CloudError(f"{self.title}: {action['command']} on {what} failed: {reason}")

    def _list(
        self, path: str, key: str, labels: dict[str, str], **params: str
    ) -> list[dict[str, Any]]:
        query = {**params, "label_selector": selector(labels), "per_page": PER_PAGE}
        return list(self.client.paginate(path, key, query, style=meta_next_page))


def selector(labels: Mapping[str, str]) -> str:
    """A label selector matching all of ``labels`` (k1=v1,k2=v2)."""
    return ",".join(f"{key}={value}" for key, value in labels.items())


def _cloud_image(image: dict[str, Any]) -> CloudImage:
    labels = dict(image.get("labels") or {})
    return CloudImage(
        id=str(image["id"]),
        name=labels.get(NAME_LABEL) or image.get("description") or "",
        created=image.get("created") or "",
        labels=labels,
    )
