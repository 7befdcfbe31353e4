"""One run at a time per build directory, and cleaning up after a run that was killed.

A SIGKILLed run cannot clean up after itself: its QEMU processes die with it
(PDEATHSIG, see runner.die_with_parent) but a Packer-started QEMU may linger, and its
work directories (keys, overlays, half-built serials) stay. The next run that takes the
lock knows nobody else is using the build directory, so it removes all of that.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from . import records
from .errors import ConfigError, FactoryError
from .steps import StepLog

LOCK_NAME = "run.lock"


class RunBusy(FactoryError):
    """Another run holds the build directory's lock."""

    exit_code = 75  # EX_TEMPFAIL: a scheduler may simply try again later


@contextlib.contextmanager
def exclusive(build_dir: Path, purpose: str, log: StepLog) -> Iterator[None]:
    """Hold the build directory's run lock or fail at once naming its holder; then sweep."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        (build_dir / LOCK_NAME).touch()
    except OSError as exc:
        raise ConfigError(
            f"factory.build_dir: {build_dir}: {exc.strerror or exc} (it must be a writable "
            "directory)"
        ) from None
    lock = FileLock(build_dir / LOCK_NAME, timeout=0)
    owner = build_dir / f"{LOCK_NAME}.owner"
    try:
        lock.acquire()
    except Timeout:
        raise RunBusy(
            f"another run holds {build_dir / LOCK_NAME} ({_describe(owner)}); try again later"
        ) from None
    try:
        records.write_atomically(
            owner, json.dumps({"pid": os.getpid(), "purpose": purpose, "since": records.now()})
        )
        sweep(build_dir, log)
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _describe(owner: Path) -> str:
    try:
        facts = json.loads(owner.read_text())
        return f"{facts['purpose']}, pid {facts['pid']}, since {facts['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"


def sweep(build_dir: Path, log: StepLog) -> list[str]:
    """Kill QEMU left by a killed run and remove its work directories. Only call it while
    holding the lock: anything of ours that still runs then belongs to a dead run."""
    cleaned = [f"QEMU pid {pid}" for pid in kill_orphans(build_dir)]
    for path in stale_work(build_dir):
        shutil.rmtree(path, ignore_errors=True)
        cleaned.append(str(path))
    for item in cleaned:
        log.say(f"cleaned up after an interrupted run: {item}")
    return cleaned


def qemu_processes(build_dir: Path) -> list[int]:
    """Live (not zombie) QEMU processes whose command line refers to ``build_dir``."""
    markers = {str(build_dir), str(build_dir.resolve())}
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        program = os.path.basename(argv[0].decode(errors="replace"))
        if state == "Z" or not program.startswith("qemu-system"):
            continue
        text = b" ".join(argv).decode(errors="replace")
        if any(marker in text for marker in markers):
            found.append(int(proc.name))
    return found


def kill_orphans(build_dir: Path, grace: float = 5.0) -> list[int]:
    pids = qemu_processes(build_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while qemu_processes(build_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def stale_work(build_dir: Path) -> list[Path]:
    """Half-built serials (no record), build work dirs and check overlays left behind."""
    stale = []
    for serial in sorted(records.records_dir(build_dir).glob("*/*/*")):
        if not serial.is_dir():
            continue
        if not (serial / records.RECORD_NAME).is_file():
            stale.append(serial)
            continue
        stale += [p for p in serial.iterdir() if p.is_dir() and _is_work(p.name)]
    return stale


def _is_work(name: str) -> bool:
    return name == "work" or name.startswith("check-")
