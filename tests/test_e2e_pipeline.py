"""End to end, the way a scheduler runs it: a run killed mid-build leaves nothing running
and nothing published; the next `inv rebuild` cleans up, builds, certifies and publishes;
a run killed mid-check leaves no QEMU; an unchanged image is then skipped quickly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagefactory import records, runs
from imagefactory.settings import REPO_ROOT

from .conftest import INV

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="building and booting images needs root"),
]
RUN_TIMEOUT_S = 3600  # one scheduled run builds every release


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline") / "build"


def env_for(build_dir: Path, **settings: str) -> dict[str, str]:
    env = os.environ | {"INVOKE_FACTORY_BUILD_DIR": str(build_dir)}
    env |= {f"INVOKE_FACTORY_{k.upper()}": v for k, v in settings.items()}
    env.pop("FACTORY_DEBUG", None)
    return env


def inv(build_dir: Path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [INV, *args],
        cwd=REPO_ROOT,
        env=env_for(build_dir, **settings),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def kill_when_qemu_runs(build_dir: Path, *args: str, within: float) -> subprocess.Popen:
    """Start `inv ARGS`, SIGKILL it (not its children: they must go by themselves) as soon
    as a QEMU of this build directory runs."""
    proc = subprocess.Popen(
        [INV, *args],
        cwd=REPO_ROOT,
        env=env_for(build_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + within
    while not runs.qemu_processes(build_dir):
        assert proc.poll() is None, f"inv {' '.join(args)} ended before QEMU started"
        assert time.monotonic() < deadline, "QEMU never started"
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def live_processes_using(build_dir: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(build_dir) in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


def wait_until_gone(build_dir: Path, within: float) -> list[str]:
    deadline = time.monotonic() + within
    while (left := live_processes_using(build_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


class _FailingHook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))  # type: ignore[attr-defined]
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_webhook() -> Iterator[tuple[str, list[bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingHook)
    server.bodies = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", server.bodies  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def test_a_run_killed_during_the_build_leaves_nothing_behind(build_dir: Path) -> None:
    kill_when_qemu_runs(build_dir, "pipeline", within=900)
    # Packer got SIGTERM when its parent died and stops its QEMU; nothing of ours runs on.
    assert wait_until_gone(build_dir, within=90) == []
    store = build_dir / "store"
    assert not store.exists() or not list(store.glob("ubuntu-20.04/*"))


RELEASES = {"ubuntu-20.04": "20.04", "ubuntu-22.04": "22.04", "ubuntu-24.04": "24.04",
            "ubuntu-26.04": "26.04"}  # fmt: skip


def test_the_next_rebuild_cleans_up_builds_certifies_and_publishes_every_release(
    build_dir: Path, failing_webhook: tuple[str, list[bytes]]
) -> None:
    """The default schedule is every defined release on qemu: one scheduled run builds,
    certifies and publishes each of them, from the same templates and checks."""
    url, bodies = failing_webhook
    result = inv(build_dir, "rebuild", webhook_url=url, webhook_on="always")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cleaned up after an interrupted run" in result.stderr
    assert "warning: webhook" in result.stderr and len(bodies) >= 1  # failed, run did not
    listed = json.loads(inv(build_dir, "records", "--json").stdout)
    # The killed build left no record; each release has exactly one, published.
    assert sorted((r["image"], r["state"]) for r in listed) == [
        (image, "published") for image in RELEASES
    ]
    index = json.loads((build_dir / "store/streams/v1/index.json").read_text())["index"]
    [entry] = index.values()
    products = json.loads((build_dir / "store" / entry["path"]).read_text())["products"]
    for row in listed:
        record = records.load(Path(row["record"]))
        cert = record.certification
        assert cert is not None and cert.passed
        assert {r.name: r.status for r in cert.results if r.status != "pass"} == {}, row["image"]
        serial_dir = Path(row["published"])
        assert serial_dir.parent.parent == build_dir / "store"
        check = subprocess.run(
            ["sha256sum", "-c", "SHA256SUMS"], cwd=serial_dir, capture_output=True
        )
        assert check.returncode == 0, check.stdout
        product = f"org.imagefactory:strongswan:{RELEASES[row['image']]}:amd64"
        assert list(products[product]["versions"]) == [serial_dir.name]
    report = json.loads((build_dir / "reports/rebuild-latest.json").read_text())
    assert report["exit_code"] == 0
    assert [p["status"] for p in report["pairs"]] == ["published"] * len(RELEASES)
    assert {p["published"] for p in json.loads(bodies[0])["pairs"]} == {
        r["published"] for r in listed
    }


def test_a_run_killed_during_the_check_leaves_no_qemu(build_dir: Path) -> None:
    listed = json.loads(inv(build_dir, "records", "--json").stdout)
    [focal] = [r for r in listed if r["image"] == "ubuntu-20.04"]
    kill_when_qemu_runs(build_dir, "check", "--record", focal["record"], within=120)
    assert wait_until_gone(build_dir, within=30) == []
    assert records.load(Path(focal["record"])).state == "published"  # verdict untouched


def test_an_unchanged_image_is_skipped(build_dir: Path) -> None:
    started = time.monotonic()
    result = inv(build_dir, "rebuild")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cleaned up after an interrupted run" in result.stderr  # the killed check's overlay
    report = json.loads((build_dir / "reports/rebuild-latest.json").read_text())
    assert len(report["pairs"]) == len(RELEASES)
    for pair in report["pairs"]:
        assert pair["status"] == "skipped" and "is current" in pair["reason"], pair
    print(f"no-op rebuild: {elapsed:.1f} s")
    assert not list((build_dir / "artifacts").glob("*/*/*/check-*"))
