from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagefactory import records
from imagefactory.records import Record
from imagefactory.settings import REPO_ROOT, Settings

INV = str(Path(sys.executable).with_name("inv"))


@pytest.fixture(scope="session")
def e2e_settings(fleet) -> Settings:
    """End-to-end runs: the fleet's build directory, the user's real cache (base images)."""
    return fleet.settings


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """Every release built, certified and published once for the whole session, the way a
    scheduler does it (tests/e2e.py): a first run killed mid-build, then `inv rebuild`."""
    if os.geteuid() != 0:
        pytest.skip("building images needs root")
    from .e2e import make_fleet

    return make_fleet(tmp_path_factory.mktemp("fleet") / "build")


@pytest.fixture(scope="session")
def focal(fleet) -> tuple[Path, Record]:
    """The fleet's ubuntu-20.04 on qemu (record path, record): published."""
    assert fleet.rebuild.returncode == 0, fleet.rebuild.stderr[-3000:]
    path = fleet.record_path("ubuntu-20.04")
    return path, records.load(path)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The repository's images and templates; build output in a temporary directory."""
    return Settings(build_dir=tmp_path / "build", cache_dir=tmp_path / "cache")


@pytest.fixture
def images_copy(tmp_path: Path) -> Path:
    """A writable copy of images/ for tests that break a definition."""
    target = tmp_path / "images"
    shutil.copytree(REPO_ROOT / "images", target)
    return target


def run_inv(
    *args: str, env: dict[str, str] | None = None, tmp: Path
) -> subprocess.CompletedProcess:
    """Run a task the way a user does, with build output under ``tmp``."""
    full_env = os.environ | {"INVOKE_FACTORY_BUILD_DIR": str(tmp / "build")} | (env or {})
    full_env.pop("FACTORY_DEBUG", None)
    return subprocess.run(
        [INV, *args],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


class _KeystoneHandler(BaseHTTPRequestHandler):
    """Just enough of OpenStack Identity v3 (POST /v3/auth/tokens) for Packer to log in."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        self.server.requests.append((self.path, json.loads(self.rfile.read(length))))  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        endpoint = {"interface": "public", "region": "RegionOne", "region_id": "RegionOne"}
        catalog = [
            {"type": "compute", "name": "nova", "id": "c",
             "endpoints": [endpoint | {"id": "e1", "url": f"{base}/compute/v2.1"}]},
            {"type": "image", "name": "glance", "id": "i",
             "endpoints": [endpoint | {"id": "e2", "url": f"{base}/image"}]},
        ]  # fmt: skip
        domain = {"id": "default", "name": "Default"}
        body = json.dumps(
            {
                "token": {
                    "expires_at": "2099-01-01T00:00:00.000000Z",
                    "issued_at": "2026-01-01T00:00:00.000000Z",
                    "methods": ["password"],
                    "user": {"id": "u", "name": "demo", "domain": domain},
                    "project": {"id": "p", "name": "demo", "domain": domain},
                    "catalog": catalog,
                }
            }
        ).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Subject-Token", "local-test-token")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def keystone() -> Iterator[dict[str, str]]:
    """A local identity endpoint on 127.0.0.1; yields the OS_* environment pointing at it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeystoneHandler)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {
            "OS_AUTH_URL": f"http://127.0.0.1:{server.server_address[1]}/v3",
            "OS_USERNAME": "demo",
            "OS_PASSWORD": "os-password-for-tests",
            "OS_PROJECT_NAME": "demo",
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": "RegionOne",
            "_requests": server.requests,  # type: ignore[dict-item]
        }
    finally:
        server.shutdown()
        server.server_close()
