"""OpenStack (Keystone v3, Nova v2.1, Glance v2) in the verbs of clouds.CloudDriver: a Nova
server from Packer's Glance image is the check instance, labels are Nova server metadata and
Glance image tags "key=value", and publishing renames, describes and protects the image.

Credentials are the standard OS_* variables (those Packer's openstack builder reads), from
the environment only. The driver logs in with the password once, takes its compute, image
and (for network names only) network endpoints from the token's catalog, and renews the
token once when a call is refused with 401 (tokens expire, by default after an hour)."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

from .cloudapi import APIClient, CallStats, CloudAPIError, Page, Pager
from .clouds import CHECK_NAME_PREFIX, ROLE, CloudError, CloudImage
from .definitions import OpenStackSettings
from .errors import ConfigError

T = TypeVar("T")

REQUIRED_ENV = ("OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD")
INTERFACES = ("public", "internal", "admin")
# 2.37 (Newton): "networks" is required and may be "auto": the project's one network, or one
# Neutron allocates for it. The older header spelling is for clouds from before 2.27.
MICROVERSION = {"OpenStack-API-Version": "compute 2.37", "X-OpenStack-Nova-API-Version": "2.37"}
JSON_PATCH = "application/openstack-images-v2.1-json-patch"
UUID = re.compile(r"^[0-9a-fA-F]{8}-?(?:[0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
# clouds.launched names every check server so; Nova's name filter is a regular expression,
# so the listing brings back only those instead of every server in the project.
CHECK_NAME_FILTER = f"^{CHECK_NAME_PREFIX}"
# Server states a server being created never leaves on its own: waiting would only burn time.
DEAD = frozenset({"ERROR", "DELETED", "SOFT_DELETED", "SHUTOFF"})
PER_PAGE = 200  # Nova and Glance cap a page at 1000 by default; 200 keeps answers small
TAG_MAX = 255  # Glance's limit on a tag, and Nova's on a metadata key or value


@dataclass(frozen=True)
class Credentials:
    auth_url: str  # the Keystone v3 root, ".../v3"
    user: dict[str, Any]  # {"name", "domain"}, without the password
    password: str = field(repr=False)
    project: dict[str, Any]  # {"id"} or {"name", "domain"}
    region: str  # "" : the catalog must then offer just one
    interface: str


def driver(
    settings: OpenStackSettings, env: Mapping[str, str] = os.environ, **client_options: Any
) -> OpenStackDriver:
    return OpenStackDriver(settings, credentials(env), client_options)


def credentials(env: Mapping[str, str]) -> Credentials:
    """The OS_* variables of an openrc file (names, or the ids Horizon's openrc exports)."""
    missing = [name for name in REQUIRED_ENV if not env.get(name)]
    if not (env.get("OS_PROJECT_NAME") or env.get("OS_PROJECT_ID")):
        missing.append("OS_PROJECT_NAME")
    if missing:
        raise ConfigError(
            f"OpenStack: set {', '.join(missing)} (the OS_* variables of your openrc); "
            "credentials are read from the environment only"
        )
    interface = (env.get("OS_INTERFACE") or env.get("OS_ENDPOINT_TYPE") or "public").strip()
    interface = interface.removesuffix("URL")  # the v2-era spelling "publicURL"
    if interface not in INTERFACES:
        raise ConfigError(f"OpenStack: OS_INTERFACE={interface!r} is not one of {INTERFACES}")
    user_domain = _domain(env, "OS_USER_DOMAIN")
    project = (
        {"id": env["OS_PROJECT_ID"].strip()}
        if env.get("OS_PROJECT_ID")
        else {"name": env["OS_PROJECT_NAME"].strip(), "domain": _domain(env, "OS_PROJECT_DOMAIN")}
    )
    return Credentials(
        auth_url=identity_url(env["OS_AUTH_URL"]),
        user={"name": env["OS_USERNAME"].strip(), "domain": user_domain},
        password=env["OS_PASSWORD"],  # as given: spaces may belong to it
        project=project,
        region=(env.get("OS_REGION_NAME") or "").strip(),
        interface=interface,
    )


def _domain(env: Mapping[str, str], prefix: str) -> dict[str, str]:
    if env.get(f"{prefix}_ID"):
        return {"id": env[f"{prefix}_ID"].strip()}
    return {"name": (env.get(f"{prefix}_NAME") or "Default").strip()}


def identity_url(auth_url: str) -> str:
    """Keystone's v3 root: openrc files give it with or without the version."""
    url = auth_url.strip().rstrip("/")
    if re.search(r"/v2\.0$", url):
        raise ConfigError("OpenStack: OS_AUTH_URL points at Keystone v2.0; give the v3 URL")
    return url if url.endswith("/v3") else f"{url}/v3"


def service_root(url: str) -> str:
    """Glance and Neutron endpoints are listed with or without their version (/v2, /v2.0);
    our paths carry it."""
    return re.sub(r"/v\d+(?:\.\d+)?/?$", "", url.rstrip("/"))


@dataclass
class OpenStackDriver:
    settings: OpenStackSettings
    credentials: Credentials = field(repr=False)
    client_options: dict[str, Any] = field(default_factory=dict, repr=False)
    stats: CallStats = field(default_factory=CallStats)  # every API, Keystone included
    per_page: int = PER_PAGE
    title: str = "OpenStack"
    ssh_port: int = 22
    endpoints: dict[str, str] = field(init=False, default_factory=dict)  # type -> URL
    project_id: str = field(init=False, default="")  # the token's project
    # One per service, all carrying the token: never shown.
    _clients: dict[str, APIClient] = field(init=False, default_factory=dict, repr=False)
    _flavor: str = field(init=False, default="", repr=False)

    def __post_init__(self) -> None:
        self.login()

    @property
    def login_user(self) -> str:
        # cloud-init's default user on Ubuntu; check_user_data gives it this boot's key.
        return self.settings.ssh_username

    def image_id(self, artifact_id: str) -> str:
        # Packer's openstack artifact id is the Glance image id (a UUID).
        image_id = artifact_id.strip()
        if not UUID.match(image_id):
            raise ConfigError(f"OpenStack: {artifact_id!r} is not a Glance image id (a UUID)")
        return image_id

    # --- authentication ----------------------------------------------------------------

    def login(self) -> None:
        """A password-scoped token and the endpoints for our region and interface."""
        keystone = self._client("Identity", self.credentials.auth_url, {})
        # A token request changes nothing: safe to repeat after a 5xx.
        body = keystone.request(
            "POST", "/auth/tokens", json=auth_body(self.credentials), idempotent=True
        )
        token = _header(keystone.last_headers, "X-Subject-Token")
        if not token:
            raise CloudAPIError("OpenStack Identity API: POST /auth/tokens: no X-Subject-Token")
        catalog = (body.get("token") or {}).get("catalog") or []
        self.project_id = str(((body.get("token") or {}).get("project") or {}).get("id") or "")
        creds = self.credentials
        self.endpoints = {
            kind: url
            for kind in ("compute", "image", "network")
            if (url := endpoint(catalog, kind, creds.region, creds.interface, kind != "network"))
        }
        auth = {"X-Auth-Token": token}
        self._clients = {
            "compute": self._client("Compute", self.endpoints["compute"], auth | MICROVERSION),
            "image": self._client("Image", service_root(self.endpoints["image"]), auth),
        }
        if "network" in self.endpoints:
            root = service_root(self.endpoints["network"])
            self._clients["network"] = self._client("Network", root, auth)

    def _client(self, service: str, url: str, headers: dict[str, str]) -> APIClient:
        return APIClient(
            title=f"OpenStack {service} API",
            base_url=url,
            headers=headers,
            stats=self.stats,  # one count for the whole cloud
            **self.client_options,
        )

    def _renewing(self, call: Callable[[], T]) -> T:
        """``call``, once more with a new token if the old one was refused (expired or
        revoked mid-run: a check can outlast it, and the destroy must still work)."""
        try:
            return call()
        except CloudAPIError as exc:
            if exc.status != 401:
                raise
        self.login()
        return call()

    def _request(self, service: str, method: str, path: str, **options: Any) -> dict[str, Any]:
        return self._renewing(lambda: self._clients[service].request(method, path, **options))

    def _listing(
        self, service: str, path: str, key: str, query: dict[str, Any], style: Pager
    ) -> list[dict[str, Any]]:
        # A listing restarts as a whole after a renewal: its pages belong together.
        return self._renewing(
            lambda: list(self._clients[service].paginate(path, key, query, style=style))
        )

    # --- check instances ---------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        server = {
            "name": name,
            "imageRef": image_id,
            "flavorRef": self._flavor_id(),
            "networks": self._networks(),
            "user_data": base64.b64encode(user_data.encode()).decode(),
            "metadata": _metadata(labels),
        }
        body = self._request("compute", "POST", "/servers", json={"server": server})
        return str(body["server"]["id"])

    def server_address(self, server_id: str) -> str | None:
        server = self._request("compute", "GET", f"/servers/{server_id}")["server"]
        status = server.get("status")
        if status in DEAD:
            fault = str((server.get("fault") or {}).get("message") or "").splitlines()
            reason = f": {fault[0][:200]}" if fault else ""
            raise CloudError(f"OpenStack: server {server_id} is {status}{reason}")
        if status != "ACTIVE":
            return None
        addresses = server.get("addresses") or {}
        address = ipv4(addresses)
        if address is None and addresses:
            raise CloudError(f"OpenStack: server {server_id} is ACTIVE without an IPv4 address")
        return address

    def delete_server(self, server_id: str) -> None:
        self._request("compute", "DELETE", f"/servers/{server_id}", ok_missing=True)

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        # Nova cannot filter by metadata: by name server-side when we can, by labels here.
        query: dict[str, Any] = {"limit": self.per_page}
        if labels.get(ROLE) == "check-instance":
            query["name"] = CHECK_NAME_FILTER
        pager = links_next("servers_links")
        found = self._listing("compute", "/servers/detail", "servers", query, pager)
        return [str(s["id"]) for s in found if _carries(s.get("metadata") or {}, labels)]

    def _flavor_id(self) -> str:
        """settings.flavor as a flavor id: it may be the id or the name. Nova's flavor list
        has no name filter: we match in the listing (one page on most clouds), once."""
        if not self._flavor:
            wanted = self.settings.flavor
            query = {"limit": self.per_page}
            pager = links_next("flavors_links")
            flavors = self._listing("compute", "/flavors", "flavors", query, pager)
            by_id = [f for f in flavors if f.get("id") == wanted]
            by_name = [f for f in flavors if f.get("name") == wanted]
            matches = by_id or by_name
            if len(matches) != 1:
                known = ", ".join(sorted(str(f.get("name")) for f in flavors)[:20])
                problem = "several flavors are named" if matches else "no flavor"
                raise ConfigError(f"OpenStack: {problem} {wanted!r} (flavors: {known})")
            self._flavor = str(matches[0]["id"])
        return self._flavor

    def _networks(self) -> list[dict[str, str]] | str:
        if not self.settings.networks:
            return "auto"
        return [{"uuid": self._network_id(network)} for network in self.settings.networks]

    def _network_id(self, network: str) -> str:
        """A network UUID as given (what Packer's builder takes); a name, through Neutron."""
        if UUID.match(network):
            return network
        if "network" not in self._clients:
            raise ConfigError(
                f"OpenStack: network {network!r}: no network service in the catalog to look "
                "the name up; give the network's UUID"
            )
        query = {"name": network}
        found = self._request("network", "GET", "/v2.0/networks", params=query)["networks"]
        if len(found) != 1:
            problem = "several networks are named" if found else "no network named"
            raise ConfigError(f"OpenStack: {problem} {network!r}; give the network's UUID")
        return str(found[0]["id"])

    # --- images ------------------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        """Exactly these values for these keys: new tags first, then the stale ones go, so
        the image never lacks a verdict (a crash in between leaves both, fixed next time)."""
        carried = self._request("image", "GET", f"/v2/images/{image_id}").get("tags") or []
        wanted = _tags(labels)
        for tag in wanted:
            if tag not in carried:
                self._request("image", "PUT", _tag_path(image_id, tag))
        for tag in carried:
            if tag not in wanted and tag.split("=", 1)[0] in labels:
                self._request("image", "DELETE", _tag_path(image_id, tag), ok_missing=True)

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        # "add" sets a property whether or not it exists (v2.1 patch); "replace" would be
        # refused (409) for a description the image does not have yet.
        ops = [
            {"op": "replace", "path": "/name", "value": name},
            {"op": "add", "path": "/description", "value": description},
            {"op": "replace", "path": "/protected", "value": True},
        ]
        self._patch(image_id, ops)
        return [f"image {image_id} (protected)"]

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        # Glance filters by every tag given (tag=a&tag=b); checked here again all the same.
        # Only our project's images: retention must never reach for a public or shared one.
        query: dict[str, Any] = {"tag": _tags(labels), "limit": self.per_page}
        if self.project_id:
            query["owner"] = self.project_id
        found = self._listing("image", "/v2/images", "images", query, glance_next)
        return [_cloud_image(i) for i in found if set(query["tag"]) <= set(i.get("tags") or [])]

    def delete_image(self, image_id: str) -> None:
        """Protected images cannot be deleted (403): unprotect first; gone already is fine."""
        unprotect = [{"op": "replace", "path": "/protected", "value": False}]
        if self._patch(image_id, unprotect, ok_missing=True):
            self._request("image", "DELETE", f"/v2/images/{image_id}", ok_missing=True)

    def _patch(
        self, image_id: str, ops: list[dict[str, Any]], ok_missing: bool = False
    ) -> dict[str, Any]:
        """A JSON patch; setting values is safe to repeat, so a 5xx is retried."""
        return self._request(
            "image",
            "PATCH",
            f"/v2/images/{image_id}",
            data=json.dumps(ops),
            content_type=JSON_PATCH,
            ok_missing=ok_missing,
            idempotent=True,
        )


# --- Keystone -------------------------------------------------------------------------


def auth_body(creds: Credentials) -> dict[str, Any]:
    """Password authentication, scoped to the project (the catalog comes with the token)."""
    user = creds.user | {"password": creds.password}
    return {
        "auth": {
            "identity": {"methods": ["password"], "password": {"user": user}},
            "scope": {"project": creds.project},
        }
    }


def endpoint(
    catalog: list[dict[str, Any]], kind: str, region: str, interface: str, required: bool = True
) -> str:
    """The URL of service ``kind`` for our interface, in ``region`` (any region when it is
    unset and the catalog offers only one)."""
    urls = {
        str(e.get("region_id") or e.get("region") or ""): str(e["url"])
        for service in catalog
        if service.get("type") == kind
        for e in service.get("endpoints") or []
        if e.get("interface") == interface and e.get("url")
    }
    if region:
        urls = {r: url for r, url in urls.items() if r == region}
    if len(set(urls.values())) > 1:
        raise ConfigError(
            f"OpenStack: {kind} endpoints in several regions ({', '.join(sorted(urls))}); "
            "set OS_REGION_NAME"
        )
    if not urls and required:
        where = f"region {region}" if region else "any region"
        raise ConfigError(
            f"OpenStack: no {kind} endpoint (interface {interface}, {where}) in the catalog"
        )
    return next(iter(urls.values()), "")


def _header(headers: Mapping[str, str], name: str) -> str:
    """``last_headers`` is a plain dict: a proxy may have lower-cased the name."""
    return next((v for k, v in headers.items() if k.lower() == name.lower()), "").strip()


# --- pagination -----------------------------------------------------------------------


def links_next(key: str) -> Pager:
    """Nova: ``<key>`` (servers_links, flavors_links) holds {"rel": "next", "href"} while
    a page is full. Only the link's query (marker, limit, filters) is used, on our own
    path: the href's host is what Nova was configured to write (osapi_compute_link_prefix),
    behind a proxy often not the catalog's, and the client refuses other hosts."""

    def following(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
        href = next(
            (link.get("href") for link in body.get(key) or [] if link.get("rel") == "next"), None
        )
        return _next_query(href, path, query)

    return following


def glance_next(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
    """Glance: ``next`` is "/v2/images?marker=…" (relative to the image service root)."""
    return _next_query(body.get("next"), path, query)


def _next_query(href: str | None, path: str, query: dict[str, Any]) -> Page | None:
    if not href:
        return None
    following = query | parse_qs(urlsplit(href).query)
    if following.get("marker") in (None, query.get("marker")):
        return None  # no progress: stop rather than ask for the same page forever
    return path, following


# --- shapes ---------------------------------------------------------------------------


def ipv4(addresses: dict[str, list[dict[str, Any]]]) -> str | None:
    """The address to reach a server at: its first floating IPv4, else its first fixed one."""
    found = [a for network in addresses.values() for a in network or [] if a.get("version") == 4]
    floating = [a for a in found if a.get("OS-EXT-IPS:type") == "floating"]
    chosen = (floating or found)[:1]
    return str(chosen[0]["addr"]) if chosen else None


def _metadata(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not (0 < len(key) <= TAG_MAX and len(value) <= TAG_MAX):
            raise ConfigError(f"OpenStack: label {key}={value!r} is too long for Nova metadata")
    return dict(labels)


def _carries(metadata: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(metadata.get(key) == value for key, value in labels.items())


def _tags(labels: Mapping[str, str]) -> list[str]:
    tags = [f"{key}={value}" for key, value in labels.items()]
    for tag, key in zip(tags, labels, strict=True):
        # The tag goes into a URL path: no "/"; "=" in a key would make it ambiguous.
        if not key or "=" in key or "/" in tag or len(tag) > TAG_MAX or not tag.isprintable():
            raise ConfigError(f"OpenStack: label {tag!r} cannot be a Glance image tag")
    return tags


def _tag_path(image_id: str, tag: str) -> str:
    return f"/v2/images/{image_id}/tags/{quote(tag, safe='=:')}"


def _labels(image: dict[str, Any]) -> dict[str, str]:
    """Tags "key=value" back to labels; tags of other origins (no "=") are not labels."""
    pairs = (tag.split("=", 1) for tag in image.get("tags") or [] if "=" in tag)
    return {key: value for key, value in pairs}


def _cloud_image(image: dict[str, Any]) -> CloudImage:
    return CloudImage(
        id=str(image["id"]),
        name=image.get("name") or "",
        created=image.get("created_at") or "",
        labels=_labels(image),
    )
