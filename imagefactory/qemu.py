"""The one module that talks to QEMU: accelerator choice, qemu-img, versions."""

from __future__ import annotations

import json
import os
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


def kvm_usable(disk: Path, timeout: float = 45.0) -> bool:
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
    # Under a working KVM a kernel reaches userspace in a few seconds; silence means no.
    return False


def choose_accelerator(disk: Path, log: StepLog) -> str:
    if kvm_usable(disk):
        log.say("accelerator: kvm (a probe guest booted under KVM)")
        return "kvm"
    log.say("notice: KVM is not usable here (probe guest failed); using TCG, builds are slower")
    return "tcg"


def info(path: Path) -> dict:
    out = subprocess.run(
        [require(QEMU_IMG, "qemu-utils"), "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)
