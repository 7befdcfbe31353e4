"""Google Compute Engine (Compute API v1) in the verbs of clouds.CloudDriver: a check instance
is a VM booted from Packer's image, labels are GCE labels, and publishing puts the image in
its family (images.patch), deprecates the family's older images in its favour and grants
roles/compute.imageUser to the configured members.

Credentials are a service-account key file named by GOOGLE_APPLICATION_CREDENTIALS (as for
Packer's googlecompute builder), read through google-auth; the project is GOOGLE_PROJECT (as
the Packer template reads it) or the key's project_id. The access token is renewed when it
expires and once more when a call is refused with 401. Every mutating call answers with an
Operation, which is polled until DONE; its errors are raised as CloudAPIError."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import service_account

from .cloudapi import APIClient, CallStats, CloudAPIError, Page
from .clouds import CloudError, CloudImage
from .definitions import GoogleSettings
from .errors import ConfigError

T = TypeVar("T")

DEFAULT_URL = "https://compute.googleapis.com/compute/v1"
URL_ENV = "GCE_API_URL"  # tests point the driver at a local fake with it
SCOPE = "https://www.googleapis.com/auth/compute"
KEY_FIELDS = ("client_email", "private_key", "token_uri")
# Images have no settable name: the name publish gave lives in this label, "." as "_"
# (label values allow only lowercase letters, digits, "-" and "_").
NAME_LABEL = "imagefactory-name"
IMAGE_USER = "roles/compute.imageUser"
RESOURCE_NAME = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, as GCE wants
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
# Instance states a starting instance does not leave on its own: waiting would only burn time.
DEAD = frozenset({"STOPPING", "STOPPED", "SUSPENDING", "SUSPENDED", "TERMINATED"})
PER_PAGE = 500  # the API's maximum maxResults: the fewest calls per listing
OPERATION_POLL_S = 2.0
OPERATION_TIMEOUT_S = 600.0


def driver(
    settings: GoogleSettings, env: Mapping[str, str] = os.environ, **client_options: Any
) -> GCEDriver:
    key = service_account_key(env)
    project = (env.get("GOOGLE_PROJECT") or str(key.get("project_id") or "")).strip()
    if not project:
        raise ConfigError(
            "Google Compute Engine: set GOOGLE_PROJECT (the key file names no project_id)"
        )
    try:
        credentials = service_account.Credentials.from_service_account_info(key, scopes=[SCOPE])
    except (ValueError, TypeError):
        # The library's message may quote the key material: ours names only the file.
        raise ConfigError(
            f"Google Compute Engine: {env['GOOGLE_APPLICATION_CREDENTIALS']}: "
            "the private key in this service-account key file cannot be read"
        ) from None
    base_url = env.get(URL_ENV) or DEFAULT_URL
    return GCEDriver(settings, project, credentials, base_url, client_options)


def service_account_key(env: Mapping[str, str]) -> dict[str, Any]:
    """The key file's JSON; every problem with it is one line that never quotes the key."""
    path = (env.get("GOOGLE_APPLICATION_CREDENTIALS") or "").strip()
    if not path:
        raise ConfigError(
            "Google Compute Engine: set GOOGLE_APPLICATION_CREDENTIALS (a service-account "
            "key file); it is read from the environment only"
        )
    try:
        key = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"Google Compute Engine: {path}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"Google Compute Engine: {path}: not a JSON key file") from None
    if not isinstance(key, dict) or key.get("type") != "service_account":
        raise ConfigError(
            f"Google Compute Engine: {path}: not a service-account key file (user credentials "
            "from `gcloud auth application-default login` are not supported)"
        )
    missing = [name for name in KEY_FIELDS if not key.get(name)]
    if missing:
        raise ConfigError(f"Google Compute Engine: {path}: no {', '.join(missing)} in the key")
    return key


