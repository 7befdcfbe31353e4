"""APIClient, the one HTTP mechanism of the cloud drivers, against a minimal FakeCloud:
retries (Retry-After, backoff, caps, which methods), pagination styles, errors, counting."""

from __future__ import annotations

import contextlib
import email.utils
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from imagefactory.cloudapi import APIClient, CloudAPIError, links_next, meta_next_page
from imagefactory.errors import ConfigError
from tests.fakes.cloud_server import FakeCloud, Fault

TOKEN = "tok-" + "c10udc10ud" * 4
THINGS = [{"id": n} for n in range(1, 8)]


def paged(query: dict[str, list[str]]) -> tuple[int, list[dict[str, Any]], bool]:
    per_page = int(query.get("per_page", ["3"])[0])
    page = int(query.get("page", ["1"])[0])
    return page, THINGS[(page - 1) * per_page : page * per_page], page * per_page < len(THINGS)


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    fake = FakeCloud(token=TOKEN)
    created: list[Any] = []

    def links(*, query: dict, body: Any) -> tuple[int, Any]:
        page, items, more = paged(query)
        following = f"{fake.url}/v2/things?page={page + 1}&per_page=3&tag_name=x"
        return 200, {"things": items, "links": {"pages": {"next": following}} if more else {}}

    def meta(*, query: dict, body: Any) -> tuple[int, Any]:
        page, items, more = paged(query)
        pagination = {"page": page, "next_page": page + 1 if more else None}
        return 200, {"servers": items, "meta": {"pagination": pagination}}

    def create(*, query: dict, body: Any) -> tuple[int, Any]:
        created.append(body)
        return 201, {"thing": {"id": len(created)}}

    fake.route("GET", "/v2/things", links)
    fake.route("GET", "/v1/servers", meta)
    fake.route("GET", "/v2/things/(\\d+)", lambda n, **_: (200, {"thing": {"id": int(n)}}))
    fake.route("POST", "/v2/things", create)
    fake.route("PUT", "/v2/things/(\\d+)", lambda n, **_: (200, {"thing": {"id": int(n)}}))
    fake.route("DELETE", "/v2/things/(\\d+)", lambda n, **_: (204, None))
    fake.route("GET", "/v1/hetzner", lambda **_: (422, {"error": {"message": "name taken"}}))
    fake.url = fake.start()
    fake.created = created
    yield fake
    wake_and_stop(fake)


def wake_and_stop(fake: FakeCloud) -> None:
    """serve_forever looks for a shutdown every 0.5 s; connections wake it at once."""
    stopped = threading.Event()

    def wake() -> None:
        while not stopped.wait(0.01):
            with contextlib.suppress(OSError):
                socket.create_connection(fake._server.server_address, timeout=1).close()

    threading.Thread(target=wake, daemon=True).start()
    try:
        fake.stop()
    finally:
        stopped.set()


@pytest.fixture
def sleeps() -> list[float]:
    return []


def client(url: str, sleeps: list[float], **options: Any) -> APIClient:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return APIClient("Test API", url, headers, sleep=sleeps.append, **options)


@pytest.fixture
def api(cloud: FakeCloud, sleeps: list[float]) -> APIClient:
    return client(cloud.url, sleeps, timeout=(2, 5))


# --- retries --------------------------------------------------------------------------


def test_retry_after_seconds(cloud: FakeCloud, api: APIClient, sleeps: list[float]) -> None:
    cloud.faults.append(Fault(429, retry_after="3"))
    assert api.request("GET", "/v2/things/1") == {"thing": {"id": 1}}
    assert sleeps == [3.0]


def test_retry_after_http_date(cloud: FakeCloud, api: APIClient, sleeps: list[float]) -> None:
    cloud.faults.append(
        Fault(429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True))
    )
    api.request("GET", "/v2/things/1")
    [slept] = sleeps
    assert 28.0 <= slept <= 30.0


@pytest.mark.parametrize("told", [None, "soon", email.utils.formatdate(0, usegmt=True)])
def test_exponential_backoff(cloud: FakeCloud, sleeps: list[float], told: str | None) -> None:
    api = client(cloud.url, sleeps, backoff=0.25)
    cloud.faults += [Fault(503, retry_after=told) for _ in range(4)]
    api.request("GET", "/v2/things/1")
    # No usable Retry-After: 1, 2, 4, 8 × backoff; a date in the past means "now".
    assert sleeps == ([0.0] * 4 if told and "1970" in told else [0.25, 0.5, 1.0, 2.0])


