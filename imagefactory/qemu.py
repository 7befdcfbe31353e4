"""The one module that talks to QEMU: accelerator choice, qemu-img, versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

from .errors import ToolMissingError
from .steps import StepLog

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

# Signs that the guest kernel really runs under KVM, and signs that KVM broke it.
KVM_BOOT_MARKERS = ("Run /init as init process", "Freeing unused kernel image")
CACHE_NOTE = "delete accelerator.json in the cache directory to probe again"
KVM_FAILURE_MARKERS = ("KVM internal error", "kvm run failed", "failed to initialize kvm")


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise ToolMissingError(
            f"{program} not found on PATH; install it with `apt-get install {package}` "
            "(./factory does so on first use)"
        )
    return path


@cache
def version() -> str:
    out = subprocess.run(
        [require(QEMU, "qemu-system-x86"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def kvm_usable(disk: Path, timeout: float = 20.0) -> bool:
    """Boot ``disk`` (read-only snapshot) under KVM until its kernel reaches userspace.

    /dev/kvm opening is not enough: on some hosts the device exists but the first real
    guest dies with a KVM internal error, so only a booting guest proves KVM works.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="imagefactory-kvm-probe-") as scratch:
        serial = Path(scratch) / "serial.log"
        messages = Path(scratch) / "qemu.log"
        command = [
            require(QEMU, "qemu-system-x86"), "-accel", "kvm", "-m", "512", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-snapshot",
            "-drive", f"file={disk},if=virtio,format=qcow2", "-serial", f"file:{serial}",
        ]  # fmt: skip
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=messages.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return _watch_probe(proc, serial, messages, timeout)
        finally:
            proc.kill()
            proc.wait()


def _watch_probe(proc: subprocess.Popen, serial: Path, messages: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console = serial.read_text(errors="replace") if serial.exists() else ""
        if any(marker in console for marker in KVM_BOOT_MARKERS):
            return True
        errors = messages.read_text(errors="replace")
        if proc.poll() is not None or any(m in errors for m in KVM_FAILURE_MARKERS):
            return False
        time.sleep(0.5)
    # Measured here: a focal kernel reaches /init in ~10 s under TCG and a few seconds under
    # KVM. A guest that prints nothing for 20 s under "KVM" is stuck (seen on this host).
    return False


def _host_fingerprint() -> str:
    cpu = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        "",
    )
    return f"{platform.release()}|{version()}|{cpu}"


def choose_accelerator(disk: Path, cache_dir: Path, log: StepLog) -> str:
    """kvm if a probe guest boots under it, else tcg; the verdict is cached for a week per
    host kernel, QEMU version and CPU, since a failing probe costs 20 s."""
    cache = cache_dir / "accelerator.json"
    host = _host_fingerprint()
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["host"] == host and time.time() - cached["at"] < 7 * 86400:
            return _announce(cached["accelerator"], log, cached=True)
    accelerator = "kvm" if kvm_usable(disk) else "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"host": host, "at": time.time(), "accelerator": accelerator}))
    return _announce(accelerator, log, cached=False)


def _announce(accelerator: str, log: StepLog, cached: bool) -> str:
    how = f"cached probe result, {CACHE_NOTE}" if cached else "probe guest"
    if accelerator == "kvm":
        log.say(f"accelerator: kvm ({how} booted under KVM)")
    else:
        log.say(f"notice: KVM is not usable here ({how} failed); using TCG, builds are slower")
    return accelerator


def info(path: Path) -> dict:
    out = subprocess.run(
        [require(QEMU_IMG, "qemu-utils"), "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)
