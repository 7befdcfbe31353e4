"""A local HTTP server on 127.0.0.1 that speaks a cloud API's JSON shapes, for tests.

Subclass ``FakeCloud`` and register handlers with ``route(method, pattern)``; a handler gets
the match groups, the query and the JSON body and returns (status, body). Every request is
logged (method, path, query, body, Authorization header) so tests can count calls and look
for leaked tokens; ``faults`` injects answers ahead of the real handler: a status code with
an optional Retry-After, or a delay longer than the client's timeout.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Handler = Callable[..., tuple[int, Any]]


@dataclass
class Fault:
    status: int = 500
    retry_after: str | None = None
    delay: float = 0.0  # seconds to sleep before answering (a hung endpoint)
    method: str | None = None  # only for this method (default: any)
    path: str | None = None  # only for paths starting with this (default: any)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    authorization: str


@dataclass
class FakeCloud:
    token: str
    requests: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _routes: list[tuple[str, re.Pattern[str], Handler]] = field(default_factory=list)
    url: str = ""

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(f"^{pattern}$"), handler))

    def start(self) -> str:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                cloud._serve(self, "GET")

            def do_POST(self) -> None:
                cloud._serve(self, "POST")

            def do_PUT(self) -> None:
                cloud._serve(self, "PUT")

            def do_PATCH(self) -> None:
                cloud._serve(self, "PATCH")

            def do_DELETE(self) -> None:
                cloud._serve(self, "DELETE")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        """Shut down without waiting out serve_forever's poll: connections wake its select()
        until it has seen the shutdown request."""
        stopper = threading.Thread(target=self._shutdown)
        stopper.start()
        while stopper.is_alive():
            with contextlib.suppress(OSError):
                socket.create_connection(self._server.server_address, timeout=0.1).close()
            stopper.join(0.01)

    def _shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self, method: str | None = None, prefix: str = "") -> list[Request]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and r.path.startswith(prefix)
        ]

    def _serve(self, http: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(http.path)
        length = int(http.headers.get("Content-Length") or 0)
        raw = http.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        auth = http.headers.get("Authorization", "")
        self.requests.append(Request(method, parts.path, parse_qs(parts.query), body, auth))
        fault = self._fault_for(method, parts.path)
        if fault:
            time.sleep(fault.delay)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = self.error_body("fault", f"injected HTTP {fault.status}")
            return self._answer(http, fault.status, body, headers)
        if auth != f"Bearer {self.token}":
            return self._answer(
                http, 401, self.error_body("unauthorized", "Unable to authenticate")
            )
        for route_method, pattern, handler in self._routes:
            match = pattern.match(parts.path)
            if route_method == method and match:
                status, answer = handler(*match.groups(), query=parse_qs(parts.query), body=body)
                return self._answer(http, status, answer)
        self._answer(http, 404, self.error_body("not_found", "The resource could not be found."))

    def error_body(self, code: str, message: str) -> Any:
        """The API's error shape (DigitalOcean's here; Hetzner wraps it in "error")."""
        return {"id": code, "message": message}

    def _fault_for(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if (fault.method in (None, method)) and (
                fault.path is None or path.startswith(fault.path)
            ):
                self.faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _answer(
        http: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            http.send_response(status)
            for name, value in (headers or {}).items():
                http.send_header(name, value)
            http.send_header("Content-Type", "application/json")
            http.send_header("Content-Length", str(len(data)))
            http.end_headers()
            http.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)
