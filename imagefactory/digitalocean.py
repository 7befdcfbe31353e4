"""DigitalOcean API v2 in the verbs of clouds.CloudDriver: a droplet is a check instance,
Packer's snapshot is the image, and labels are tags "key:value" (DigitalOcean has no
key-value labels; tag names allow letters, numbers, colons, dashes and underscores)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cloudapi import APIClient, CallStats, CloudAPIError, links_next
from .clouds import MANAGED, CloudError, CloudImage
from .definitions import DigitalOceanSettings
from .errors import ConfigError

DEFAULT_URL = "https://api.digitalocean.com"
# The variable Packer's builder reads first; DIGITALOCEAN_TOKEN is what doctl and pydo use.
TOKEN_ENV = ("DIGITALOCEAN_API_TOKEN", "DIGITALOCEAN_TOKEN")
TAG_NAME = re.compile(r"^[A-Za-z0-9:_-]{1,255}$")
# Droplet states we will never see turn "active": waiting longer would only burn time.
DEAD = frozenset({"errored", "archive"})


def driver(
    settings: DigitalOceanSettings, env: Mapping[str, str] = os.environ, **client_options: Any
) -> DigitalOceanDriver:
    token = next((env[name] for name in TOKEN_ENV if env.get(name)), None)
    if not token:
        raise ConfigError(
            "DigitalOcean: set DIGITALOCEAN_API_TOKEN (the API token); "
            "it is read from the environment only"
        )
    client = APIClient(
        title="DigitalOcean API",
        base_url=env.get("DIGITALOCEAN_API_URL") or DEFAULT_URL,
        headers={"Authorization": f"Bearer {token}"},
        **client_options,
    )
    return DigitalOceanDriver(settings, client)


@dataclass
class DigitalOceanDriver:
    settings: DigitalOceanSettings
    client: APIClient = field(repr=False)  # its headers carry the token
    title: str = "DigitalOcean"
    login_user: str = "root"
    ssh_port: int = 22
    per_page: int = 200  # DigitalOcean's maximum: the fewest calls per listing
    poll_s: float = 10.0  # between looks at a running image transfer
    transfer_timeout_s: float = 3600.0  # a snapshot transfer takes minutes, sometimes more
    clock: Callable[[], float] = time.monotonic

    @property
    def stats(self) -> CallStats:
        return self.client.stats

    def image_id(self, artifact_id: str) -> str:
        # Packer's artifact id is "<region>[,<region>…]:<snapshot id>".
        snapshot = artifact_id.rsplit(":", 1)[-1]
        if not snapshot.isdigit():
            raise ConfigError(f"DigitalOcean: {artifact_id!r} is not a snapshot id (nyc3:123456)")
        return snapshot

    # --- check instances ---------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        body = {
            "name": name,
            "region": self.settings.region,
            "size": self.settings.size,
            "image": int(image_id),
            "user_data": user_data,
            "tags": _tags(labels),
            "ipv6": False,
            "monitoring": False,
        }
        return str(self.client.request("POST", "/v2/droplets", json=body)["droplet"]["id"])

    def server_address(self, server_id: str) -> str | None:
        droplet = self.client.request("GET", f"/v2/droplets/{server_id}")["droplet"]
        status = droplet.get("status")
        if status in DEAD:
            raise CloudError(f"DigitalOcean: droplet {server_id} is {status}")
        if status != "active":
            return None
        public = [n for n in droplet.get("networks", {}).get("v4", []) if n.get("type") == "public"]
        return public[0]["ip_address"] if public else None

    def delete_server(self, server_id: str) -> None:
        self.client.request("DELETE", f"/v2/droplets/{server_id}", ok_missing=True)

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        found = self._listing("/v2/droplets", "droplets", labels, {})
        return [str(droplet["id"]) for droplet in found]

    # --- images ------------------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        """Exactly these values for these keys: new tags first, then the stale ones go, so
        the image never lacks a verdict (a crash in between leaves both, fixed next time)."""
        carried = self._image(image_id).get("tags") or []
        wanted = _tags(labels)
        for tag in wanted:
            if tag not in carried:
                self._create_tag(tag)
                self._tag_image("POST", tag, image_id)
        for tag in carried:
            if tag not in wanted and tag.split(":", 1)[0] in labels:
                self._tag_image("DELETE", tag, image_id)

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        """Rename, then transfer to every publish region it is not in yet (all started
        before waiting for any: transfers run in parallel)."""
        body = {"name": name, "description": description}
        image = self.client.request("PUT", f"/v2/images/{image_id}", json=body)["image"]
        regions = list(image.get("regions") or [])
        started: dict[str, int] = {}
        for region in self.settings.publish_regions:
            if region not in regions and region not in started:
                started[region] = self._transfer(image_id, region)
        for region, action_id in started.items():
            self._wait_for_transfer(image_id, region, action_id)
            regions.append(region)
        return regions

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        found = self._listing("/v2/images", "images", labels, {"private": "true"})
        return [
            CloudImage(str(i["id"]), i.get("name") or "", i.get("created_at") or "", _labels(i))
            for i in found
        ]

    def delete_image(self, image_id: str) -> None:
        self.client.request("DELETE", f"/v2/images/{image_id}", ok_missing=True)

    # --- mechanics ---------------------------------------------------------------------

    def _listing(
        self, path: str, key: str, labels: dict[str, str], params: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        """Resources carrying every label tag: the API filters by one tag, we by the rest."""
        wanted = set(_tags(labels))
        query = params | _filter(labels) | {"per_page": self.per_page}
        for item in self.client.paginate(path, key, query, style=links_next):
            if wanted <= set(item.get("tags") or []):
                yield item

    def _image(self, image_id: str) -> dict[str, Any]:
        return self.client.request("GET", f"/v2/images/{image_id}")["image"]

    def _create_tag(self, tag: str) -> None:
        try:
            self.client.request("POST", "/v2/tags", json={"name": tag})
        except CloudAPIError as exc:
            if exc.status != 422:  # 422: it exists already (the name itself was checked)
                raise

    def _tag_image(self, method: str, tag: str, image_id: str) -> None:
        resources = [{"resource_id": str(image_id), "resource_type": "image"}]
        self.client.request(method, f"/v2/tags/{tag}/resources", json={"resources": resources})

    def _transfer(self, image_id: str, region: str) -> int:
        body = {"type": "transfer", "region": region}
        action = self.client.request("POST", f"/v2/images/{image_id}/actions", json=body)
        return action["action"]["id"]

    def _wait_for_transfer(self, image_id: str, region: str, action_id: int) -> None:
        deadline = self.clock() + self.transfer_timeout_s
        while True:
            action = self.client.request("GET", f"/v2/actions/{action_id}")["action"]
            if action.get("status") == "completed":
                return
            if action.get("status") == "errored":
                raise CloudError(
                    f"DigitalOcean: transferring image {image_id} to {region} failed "
                    f"(action {action_id})"
                )
            if self.clock() > deadline:
                raise CloudError(
                    f"DigitalOcean: transferring image {image_id} to {region} not done after "
                    f"{self.transfer_timeout_s:.0f} s (action {action_id})"
                )
            time.sleep(self.poll_s)


def _tags(labels: Mapping[str, str]) -> list[str]:
    tags = [f"{key}:{value}" for key, value in labels.items()]
    for tag, key in zip(tags, labels, strict=True):
        if ":" in key or not TAG_NAME.match(tag):
            raise ConfigError(f"DigitalOcean: label {tag!r} cannot be a tag name")
    return tags


def _labels(resource: dict[str, Any]) -> dict[str, str]:
    """Tags "key:value" back to labels; tags of other origins (no colon) are not labels."""
    pairs = (tag.split(":", 1) for tag in resource.get("tags") or [] if ":" in tag)
    return {key: value for key, value in pairs}


def _filter(labels: Mapping[str, str]) -> dict[str, str]:
    """The one tag the API filters by: a role or verdict matches fewer resources than the
    "managed" tag every resource of ours carries, so fewer pages come back."""
    specific = [key for key in labels if key not in MANAGED] or list(labels)
    return {"tag_name": _tags({specific[-1]: labels[specific[-1]]})[0]} if specific else {}