def test_max_wait_caps_retry_after(cloud: FakeCloud, sleeps: list[float]) -> None:
    api = client(cloud.url, sleeps, max_wait=60)
    cloud.faults.append(Fault(429, retry_after="86400"))
    api.request("GET", "/v2/things/1")
    assert sleeps == [60]


def test_retries_exhausted(cloud: FakeCloud, sleeps: list[float]) -> None:
    api = client(cloud.url, sleeps, retries=2)
    cloud.faults += [Fault(503) for _ in range(5)]
    with pytest.raises(CloudAPIError) as failed:
        api.request("GET", "/v2/things/1")
    assert str(failed.value) == "Test API: GET /v2/things/1: HTTP 503: injected HTTP 503"
    assert failed.value.status == 503
    assert len(cloud.requests) == 3 and len(sleeps) == 2


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_idempotent_retried_on_5xx(
    cloud: FakeCloud, api: APIClient, sleeps: list[float], method: str
) -> None:
    cloud.faults += [Fault(500), Fault(502)]
    api.request(method, "/v2/things/4")
    assert [r.method for r in cloud.requests] == [method] * 3
    assert sleeps == [1.0, 2.0]


def test_post_not_retried_on_5xx(cloud: FakeCloud, api: APIClient, sleeps: list[float]) -> None:
    cloud.faults.append(Fault(500, method="POST"))
    with pytest.raises(CloudAPIError, match=r"^Test API: POST /v2/things: HTTP 500"):
        api.request("POST", "/v2/things", json={"name": "a"})
    assert len(cloud.requests) == 1 and sleeps == []


def test_post_retried_on_429(cloud: FakeCloud, api: APIClient, sleeps: list[float]) -> None:
    cloud.faults.append(Fault(429, method="POST"))
    assert api.request("POST", "/v2/things", json={"name": "a"}) == {"thing": {"id": 1}}
    assert cloud.created == [{"name": "a"}]
    assert sleeps == [1.0]


