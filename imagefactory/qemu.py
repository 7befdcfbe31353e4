"""The one module that talks to QEMU: accelerator choice, qemu-img, versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import ToolMissingError
from .runner import die_with_parent, run
from .steps import StepLog

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

# Signs that the guest kernel really runs under KVM, and signs that KVM broke it.
KVM_BOOT_MARKERS = ("Run /init as init process", "Freeing unused kernel image")
CACHE_NOTE = "delete accelerator.json in the cache directory to probe again"
KVM_FAILURE_MARKERS = ("KVM internal error", "kvm run failed", "failed to initialize kvm")
# The kernel's last words when it stops for good (no panic= on a cloud image's command line:
# it then hangs, and only the console says so).
KERNEL_PANIC = re.compile(r"Kernel panic - not syncing: ?([^\r\n]*)")
PANICKED = "the kernel panicked"  # how a stop reason says so (providers retry on it)


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
            preexec_fn=die_with_parent(signal.SIGKILL),
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
    how = f"cached verdict of a probe guest; {CACHE_NOTE}" if cached else "a probe guest"
    if accelerator == "kvm":
        log.say(f"accelerator: kvm ({how})")
    else:
        log.say(f"notice: KVM is not usable here, using TCG: slower ({how})")
    return accelerator


def info(path: Path) -> dict:
    out = subprocess.run(
        [require(QEMU_IMG, "qemu-utils"), "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_seed_iso(seed_dir: Path, iso: Path) -> Path:
    """A NoCloud seed as cloud-init finds it: an ISO 9660 volume labelled cidata."""
    run(
        [require("xorriso", "xorriso"), "-as", "mkisofs", "-quiet", "-output", iso,
         "-volid", "cidata", "-joliet", "-rock", seed_dir / "user-data", seed_dir / "meta-data"],
        capture=True,
    )  # fmt: skip
    return iso


@dataclass
class VM:
    """A running throwaway guest: its SSH port on 127.0.0.1 and its serial console log."""

    process: subprocess.Popen
    ssh_port: int
    serial_log: Path
    started: float

    def console(self) -> str:
        return self.serial_log.read_text(errors="replace") if self.serial_log.exists() else ""

    def stopped(self) -> str | None:
        """Why this guest will never come up (QEMU gone, or the kernel panicked), else None."""
        return stop_reason(self.process.poll(), self.console())


def stop_reason(exit_status: int | None, console: str) -> str | None:
    if exit_status is not None:
        return f"QEMU exited (status {exit_status})"
    return panic_reason(console)


def panic_reason(console: str) -> str | None:
    """ "the kernel panicked (<its reason>)" when the console says so, else None."""
    if panic := KERNEL_PANIC.search(console):
        return f"{PANICKED} ({panic.group(1).strip() or 'no reason given'})"
    return None


def console_watch(serial_log: Path) -> Callable[[], str | None]:
    """Why the guest writing ``serial_log`` will never come up, or None while it may."""

    def watch() -> str | None:
        try:
            return panic_reason(serial_log.read_text(errors="replace"))
        except FileNotFoundError:
            return None

    return watch


@contextlib.contextmanager
def boot_overlay(
    disk: Path,
    work: Path,
    seed_iso: Path,
    accelerator: str,
    memory_mb: int = 2048,
    cpus: int = 2,
    disk_format: str = "qcow2",
) -> Iterator[VM]:
    """Boot a copy-on-write overlay of ``disk`` (never written); stop and delete it on exit,
    whatever happens, interrupts included."""
    overlay = work / "overlay.qcow2"
    run(
        [require(QEMU_IMG, "qemu-utils"), "create", "-q", "-f", "qcow2",
         "-b", disk.resolve(), "-F", disk_format, overlay],
    )  # fmt: skip
    port = free_port()
    serial = work / "serial.log"
    command = [
        require(QEMU, "qemu-system-x86"), "-accel", accelerator,
        "-m", str(memory_mb), "-smp", str(cpus), "-nodefaults", "-display", "none",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed_iso},media=cdrom,readonly=on",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-serial", f"file:{serial}", "-monitor", "none",
    ]  # fmt: skip
    with (work / "qemu.log").open("w") as messages:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=messages,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: killed as a whole below
            preexec_fn=die_with_parent(signal.SIGKILL),  # and with us, if we are killed
        )
    try:
        yield VM(process, port, serial, time.monotonic())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        overlay.unlink(missing_ok=True)
