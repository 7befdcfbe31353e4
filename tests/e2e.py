"""The end-to-end harness: one fleet of real images per test session, made the way a scheduler
makes it, and the helpers that drive `inv` against it.

Building is the expensive part (minutes per release under TCG), so every end-to-end test looks
at, or boots from, the same images: the scheduler's first run is killed mid-build, its second
(`inv rebuild --jobs 2`, whose default schedule is every release on qemu) cleans up after it and
builds, certifies and publishes each release once, two at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from imagefactory import disk, records, runs
from imagefactory.certify import certify_record
from imagefactory.definitions import ImageDefinition, load_image
from imagefactory.digests import sha256_file
from imagefactory.providers import get_provider
from imagefactory.records import Record
from imagefactory.settings import REPO_ROOT, Settings, default_cache_dir
from imagefactory.steps import StepLog

from .conftest import INV

RUN_TIMEOUT_S = 3600  # one scheduled run builds every release
RELEASES = {"ubuntu-20.04": "20.04", "ubuntu-22.04": "22.04", "ubuntu-24.04": "24.04",
            "ubuntu-26.04": "26.04"}  # fmt: skip


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


def kill_when_qemu_runs(build_dir: Path, *args: str, within: float) -> None:
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


def failing_webhook() -> Iterator[tuple[str, list[bytes]]]:
    """A webhook on 127.0.0.1 that records what it gets and answers 503 every time."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FailingHook)
    server.bodies = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", server.bodies  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Fleet:
    """What the scheduler's two runs left, for the tests to judge."""

    build_dir: Path
    left_after_kill: list[str]  # processes of the build directory still alive after the kill
    store_after_kill: list[str]  # what the killed run published (nothing, it must be)
    rebuild: subprocess.CompletedProcess
    webhook_bodies: list[bytes]
    seconds: float
    listed: list[dict] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings(build_dir=self.build_dir, cache_dir=default_cache_dir())

    def record_path(self, image: str) -> Path:
        [row] = [r for r in self.listed if r["image"] == image]
        return Path(row["record"])

    def record(self, image: str) -> Record:
        return records.load(self.record_path(image))


def make_fleet(build_dir: Path) -> Fleet:
    kill_when_qemu_runs(build_dir, "pipeline", within=900)
    # Packer got SIGTERM when its parent died and stops its QEMU; nothing of ours runs on.
    left = wait_until_gone(build_dir, within=90)
    store = build_dir / "store"
    published = sorted(p.name for p in store.glob("ubuntu-*/*")) if store.exists() else []
    hook = failing_webhook()
    url, bodies = next(hook)
    try:
        started = time.monotonic()
        # Two at a time: a TCG guest keeps about one of the two cores busy.
        result = inv(build_dir, "rebuild", "--jobs", "2", webhook_url=url, webhook_on="always")
        seconds = time.monotonic() - started
    finally:
        hook.close()
    fleet = Fleet(build_dir, left, published, result, list(bodies), seconds)
    if result.returncode == 0:
        fleet.listed = json.loads(inv(build_dir, "records", "--json").stdout)
    return fleet


def image_definition(name: str) -> ImageDefinition:
    return load_image(REPO_ROOT / "images" / f"{name}.yaml")


def certify(record_path: Path, settings: Settings, image: ImageDefinition) -> Record:
    return certify_record(
        record_path, get_provider("qemu"), image, settings.checks_dir, settings.cache_dir, StepLog()
    )


def failed_checks(record: Record) -> list[str]:
    assert record.certification is not None
    return sorted(r.name for r in record.certification.results if r.status == "fail")


def certify_variant(
    built: Record,
    changes: list[Callable[[Path], None]],
    settings: Settings,
    image: ImageDefinition,
) -> Record:
    """Certify a copy of ``built`` with ``changes`` applied offline (the artifact is kept)."""
    name = "-".join(change.__name__.strip("_") for change in changes)
    variant_dir = records.records_dir(settings.build_dir) / "broken" / "qemu" / name
    variant_dir.mkdir(parents=True)
    try:
        artifact = disk.modified_copy(
            Path(built.artifact),
            variant_dir / "variant.qcow2",
            lambda root: [change(root) for change in changes],
            say=lambda _l: None,
        )
        variant = built.model_copy(
            update={
                "artifact": str(artifact),
                "sha256": sha256_file(artifact),
                "certification": None,
                "publication": None,
                "state": "built",
                "history": list(built.history[:1]),
            }
        )
        records.save(variant, variant_dir / "record.json")
        return certify(variant_dir / "record.json", settings, image)
    finally:
        shutil.rmtree(variant_dir, ignore_errors=True)