def test_get_retried_after_read_timeout(cloud: FakeCloud, sleeps: list[float]) -> None:
    api = client(cloud.url, sleeps, timeout=(1, 0.3))
    cloud.faults.append(Fault(200, delay=0.6))
    assert api.request("GET", "/v2/things/2") == {"thing": {"id": 2}}
    assert sleeps == [1.0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connection_refused(sleeps: list[float], method: str) -> None:
    api = client(f"http://127.0.0.1:{closed_port()}", sleeps, retries=2)
    with pytest.raises(CloudAPIError) as failed:
        api.request(method, "/v2/things", json={} if method == "POST" else None)
    # Refused: the request never arrived, so even a POST may be tried again.
    assert str(failed.value) == f"Test API: {method} /v2/things: ConnectionError"
    assert sleeps == [1.0, 2.0]
    assert api.stats.calls == 3


def test_post_not_repeated_when_dropped_after_sending(sleeps: list[float]) -> None:
    received: list[bytes] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def read_and_hang_up() -> None:
            for _ in range(2):
                connection, _ = server.accept()
                with connection:
                    received.append(connection.recv(65536))

        thread = threading.Thread(target=read_and_hang_up, daemon=True)
        thread.start()
        api = client(f"http://127.0.0.1:{server.getsockname()[1]}", sleeps, retries=1)
        with pytest.raises(CloudAPIError):
            api.request("POST", "/v2/things", json={"name": "a"})
        # An empty connection of our own lets the reader finish: the client's would carry bytes.
        socket.create_connection(server.getsockname(), timeout=1).close()
        thread.join(timeout=5)
    assert [bool(r) for r in received] == [True, False]


# --- pagination -----------------------------------------------------------------------


def test_pagination_links_next(cloud: FakeCloud, api: APIClient) -> None:
    items = list(api.paginate("/v2/things", "things", {"per_page": 3}, style=links_next))
    assert items == THINGS
    assert [r.query.get("page") for r in cloud.requests] == [None, ["2"], ["3"]]
    assert api.stats.by_call == {"GET /v2/things": 3}


def test_pagination_meta_next_page(cloud: FakeCloud, api: APIClient) -> None:
    query = {"per_page": 3, "label_selector": "imagefactory=true"}
    items = list(api.paginate("/v1/servers", "servers", query, style=meta_next_page))
    assert items == THINGS
    assert [r.query for r in cloud.requests] == [
        {"per_page": ["3"], "label_selector": ["imagefactory=true"]},
        {"per_page": ["3"], "label_selector": ["imagefactory=true"], "page": ["2"]},
        {"per_page": ["3"], "label_selector": ["imagefactory=true"], "page": ["3"]},
    ]


def test_pagination_keeps_the_token_on_its_host(cloud: FakeCloud, sleeps: list[float]) -> None:
    elsewhere = FakeCloud(token="other")
    elsewhere.route("GET", "/v2/things", lambda **_: (200, {"things": []}))
    url = elsewhere.start()
    try:
        cloud.route(
            "GET",
            "/v2/trap",
            lambda **_: (200, {"things": [], "links": {"pages": {"next": f"{url}/v2/things"}}}),
        )
        api = client(cloud.url, sleeps)
        with contextlib.suppress(CloudAPIError):
            list(api.paginate("/v2/trap", "things", style=links_next))
    finally:
        wake_and_stop(elsewhere)
    assert all(TOKEN not in r.authorization for r in elsewhere.requests)


# --- answers and errors ---------------------------------------------------------------


def test_ok_missing(cloud: FakeCloud, api: APIClient) -> None:
    assert api.request("GET", "/v2/nothing", ok_missing=True) == {}
    with pytest.raises(CloudAPIError) as missing:
        api.request("GET", "/v2/nothing")
    assert str(missing.value) == (
        "Test API: GET /v2/nothing: HTTP 404: The resource could not be found."
    )
    assert missing.value.status == 404


def test_empty_body(cloud: FakeCloud, api: APIClient) -> None:
    assert api.request("DELETE", "/v2/things/3") == {}


def test_error_message_from_the_body(cloud: FakeCloud, api: APIClient) -> None:
    with pytest.raises(CloudAPIError, match=r"GET /v1/hetzner: HTTP 422: name taken$"):
        api.request("GET", "/v1/hetzner")  # Hetzner: {"error": {"message": ...}}
    refused = APIClient("Test API", cloud.url, {"Authorization": "Bearer wrong-token"})
    with pytest.raises(CloudAPIError) as failed:
        refused.request("GET", "/v2/things/1")  # DigitalOcean: {"message": ...}
    assert str(failed.value) == "Test API: GET /v2/things/1: HTTP 401: Unable to authenticate"
    assert "wrong-token" not in str(failed.value)


def test_query_stays_out_of_messages(cloud: FakeCloud, api: APIClient) -> None:
    with pytest.raises(CloudAPIError) as failed:
        api.request("GET", f"{cloud.url}/v2/nothing?secret=s3cr3t")
    assert "s3cr3t" not in str(failed.value) and "127.0.0.1" not in str(failed.value)


def test_repr_hides_the_token(api: APIClient) -> None:
    assert TOKEN not in repr(api)


def test_non_json_success_is_an_api_error(cloud: FakeCloud, api: APIClient) -> None:
    cloud.route("GET", "/v2/html", lambda **_: (200, "<html>"))  # JSON-encoded: still JSON
    cloud._answer = html_answer(cloud._answer)
    with pytest.raises(CloudAPIError):
        api.request("GET", "/v2/html")


def html_answer(answer):
    def send(http, status, body, headers=None):
        if body != "<html>":
            return answer(http, status, body, headers)
        http.send_response(status)
        http.send_header("Content-Type", "text/html")
        http.send_header("Content-Length", "6")
        http.end_headers()
        http.wfile.write(b"<html>")

    return send


def test_base_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="is not http"):
        APIClient("Test API", "ftp://example.com", {})


# --- counting -------------------------------------------------------------------------


def test_stats(cloud: FakeCloud, api: APIClient) -> None:
    cloud.faults.append(Fault(429, path="/v2/things/1"))
    api.request("GET", "/v2/things/1")
    api.request("GET", "/v2/things/2", params={"token": "x"})
    api.request("POST", "/v2/things", json={})
    assert (api.stats.calls, api.stats.retries) == (4, 1)
    assert api.stats.by_call == {"GET /v2/things/{id}": 3, "POST /v2/things": 1}
    assert api.stats.seconds > 0
