"""Just enough of Google Compute Engine on 127.0.0.1 for the driver tests: an OAuth token
endpoint for service-account JWT grants, and the Compute API v1's instances, images (labels,
family, deprecation, IAM policy) and operations, in the documented shapes
(cloud.google.com/compute/docs/reference/rest/v1).

The Compute API lives at ``{url}/compute/v1`` (the driver's GCE_API_URL), the token endpoint
at ``{url}/token`` (the key file's token_uri). Mutating calls answer an Operation that is
PENDING, then RUNNING and DONE on the ``polls_until_done``-th GET; instances turn RUNNING
(external IPv4 127.0.0.1) after ``polls_until_running`` GETs. Listings honour ``filter``
expressions ``(labels.<key> = "<value>")`` and ``(family = "<name>")`` and paginate with
``maxResults``/``pageToken``. Stricter than GCE on purpose (unknown fields are a 400), so a
typo fails a test. Errors come in GCE's shape: {"error": {"code", "message", "errors"}}.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .cloud_server import FakeCloud, Handler, Request

COMPUTE = "/compute/v1"
SELF_LINK_ROOT = "https://www.googleapis.com/compute/v1"
PROJECT = "imagefactory-test"
ZONE = "us-central1-a"
CLIENT_EMAIL = "imagefactory@imagefactory-test.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/compute"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # google-auth's "aud", always
PACIFIC = timezone(timedelta(hours=-8))  # GCE's timestamps carry Pacific time
EPOCH = datetime(2026, 11, 1, 8, tzinfo=UTC)
NAME = r"([a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)"
P = rf"{COMPUTE}/projects/([^/]+)"
RESOURCE_NAME = re.compile(f"^{NAME}$")
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
EXPRESSION = re.compile(r'\(\s*([a-z][\w.-]*)\s*=\s*"([^"]*)"\s*\)\s*')
INSTANCE_FIELDS = {"name", "machineType", "disks", "networkInterfaces", "metadata", "labels",
                   "description", "tags", "serviceAccounts", "scheduling"}  # fmt: skip
MEMBER = re.compile(r"^(?:(?:user|group|serviceAccount|domain):\S+|allAuthenticatedUsers)$")
UNAUTHENTICATED = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential."
)

Answer = tuple[Any, ...]  # (status, body) or (status, body, headers)


@dataclass
class GCERequest(Request):
    content_type: str = ""


class Refused(Exception):
    """Raised by handlers: answered in GCE's error shape."""

    def __init__(self, status: int, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@functools.cache
def service_account_private_key() -> rsa.RSAPrivateKey:
    """One throwaway key per test session: generating RSA keys is slow-ish."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class FakeGCE(FakeCloud):
    """``token`` is the prefix of every access token issued (numbered from 1)."""

    project: str = PROJECT
    zone: str = ZONE
    client_email: str = CLIENT_EMAIL
    polls_until_done: int = 2
    polls_until_running: int = 1
    failing_inserts: bool = False  # insert operations end in an error, no instance
    dead_instances: bool = False  # instances end TERMINATED instead of RUNNING
    max_results: int = 500
    tokens: set[str] = field(default_factory=set)  # valid ones
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    handler_errors: list[str] = field(default_factory=list)  # bugs in this fake
    _ticks: Iterator[int] = field(default_factory=itertools.count)
    _serials: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _issued: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _polls: dict[str, int] = field(default_factory=dict)
    _operation_errors: dict[str, dict[str, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        image = rf"{P}/global/images/{NAME}"
        for method, pattern, handler in (
            ("POST", "/token", self._issue_token),
            ("POST", rf"{P}/zones/([^/]+)/instances", self._insert_instance),
            ("GET", rf"{P}/zones/([^/]+)/instances", self._list_instances),
            ("GET", rf"{P}/zones/([^/]+)/instances/{NAME}", self._get_instance),
            ("DELETE", rf"{P}/zones/([^/]+)/instances/{NAME}", self._delete_instance),
            ("GET", rf"{P}/zones/([^/]+)/operations/([^/]+)", self._get_zone_operation),
            ("GET", rf"{P}/global/operations/([^/]+)", self._get_global_operation),
            ("GET", rf"{P}/global/images", self._list_images),
            ("GET", image, self._get_image),
            ("PATCH", image, self._patch_image),
            ("DELETE", image, self._delete_image),
            ("POST", f"{image}/setLabels", self._set_labels),
            ("POST", f"{image}/deprecate", self._deprecate),
            ("GET", f"{image}/getIamPolicy", self._get_policy),
            ("POST", f"{image}/setIamPolicy", self._set_policy),
        ):
            self.route(method, pattern, handler)

    # --- what tests set up and look at ---------------------------------------------------

    def key_file(self, **changes: Any) -> dict[str, Any]:
        """A service-account key, as the console downloads it, pointing at this server."""
        pem = service_account_private_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": pem.decode(),
            "client_email": self.client_email,
            "client_id": "108339541337133713370",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": f"{self.url}/token",
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        } | changes

    def seed_image(
        self, name: str, labels: dict[str, str] | None = None, family: str = "", **extra: Any
    ) -> str:
        """A READY image as Packer's googlecompute builder leaves it (its labels included)."""
        labels = {"imagefactory-state": "built"} | (labels or {})
        self.images[name] = {
            "kind": "compute#image", "id": str(4000000000000000000 + next(self._serials)),
            "creationTimestamp": self._now(), "name": name,
            "description": f"{name} for strongSwan VPN servers", "sourceType": "RAW",
            "status": "READY", "archiveSizeBytes": "1621337344", "diskSizeGb": "10",
            "sourceDisk": f"{SELF_LINK_ROOT}/projects/{self.project}/zones/{self.zone}/"
            f"disks/packer-{name}", "selfLink": self._image_link(name), "labels": labels,
            "labelFingerprint": _fingerprint(labels), "storageLocations": ["us"],
            "architecture": "X86_64",
        } | ({"family": family} if family else {}) | extra  # fmt: skip
        return name

    def seed_instance(self, name: str, labels: dict[str, str]) -> str:
        self.instances[name] = self._new_instance(
            {"name": name, "labels": labels, "machineType": f"zones/{self.zone}/machineTypes/e2"}
        )
        return name

    def revoke_tokens(self) -> None:
        """Every token issued so far stops working (as if expired or revoked)."""
        with self._lock:
            self.tokens.clear()

    def compute(self, path: str = "") -> str:
        """The path of a project resource, as requests carry it."""
        return f"{COMPUTE}/projects/{self.project}{path}"

    # --- requests: form bodies and many tokens ------------------------------------------

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Handlers run one at a time and answer their own errors (Refused)."""

        def guarded(*groups: str, request: GCERequest) -> Answer:
            with self._lock:
                try:
                    return copy.deepcopy(handler(*groups, request=request))
                except Refused as exc:
                    return exc.status, _error(exc.status, str(exc), exc.reason)
                except Exception as exc:  # a bug in the fake: make it visible to the test
                    self.handler_errors.append(f"{method} {pattern}: {exc!r}")
                    return 500, _error(500, "fake handler crashed", "backendError")

        super().route(method, pattern, guarded)

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        content_type = http.headers.get("Content-Type", "")
        body: Any = None
        if content_type.startswith("application/x-www-form-urlencoded"):
            body = {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
        elif raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        request = GCERequest(
            method, parts.path, parse_qs(parts.query), body,
            http.headers.get("Authorization", ""), content_type=content_type,
        )  # fmt: skip
        self.requests.append(request)
        fault = self._fault_for(method, parts.path)
        if fault:
            time.sleep(fault.delay)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            reason = "rateLimitExceeded" if fault.status == 429 else "backendError"
            body = _error(fault.status, f"injected HTTP {fault.status}", reason)
            return self._answer(http, fault.status, body, headers)
        if parts.path != "/token" and request.authorization.removeprefix("Bearer ") not in (
            self.tokens
        ):
            return self._answer(http, 401, _error(401, UNAUTHENTICATED, "required"))
        for route_method, pattern, handler in self._routes:
            match = pattern.match(parts.path)
            if route_method == method and match:
                status, answer, *headers = handler(*match.groups(), request=request)
                return self._answer(http, status, answer, *headers)
        self._answer(http, 404, _error(404, f"Not Found: {method} {parts.path}", "notFound"))

    def error_body(self, code: str, message: str) -> Any:
        return _error(500, message, code)

    # --- OAuth ---------------------------------------------------------------------------

    def _issue_token(self, *, request: GCERequest) -> Answer:
        """RFC 7523: a JWT signed with the service account's key, for an access token."""
        form = request.body if isinstance(request.body, dict) else {}
        if form.get("grant_type") != JWT_GRANT:
            return 400, {"error": "unsupported_grant_type", "error_description": "Invalid grant"}
        claims = self._verified_claims(str(form.get("assertion", "")))
        if claims is None:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        problem = _claims_problem(claims, self.client_email)
        if problem:
            return 400, {"error": "invalid_grant", "error_description": problem}
        token = f"{self.token}{next(self._issued)}"
        self.tokens.add(token)
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    @staticmethod
    def _verified_claims(assertion: str) -> dict[str, Any] | None:
        try:
            header, payload, signature = assertion.split(".")
            if json.loads(_unb64(header)).get("alg") != "RS256":
                return None
            service_account_private_key().public_key().verify(
                _unb64(signature),
                f"{header}.{payload}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
            return json.loads(_unb64(payload))
        except (ValueError, InvalidSignature):
            return None

    # --- instances -----------------------------------------------------------------------

    def _insert_instance(self, project: str, zone: str, *, request: GCERequest) -> Answer:
        self._check_place(project, zone)
        body = request.body
        if not isinstance(body, dict):
            raise Refused(400, "Invalid JSON payload received.")
        for name in sorted(set(body) - INSTANCE_FIELDS):
            raise Refused(400, f'Invalid JSON payload received. Unknown name "{name}"')
        name = str(body.get("name") or "")
        if not RESOURCE_NAME.match(name):
            raise Refused(400, f"Invalid value for field 'resource.name': '{name}'.")
        if name in self.instances:
            raise Refused(409, f"The resource '{self._instance_ref(name)}' already exists",
                          "alreadyExists")  # fmt: skip
        self._check_machine_type(str(body.get("machineType") or ""))
        self._check_disks(body.get("disks"))
        self._check_network(body.get("networkInterfaces"))
        _check_metadata(body.get("metadata"))
        _check_labels(body.get("labels") or {})
        if self.failing_inserts:
            error = {"code": "ZONE_RESOURCE_POOL_EXHAUSTED",
                     "message": f"The zone 'projects/{project}/zones/{zone}' does not have "
                     "enough resources available to fulfill the request."}  # fmt: skip
            return 200, self._operation("insert", self._instance_ref(name), zone, error=error)
        self.instances[name] = self._new_instance(body)
        return 200, self._operation("insert", self._instance_ref(name), zone)

    def _new_instance(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["name"]
        return {
            "kind": "compute#instance", "id": str(7000000000000000000 + next(self._serials)),
            "creationTimestamp": self._now(), "name": name, "status": "PROVISIONING",
            "zone": f"{SELF_LINK_ROOT}/projects/{self.project}/zones/{self.zone}",
            "machineType": f"{SELF_LINK_ROOT}/projects/{self.project}/{body['machineType']}",
            "networkInterfaces": [{
                "kind": "compute#networkInterface", "name": "nic0", "networkIP": "10.128.0.7",
                "network": f"{SELF_LINK_ROOT}/projects/{self.project}/global/networks/default",
                "accessConfigs": [{"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT",
                                   "name": "External NAT", "networkTier": "PREMIUM"}],
            }],
            "disks": copy.deepcopy(body.get("disks") or []),
            "metadata": {"kind": "compute#metadata", "fingerprint": "Fe0l5kxg7Q0=",
                         "items": copy.deepcopy((body.get("metadata") or {}).get("items", []))},
            "labels": dict(body.get("labels") or {}),
            "labelFingerprint": _fingerprint(body.get("labels") or {}),
            "selfLink": f"{SELF_LINK_ROOT}/{self._instance_ref(name)}",
        }  # fmt: skip

    def _get_instance(self, project: str, zone: str, name: str, *, request: GCERequest) -> Answer:
        instance = self._instance(project, zone, name)
        self._polls[name] = polls = self._polls.get(name, 0) + 1
        if instance["status"] in ("PROVISIONING", "STAGING"):
            if polls > self.polls_until_running and self.dead_instances:
                instance["status"] = "TERMINATED"
            elif polls > self.polls_until_running:
                instance["status"] = "RUNNING"
                instance["networkInterfaces"][0]["accessConfigs"][0]["natIP"] = "127.0.0.1"
            else:
                instance["status"] = "STAGING"
        return 200, instance

    def _delete_instance(
        self, project: str, zone: str, name: str, *, request: GCERequest
    ) -> Answer:
        self._instance(project, zone, name)
        del self.instances[name]
        return 200, self._operation("delete", self._instance_ref(name), zone)

    def _list_instances(self, project: str, zone: str, *, request: GCERequest) -> Answer:
        self._check_place(project, zone)
        found = sorted(self.instances.values(), key=lambda i: i["name"])
        return 200, self._page(request, "compute#instanceList", found)

    def _instance(self, project: str, zone: str, name: str) -> dict[str, Any]:
        self._check_place(project, zone)
        if name not in self.instances:
            raise Refused(404, f"The resource '{self._instance_ref(name)}' was not found",
                          "notFound")  # fmt: skip
        return self.instances[name]

    def _check_machine_type(self, machine_type: str) -> None:
        if not re.fullmatch(rf"zones/{self.zone}/machineTypes/[a-z0-9-]+", machine_type):
            raise Refused(400, f"Invalid value for field 'resource.machineType': "
                          f"'{machine_type}'. Invalid machine type.")  # fmt: skip

    def _check_disks(self, disks: Any) -> None:
        if not (isinstance(disks, list) and len(disks) == 1 and disks[0].get("boot") is True):
            raise Refused(400, "Invalid value for field 'resource.disks': one boot disk needed.")
        source = str((disks[0].get("initializeParams") or {}).get("sourceImage") or "")
        name = source.removeprefix(f"{SELF_LINK_ROOT}/").removeprefix(
            f"projects/{self.project}/global/images/"
        )
        if name not in self.images:
            raise Refused(404, f"The resource '{source}' was not found", "notFound")

    def _check_network(self, interfaces: Any) -> None:
        if not isinstance(interfaces, list) or len(interfaces) != 1:
            raise Refused(400, "Invalid value for field 'resource.networkInterfaces'.")
        [interface] = interfaces
        if interface.get("network") != "global/networks/default":
            raise Refused(404, f"The resource '{interface.get('network')}' was not found")
        for config in interface.get("accessConfigs") or []:
            if config.get("type") != "ONE_TO_ONE_NAT":
                raise Refused(400, "Invalid value for field "
                              "'resource.networkInterfaces[0].accessConfigs[0].type'.")  # fmt: skip

    # --- images --------------------------------------------------------------------------

    def _list_images(self, project: str, *, request: GCERequest) -> Answer:
        self._check_project(project)
        found = sorted(self.images.values(), key=lambda i: i["name"])
        return 200, self._page(request, "compute#imageList", found)

    def _get_image(self, project: str, name: str, *, request: GCERequest) -> Answer:
        return 200, self._image(project, name)

    def _patch_image(self, project: str, name: str, *, request: GCERequest) -> Answer:
        image = self._image(project, name)
        body = request.body if isinstance(request.body, dict) else {}
        for key in sorted(set(body) - {"family", "description", "deprecated"}):
            raise Refused(400, f"Invalid value for field 'resource.{key}': only family, "
                          "description and deprecation status can be patched.")  # fmt: skip
        family = body.get("family")
        if family is not None and not RESOURCE_NAME.match(str(family)):
            raise Refused(400, f"Invalid value for field 'resource.family': '{family}'.")
        image.update(body)
        return 200, self._operation("patch", self._image_ref(name))

    def _delete_image(self, project: str, name: str, *, request: GCERequest) -> Answer:
        self._image(project, name)
        del self.images[name]
        self.policies.pop(name, None)
        return 200, self._operation("delete", self._image_ref(name))

    def _set_labels(self, project: str, name: str, *, request: GCERequest) -> Answer:
        image = self._image(project, name)
        body = request.body if isinstance(request.body, dict) else {}
        if body.get("labelFingerprint") != image["labelFingerprint"]:
            raise Refused(412, "Labels fingerprint either invalid or resource labels have "
                          "changed", "conditionNotMet")  # fmt: skip
        labels = body.get("labels") or {}
        _check_labels(labels)
        image.update(labels=dict(labels), labelFingerprint=_fingerprint(labels))
        return 200, self._operation("setLabels", self._image_ref(name))

    def _deprecate(self, project: str, name: str, *, request: GCERequest) -> Answer:
        image = self._image(project, name)
        body = request.body if isinstance(request.body, dict) else {}
        state = body.get("state")
        if state not in ("ACTIVE", "DEPRECATED", "OBSOLETE", "DELETED"):
            raise Refused(400, f"Invalid value for field 'resource.state': '{state}'.")
        replacement = body.get("replacement")
        if replacement and str(replacement).rsplit("/", 1)[-1] not in self.images:
            raise Refused(400, f"Invalid value for field 'resource.replacement': "
                          f"'{replacement}'.")  # fmt: skip
        if state == "ACTIVE":
            image.pop("deprecated", None)
        else:
            image["deprecated"] = {"state": state} | (
                {"replacement": replacement} if replacement else {}
            )
        return 200, self._operation("deprecate", self._image_ref(name))

    def _get_policy(self, project: str, name: str, *, request: GCERequest) -> Answer:
        self._image(project, name)
        return 200, self.policies.get(name, {"version": 1, "etag": "ACAB"})

    def _set_policy(self, project: str, name: str, *, request: GCERequest) -> Answer:
        self._image(project, name)
        policy = (request.body or {}).get("policy") if isinstance(request.body, dict) else None
        if not isinstance(policy, dict):
            raise Refused(400, "Invalid JSON payload received. 'policy' is required.")
        current = self.policies.get(name, {"version": 1, "etag": "ACAB"})
        if policy.get("etag") != current["etag"]:
            raise Refused(409, "There were concurrent policy changes. Please retry the whole "
                          "read-modify-write with exponential backoff.", "conflict")  # fmt: skip
        for binding in policy.get("bindings") or []:
            if not str(binding.get("role", "")).startswith("roles/"):
                raise Refused(400, f"Role {binding.get('role')} is not supported.")
            for member in binding.get("members") or []:
                if not MEMBER.match(member):
                    raise Refused(400, f"Invalid principal: {member}", "badRequest")
        etag = base64.b64encode(f"etag-{next(self._serials)}".encode()).decode()
        self.policies[name] = policy | {"etag": etag, "version": 1}
        return 200, self.policies[name]

    def _image(self, project: str, name: str) -> dict[str, Any]:
        self._check_project(project)
        if name not in self.images:
            raise Refused(404, f"The resource '{self._image_ref(name)}' was not found",
                          "notFound")  # fmt: skip
        return self.images[name]

    # --- operations ----------------------------------------------------------------------

    def _operation(
        self, kind: str, target: str, zone: str = "", error: dict[str, str] | None = None
    ) -> dict[str, Any]:
        name = f"operation-{1764000000000 + next(self._serials)}-{kind.lower()}"
        where = f"projects/{self.project}/" + (f"zones/{zone}" if zone else "global")
        operation = {
            "kind": "compute#operation",
            "id": str(2000000000000000000 + next(self._serials)),
            "name": name,
            "operationType": kind,
            "targetLink": f"{SELF_LINK_ROOT}/{target}",
            "user": self.client_email,
            "status": "PENDING",
            "progress": 0,
            "insertTime": self._now(),
            "selfLink": f"{SELF_LINK_ROOT}/{where}/operations/{name}",
        } | ({"zone": f"{SELF_LINK_ROOT}/projects/{self.project}/zones/{zone}"} if zone else {})
        self.operations[name] = operation
        if error:
            self._operation_errors[name] = error
        if self.polls_until_done == 0:
            self._finish(operation)
        return operation

    def _get_zone_operation(
        self, project: str, zone: str, name: str, *, request: GCERequest
    ) -> Answer:
        self._check_place(project, zone)
        return self._poll_operation(name, zonal=True)

    def _get_global_operation(self, project: str, name: str, *, request: GCERequest) -> Answer:
        self._check_project(project)
        return self._poll_operation(name, zonal=False)

    def _poll_operation(self, name: str, zonal: bool) -> Answer:
        operation = self.operations.get(name)
        if operation is None or bool(operation.get("zone")) != zonal:
            raise Refused(404, f"The resource 'operations/{name}' was not found", "notFound")
        self._polls[name] = polls = self._polls.get(name, 0) + 1
        if operation["status"] != "DONE":
            operation.update(status="RUNNING", progress=50, startTime=self._now())
            if polls >= self.polls_until_done:
                self._finish(operation)
        return 200, operation

    def _finish(self, operation: dict[str, Any]) -> None:
        operation.update(status="DONE", progress=100, endTime=self._now())
        error = self._operation_errors.get(operation["name"])
        if error:
            operation.update(error={"errors": [error]}, httpErrorStatusCode=503,
                             httpErrorMessage="SERVICE UNAVAILABLE")  # fmt: skip

    # --- plumbing ------------------------------------------------------------------------

    def _page(self, request: GCERequest, kind: str, items: list[dict]) -> dict[str, Any]:
        """Filtered, then one page of at most maxResults; nextPageToken while more follow."""
        query = {key: values[-1] for key, values in request.query.items()}
        matches = _matcher(query.get("filter", ""))
        found = [item for item in items if matches(item)]
        try:
            limit = min(int(query.get("maxResults", self.max_results)), self.max_results)
            start = int(query["pageToken"].removeprefix("page-")) if "pageToken" in query else 0
        except ValueError:
            raise Refused(400, "Invalid value for maxResults or pageToken.") from None
        if limit < 0:
            raise Refused(400, "Invalid value for field 'maxResults'.")
        chunk = found[start : start + limit]
        body: dict[str, Any] = {"kind": kind, "id": f"projects/{self.project}", "selfLink": "x"}
        if chunk:  # GCE leaves "items" out of an empty page
            body["items"] = chunk
        if start + limit < len(found):
            body["nextPageToken"] = f"page-{start + limit}"
        return body

    def _check_place(self, project: str, zone: str) -> None:
        self._check_project(project)
        if zone != self.zone:
            raise Refused(400, f"Invalid value for field 'zone': '{zone}'. Unknown zone.")

    def _check_project(self, project: str) -> None:
        if project != self.project:
            raise Refused(403, f"Required 'compute.instances.list' permission for "
                          f"'projects/{project}'", "forbidden")  # fmt: skip

    def _instance_ref(self, name: str) -> str:
        return f"projects/{self.project}/zones/{self.zone}/instances/{name}"

    def _image_ref(self, name: str) -> str:
        return f"projects/{self.project}/global/images/{name}"

    def _image_link(self, name: str) -> str:
        return f"{SELF_LINK_ROOT}/{self._image_ref(name)}"

    def _now(self) -> str:
        """A clock that moves a minute per call, in Pacific time as GCE writes it."""
        moment = (EPOCH + timedelta(minutes=next(self._ticks))).astimezone(PACIFIC)
        return moment.isoformat(timespec="milliseconds")


def _error(status: int, message: str, reason: str) -> dict[str, Any]:
    errors = [{"message": message, "domain": "global", "reason": reason}]
    return {"error": {"code": status, "message": message, "errors": errors}}


def _claims_problem(claims: dict[str, Any], client_email: str) -> str:
    if claims.get("iss") != client_email:
        return "Invalid JWT: iss is not the service account"
    if claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
        return "Invalid JWT: aud is not the token endpoint"
    if SCOPE not in str(claims.get("scope", "")).split():
        return "Invalid JWT: the compute scope is missing"
    if not claims.get("iat", 0) <= time.time() + 60 < claims.get("exp", 0) + 60:
        return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe."
    return ""


def _check_metadata(metadata: Any) -> None:
    items = (metadata or {}).get("items") or []
    keys = [item.get("key") for item in items]
    if len(set(keys)) != len(keys) or not all(
        isinstance(item.get("value"), str) and re.fullmatch(r"[a-zA-Z0-9-_]{1,128}", k or "")
        for item, k in zip(items, keys, strict=True)
    ):
        raise Refused(400, "Invalid value for field 'resource.metadata'.")
    if sum(len(item["value"]) for item in items) > 512 * 1024:
        raise Refused(400, "Metadata total size exceeds the limit of 512 KB.")


def _check_labels(labels: Any) -> None:
    if not isinstance(labels, dict) or len(labels) > 64:
        raise Refused(400, "Invalid value for field 'labels'.")
    for key, value in labels.items():
        if not (LABEL_KEY.match(key) and isinstance(value, str) and LABEL_VALUE.match(value)):
            raise Refused(400, f"Invalid value for field 'labels.{key}': '{value}'.")


def _matcher(text: str) -> Any:
    """A filter of parenthesised ``field = "value"`` expressions, all of which must hold."""
    expressions, position = [], 0
    text = text.strip()
    while position < len(text):
        match = EXPRESSION.match(text, position)
        if not match:
            raise Refused(400, f"Invalid value for field 'filter': '{text}'. Invalid list "
                          "filter expression.")  # fmt: skip
        expressions.append(match.groups())
        position = match.end()

    def matches(item: dict[str, Any]) -> bool:
        for path, value in expressions:
            head, _, key = path.partition(".")
            actual = (item.get(head) or {}).get(key) if key else item.get(head)
            if actual != value:
                return False
        return True

    return matches


def _fingerprint(labels: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).digest()
    return base64.b64encode(digest[:8]).decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