@dataclass
class GCEDriver:
    settings: GoogleSettings
    project: str
    credentials: service_account.Credentials = field(repr=False)  # holds the private key
    base_url: str = DEFAULT_URL
    client_options: dict[str, Any] = field(default_factory=dict, repr=False)
    stats: CallStats = field(default_factory=CallStats)  # the token endpoint's calls too
    per_page: int = PER_PAGE
    poll_s: float = OPERATION_POLL_S
    operation_timeout_s: float = OPERATION_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic
    title: str = "Google Compute Engine"
    ssh_port: int = 22
    _client: APIClient | None = field(init=False, default=None, repr=False)  # carries the token

    @property
    def login_user(self) -> str:
        # cloud-init's default user on Ubuntu; check_user_data gives it this boot's key (root
        # gets it too, but GCE images may forbid root logins in sshd_config).
        return self.settings.ssh_username

    def image_id(self, artifact_id: str) -> str:
        # Packer's googlecompute artifact id is the image name, the id in every image path.
        name = artifact_id.strip()
        if not RESOURCE_NAME.match(name):
            raise ConfigError(f"Google Compute Engine: {artifact_id!r} is not an image name")
        return name

    # --- authentication ----------------------------------------------------------------

    def _api(self) -> APIClient:
        """The client with a valid token: a new one once the old token expired."""
        if self._client is None or not self.credentials.valid:
            self._login()
        assert self._client is not None
        return self._client

    def _login(self) -> None:
        transport = google.auth.transport.requests.Request(requests.Session())
        timeout = self.client_options.get("timeout", (10.0, 60.0))

        def counted(url: str, method: str = "GET", **kwargs: Any) -> Any:
            # google-auth sends the token request (and retries a 5xx itself): count each.
            self.stats.calls += 1
            self.stats.by_call["POST /token"] = self.stats.by_call.get("POST /token", 0) + 1
            return transport(url, method, **(kwargs | {"timeout": timeout}))

        # google-auth logs token requests at DEBUG with the signed assertion in the body.
        logging.getLogger("google.auth.transport.requests").setLevel(logging.WARNING)
        try:
            self.credentials.refresh(counted)
        except google.auth.exceptions.RefreshError as exc:
            reason = str(exc.args[0] if exc.args else "refused")[:200]
            raise CloudAPIError(f"Google OAuth: POST /token: {reason}", 400) from None
        except google.auth.exceptions.TransportError as exc:
            cause = type(exc.__cause__ or exc).__name__
            raise CloudAPIError(f"Google OAuth: POST /token: {cause}") from None
        self._client = APIClient(
            title="Compute Engine API",
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.credentials.token}"},
            stats=self.stats,
            **self.client_options,
        )

    def _renewing(self, call: Callable[[APIClient], T]) -> T:
        """``call``, once more with a new token if the old one was refused (revoked, or
        expired early: a check can outlast it, and the destroy must still work)."""
        try:
            return call(self._api())
        except CloudAPIError as exc:
            if exc.status != 401:
                raise
        self._login()
        return call(self._api())

    def _request(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        return self._renewing(lambda api: api.request(method, path, **options))

    def _listing(self, path: str, filter_text: str) -> list[dict[str, Any]]:
        # A listing restarts as a whole after a renewal: its pages belong together.
        query = {"filter": filter_text, "maxResults": self.per_page}
        return self._renewing(
            lambda api: list(api.paginate(path, "items", query, style=next_page_token))
        )

    # --- operations --------------------------------------------------------------------

    def _operation(self, method: str, path: str, what: str, **options: Any) -> None:
        """A mutating call and the wait for its Operation (no wait when 404 is fine and the
        resource is gone already)."""
        operation = self._request(method, path, **options)
        if operation:
            self._wait(operation, what)

    def _wait(self, operation: dict[str, Any], what: str) -> None:
        deadline = self.clock() + self.operation_timeout_s
        while operation.get("status") != "DONE":
            if self.clock() > deadline:
                raise CloudError(
                    f"{self.title}: {what}: operation {operation.get('name')} not done after "
                    f"{self.operation_timeout_s:.0f} s"
                )
            time.sleep(self.poll_s)
            operation = self._request("GET", self._operation_path(operation))
        errors = (operation.get("error") or {}).get("errors") or []
        if errors:
            messages = "; ".join(str(e.get("message") or e.get("code")) for e in errors)
            status = operation.get("httpErrorStatusCode")
            raise CloudAPIError(f"{self.title}: {what}: {messages[:300]}", status)

    def _operation_path(self, operation: dict[str, Any]) -> str:
        name = operation["name"]
        if operation.get("zone"):
            zone = str(operation["zone"]).rsplit("/", 1)[-1]
            return f"/projects/{self.project}/zones/{zone}/operations/{name}"
        return f"/projects/{self.project}/global/operations/{name}"

    # --- check instances ---------------------------------------------------------------

    def create_server(
        self, name: str, image_id: str, user_data: str, labels: dict[str, str]
    ) -> str:
        zone = self.settings.zone
        instance = {
            "name": name,
            "machineType": f"zones/{zone}/machineTypes/{self.settings.machine_type}",
            "disks": [
                {
                    "boot": True,
                    "autoDelete": True,
                    "initializeParams": {"sourceImage": self._image_ref(image_id)},
                }
            ],
            "networkInterfaces": [
                {
                    "network": "global/networks/default",
                    "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}],
                }
            ],
            # No ssh-keys: the guest agent would add the project's (or any) keys as accounts,
            # and the image's hygiene check allows no authorized key beyond this boot's. Project
            # -wide keys are blocked for the same reason. No serviceAccounts: the check
            # instance gets no Google credentials.
            "metadata": {
                "items": [
                    {"key": "user-data", "value": user_data},
                    {"key": "block-project-ssh-keys", "value": "true"},
                ]
            },
            "labels": gce_labels(labels),
        }
        path = f"{self._zone_path()}/instances"
        operation = self._request("POST", path, json=instance)
        try:
            self._wait(operation, f"creating instance {name}")
        except BaseException:
            # launched() destroys only what create_server returned: clean up here (a failed
            # insert leaves nothing; an interrupted wait may leave a booting instance).
            self._forget_instance(name)
            raise
        return name

    def server_address(self, server_id: str) -> str | None:
        instance = self._request("GET", f"{self._zone_path()}/instances/{server_id}")
        status = instance.get("status")
        if status in DEAD:
            raise CloudError(f"{self.title}: instance {server_id} is {status}")
        if status != "RUNNING":
            return None
        configs = [
            config
            for interface in instance.get("networkInterfaces") or []
            for config in interface.get("accessConfigs") or []
        ]
        address = next((c["natIP"] for c in configs if c.get("natIP")), None)
        if address is None:
            raise CloudError(f"{self.title}: instance {server_id} runs without an external IPv4")
        return str(address)

    def delete_server(self, server_id: str) -> None:
        path = f"{self._zone_path()}/instances/{server_id}"
        self._operation("DELETE", path, f"deleting instance {server_id}", ok_missing=True)

    def servers_labelled(self, labels: dict[str, str]) -> list[str]:
        found = self._listing(f"{self._zone_path()}/instances", label_filter(labels))
        return [str(instance["name"]) for instance in found]

    def _forget_instance(self, name: str) -> None:
        # Best effort: if this fails too, the next run's sweep finds it by its labels.
        with contextlib.suppress(Exception):
            self.delete_server(name)

    # --- images ------------------------------------------------------------------------

    def label_image(self, image_id: str, labels: dict[str, str]) -> None:
        self._set_labels(self._image(image_id), labels)

    def publish_image(self, image_id: str, name: str, description: str) -> list[str]:
        """Family and description (images.patch), the published name as a label, the image
        made its family's current one, then shared. Each step is skipped once done, so a
        publish interrupted half-way is completed by running it again."""
        family = self._family(name)
        image = self._image(image_id)
        wanted = {"family": family, "description": description}
        changes = {key: value for key, value in wanted.items() if image.get(key) != value}
        if changes:
            what = f"publishing image {image_id}"
            self._operation(
                "PATCH", self._image_path(image_id), what, json=changes, idempotent=True
            )
        self._set_labels(image, {NAME_LABEL: name})
        self._make_current(image, family)
        members = self._share(image_id)
        shared = [f"{IMAGE_USER} for {', '.join(members)}"] if members else []
        return [f"project {self.project}", f"family {family}", *shared]

    def images_labelled(self, labels: dict[str, str]) -> list[CloudImage]:
        found = self._listing(f"/projects/{self.project}/global/images", label_filter(labels))
        return [_cloud_image(image) for image in found]

    def delete_image(self, image_id: str) -> None:
        path = self._image_path(image_id)
        self._operation("DELETE", path, f"deleting image {image_id}", ok_missing=True)

    def _image(self, image_id: str) -> dict[str, Any]:
        return self._request("GET", self._image_path(image_id))

    def _set_labels(self, image: dict[str, Any], labels: dict[str, str]) -> None:
        """setLabels replaces them all: ours merged into the image's (Packer's stay); the
        fingerprint makes a concurrent change a 412 instead of a silent overwrite."""
        carried = image.get("labels") or {}
        wanted = carried | gce_labels(labels)
        if wanted == carried:
            return
        body = {"labels": wanted, "labelFingerprint": image.get("labelFingerprint", "")}
        path = f"{self._image_path(image['name'])}/setLabels"
        what = f"labelling image {image['name']}"
        self._operation("POST", path, what, json=body, idempotent=True)
        image["labels"] = wanted  # what the next call through this dict must start from

    def _make_current(self, image: dict[str, Any], family: str) -> None:
        """A family resolves to its newest image that is not deprecated: deprecate the
        others in favour of this one (so re-publishing an older image makes it current),
        and undo this one's deprecation if an earlier publish gave it one."""
        name = image["name"]
        if (image.get("deprecated") or {}).get("state", "ACTIVE") != "ACTIVE":
            what = f"undeprecating image {name}"
            self._deprecate(name, {"state": "ACTIVE"}, what)
        replacement = image.get("selfLink") or self._image_ref(name)
        family_filter = f'(family = "{family}") ' + label_filter({"imagefactory": "true"})
        siblings = self._listing(f"/projects/{self.project}/global/images", family_filter)
        for other in siblings:
            deprecation = other.get("deprecated") or {}
            if other["name"] == name or deprecation.get("state", "ACTIVE") != "ACTIVE":
                continue  # already deprecated (or obsolete): left as it is
            status = {"state": "DEPRECATED", "replacement": replacement}
            self._deprecate(other["name"], status, f"deprecating image {other['name']}")

    def _deprecate(self, image_id: str, status: dict[str, str], what: str) -> None:
        path = f"{self._image_path(image_id)}/deprecate"
        self._operation("POST", path, what, json=status, idempotent=True)

    def _share(self, image_id: str) -> list[str]:
        """Grant roles/compute.imageUser to the configured members (added to the policy,
        never removed from it); the etag makes a concurrent change a 409, not a loss."""
        members = list(self.settings.publish_members)
        if not members:
            return []
        path = self._image_path(image_id)
        # Version 3: a policy with conditional bindings comes back whole, so setting it
        # back cannot drop their conditions.
        query = {"optionsRequestedPolicyVersion": 3}
        policy = self._request("GET", f"{path}/getIamPolicy", params=query)
        bindings = policy.setdefault("bindings", [])
        binding = next(
            (b for b in bindings if b.get("role") == IMAGE_USER and not b.get("condition")), None
        )
        if binding is None:
            binding = {"role": IMAGE_USER, "members": []}
            bindings.append(binding)
        missing = [m for m in members if m not in binding.setdefault("members", [])]
        if missing:
            binding["members"] += missing
            body = {"policy": policy}
            self._request("POST", f"{path}/setIamPolicy", json=body, idempotent=True)
        return members

    def _family(self, name: str) -> str:
        """The configured image family, or the published name without its serial ("ubuntu-
        20.04-20261126.1" -> "ubuntu-20-04")."""
        family = self.settings.image_family or (name.rsplit("-", 1)[0].replace(".", "-"))
        if not RESOURCE_NAME.match(family):
            raise ConfigError(f"Google Compute Engine: {family!r} cannot be an image family")
        return family

    def _zone_path(self) -> str:
        return f"/projects/{self.project}/zones/{self.settings.zone}"

    def _image_path(self, image_id: str) -> str:
        return f"/projects/{self.project}/global/images/{image_id}"

    def _image_ref(self, image_id: str) -> str:
        return f"projects/{self.project}/global/images/{image_id}"


# --- shapes ---------------------------------------------------------------------------


def next_page_token(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
    """Compute API listings: ``nextPageToken`` while more items follow."""
    token = body.get("nextPageToken")
    return (path, query | {"pageToken": token}) if token else None


def gce_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels as GCE takes them: values lower-cased, "." as "_"; anything else refused."""
    converted = {key: value.lower().replace(".", "_") for key, value in labels.items()}
    for key, value in converted.items():
        if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
            raise ConfigError(
                f"Google Compute Engine: label {key}={labels[key]!r} cannot be a GCE label"
            )
    return converted


def label_filter(labels: Mapping[str, str]) -> str:
    """A listing filter: one parenthesised expression a label, all of them ANDed."""
    return " ".join(f'(labels.{key} = "{value}")' for key, value in gce_labels(labels).items())


def _cloud_image(image: dict[str, Any]) -> CloudImage:
    labels = image.get("labels") or {}
    # Image names in this factory hold no "_": the label's "_" were all ".".
    name = labels[NAME_LABEL].replace("_", ".") if labels.get(NAME_LABEL) else image["name"]
    return CloudImage(str(image["name"]), name, _utc(image.get("creationTimestamp")), labels)


def _utc(timestamp: str | None) -> str:
    """creationTimestamp is Pacific time with its offset (-07:00 or -08:00): as UTC, so the
    text sorts by time across a daylight-saving change."""
    if not timestamp:
        return ""
    try:
        return datetime.fromisoformat(timestamp).astimezone(UTC).isoformat()
    except ValueError:
        return timestamp
