"""The one HTTP mechanism every cloud API module uses (requests): a session with timeouts,
retries with backoff that honour Retry-After on 429 and retry 5xx, pagination, call counting,
and errors that name the call but never the token."""

from __future__ import annotations

import email.utils
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import NewConnectionError

from .errors import ConfigError, FactoryError

# Only requests that cannot have taken effect (429: refused; connect errors: never arrived)
# are retried for non-idempotent methods: a retried POST must not create a second server.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class CloudAPIError(FactoryError):
    """A cloud API refused a call or stayed unreachable after retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CallStats:
    calls: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    seconds: float = 0.0
    by_call: dict[str, int] = field(default_factory=dict)  # "GET /v2/droplets" -> count


@dataclass
class APIClient:
    title: str  # "DigitalOcean API": how errors name the service
    base_url: str
    # Carries the token: never logged, put in a message or shown in a repr.
    headers: Mapping[str, str] = field(repr=False)
    timeout: tuple[float, float] = (10.0, 60.0)  # connect, read
    retries: int = 5
    backoff: float = 1.0  # 1, 2, 4, 8 … s; a Retry-After header wins
    max_wait: float = 300.0  # never sleep longer than this for one Retry-After
    sleep: Callable[[float], None] = time.sleep
    stats: CallStats = field(default_factory=CallStats)
    last_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{self.title}: base URL {self.base_url!r} is not http(s)")
        self.base_url = self.base_url.rstrip("/")
        for name, value in self.headers.items():
            # requests would quote a malformed header value (the token) in its own error.
            if not value or any(
                c.isspace() or not c.isprintable() for c in value.split(" ", 1)[-1]
            ):
                raise ConfigError(f"{self.title}: the {name} header (API token) is malformed")
        self._http = requests.Session()
        self._http.headers.update({"User-Agent": "imagefactory", **self.headers})
        # urllib3 would log retried URLs; we log nothing with credentials in it.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        data: str | bytes | None = None,
        content_type: str = "",
        ok_missing: bool = False,
        idempotent: bool | None = None,
    ) -> dict[str, Any]:
        """One call; JSON body back ({} for an empty one). ``json`` or ``data`` (with its
        ``content_type``, e.g. Scaleway's text/plain user data or a JSON patch) is the body.
        ``ok_missing``: 404 gives {}. ``idempotent``: a POST that is safe to repeat (e.g.
        setting protection) is retried like a GET; by default only the HTTP method decides.
        The answer's headers are in ``last_headers`` (Keystone returns its token there)."""
        payload: dict[str, Any] = {"json": json}
        if data is not None:
            payload = {"data": data, "headers": {"Content-Type": content_type or "text/plain"}}
        repeatable = method in IDEMPOTENT if idempotent is None else idempotent
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        if not url.startswith(f"{self.base_url}/"):
            # A next-page link elsewhere would carry our token to another host.
            raise CloudAPIError(f"{self.title}: refusing to call {urlsplit(url).netloc}")
        call = f"{method} {_endpoint(url, self.base_url)}"
        for attempt in range(self.retries + 1):
            response = self._send(method, url, call, payload, params, attempt, repeatable)
            if response is None:
                continue
            self.last_headers = dict(response.headers)
            if response.status_code == 404 and ok_missing:
                return {}
            retryable = response.status_code == 429 or repeatable
            if response.status_code in RETRY_STATUS and retryable and attempt < self.retries:
                self._wait(attempt, _told_wait(response.headers))
                continue
            if response.status_code >= 400:
                raise CloudAPIError(
                    f"{self.title}: {call}: HTTP {response.status_code}: {_message(response)}",
                    response.status_code,
                )
            return _json(response, self.title, call)
        raise CloudAPIError(f"{self.title}: {call}: no answer after {self.retries + 1} attempts")

    def _send(
        self,
        method: str,
        url: str,
        call: str,
        payload: dict[str, Any],
        params: Mapping[str, Any] | None,
        attempt: int,
        repeatable: bool,
    ) -> requests.Response | None:
        """The response, or None when the attempt failed in a way worth another try."""
        self.stats.calls += 1
        key = _stats_key(call)
        self.stats.by_call[key] = self.stats.by_call.get(key, 0) + 1
        self.stats.retries += attempt > 0
        started = time.monotonic()
        try:
            return self._http.request(method, url, params=params, timeout=self.timeout, **payload)
        except (requests.ConnectionError, requests.Timeout) as exc:
            # Only a connection that was never made proves the call had no effect; a read
            # timeout or a dropped connection after sending may have created something.
            reason = getattr(exc.args[0], "reason", None) if exc.args else None
            never_arrived = isinstance(exc, requests.ConnectTimeout) or isinstance(
                reason, NewConnectionError
            )
            if attempt < self.retries and (repeatable or never_arrived):
                self._wait(attempt, None)
                return None
            raise CloudAPIError(f"{self.title}: {call}: {type(exc).__name__}") from None
        finally:
            self.stats.seconds += time.monotonic() - started

    def _wait(self, attempt: int, told: float | None) -> None:
        delay = told if told is not None else self.backoff * 2**attempt
        self.sleep(min(self.max_wait, max(0.0, delay)))

    def paginate(
        self, path: str, key: str, params: Mapping[str, Any] | None = None, *, style: Pager
    ) -> Iterator[dict[str, Any]]:
        """Every item of a listing, following the API's own pagination."""
        query: dict[str, Any] | None = dict(params or {})
        url = path
        while True:
            body = self.request("GET", url, params=query)
            yield from body.get(key, [])
            following = style(body, path, dict(query or {}))
            if following is None:
                return
            url, query = following


# How an API points at the next page: (url or path, params) or None on the last page.
Page = tuple[str, dict[str, Any] | None]
Pager = Callable[[dict[str, Any], str, dict[str, Any]], Page | None]


def links_next(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
    """DigitalOcean: ``links.pages.next`` is the absolute URL of the next page."""
    following = body.get("links", {}).get("pages", {}).get("next")
    return (following, None) if following else None


def meta_next_page(body: dict[str, Any], path: str, query: dict[str, Any]) -> Page | None:
    """Hetzner Cloud: ``meta.pagination.next_page`` is the next page number (null at the end)."""
    page = body.get("meta", {}).get("pagination", {}).get("next_page")
    return (path, query | {"page": page}) if page else None


def _json(response: requests.Response, title: str, call: str) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError:  # e.g. a proxy's HTML page
        status = response.status_code
        raise CloudAPIError(f"{title}: {call}: HTTP {status}: not JSON", status) from None


def _told_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: Retry-After, or Hetzner's RateLimit-Reset (a Unix
    time at which the bucket refills)."""
    told = _retry_after_seconds(headers.get("Retry-After"))
    if told is None and headers.get("RateLimit-Reset", "").isdigit():
        told = int(headers["RateLimit-Reset"]) - time.time()
    return told


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _endpoint(url: str, base_url: str) -> str:
    """The call as it may be shown: path only, no host, no query (tokens can live there)."""
    path = url[len(base_url) :] if url.startswith(base_url) else urlsplit(url).path
    return path.split("?", 1)[0] or "/"


def _stats_key(call: str) -> str:
    """Numeric ids as {id}, so the counts add up per endpoint."""
    return re.sub(
        r"/(\d+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?=/|$)", "/{id}", call
    )


def _message(response: requests.Response) -> str:
    """The API's own error message (both DO and Hetzner put one in the JSON body)."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or "no details"
    if isinstance(body, dict) and len(body) == 1:
        # Nova wraps it: {"badRequest": {"message": ..., "code": 400}}.
        [inner] = body.values()
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)[:300]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:300]
    return response.reason or "no details"
