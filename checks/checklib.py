"""What every check shares: the context it runs in, its result, one way to run commands.

Runs inside the guest as root, on Python 3.8 and later, with the standard library only.
Nothing here writes to stdout: stdout belongs to run.py's JSON lines.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PASS = "pass"
FAIL = "fail"
SKIP = "skip"


@dataclass
class Result:
    """A check's verdict; run.py adds the name, the required flag and the duration."""

    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def passed(detail: str, **data: Any) -> Result:
    return Result(PASS, detail, data)


def failed(detail: str, **data: Any) -> Result:
    return Result(FAIL, detail, data)


def skipped(detail: str, **data: Any) -> Result:
    return Result(SKIP, detail, data)


@dataclass
class Context:
    """The expectations (the host's expectations.json) and a private scratch directory."""

    expect: dict[str, Any]
    workdir: Path

    def section(self, name: str) -> Any:
        """One part of the expectations; None when the host left it out or null."""
        return self.expect.get(name)


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Diagnostics for the human reading the host's log (stderr, never stdout), stamped
    with the seconds since the run started: under TCG, where the time goes matters."""
    print(f"[checks {time.monotonic() - _STARTED:7.1f}] {message}", file=sys.stderr, flush=True)


@dataclass
class Completed:
    """A finished command: what the checks need from subprocess.CompletedProcess."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        """The command and the last line it complained with, for a detail line."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        tail = text[-1] if text else f"exit status {self.returncode}"
        return f"`{shlex.join(self.argv)}`: {tail}"


# Commands run with a C locale so that the texts the checks parse are the same everywhere,
# and with the sbin directories on PATH (modprobe, ip, sysctl live there; a plain
# `sudo -E` or a minimal host PATH may lack them).
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PATH = os.pathsep.join([os.environ.get("PATH", "/usr/bin:/bin"), *_SBIN])
_ENV = dict(os.environ, LC_ALL="C", LANG="C", PATH=_PATH)


def run(
    argv: list[str],
    timeout: float = 60,
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> Completed:
    """Run a command to completion and capture its output; never raises for a bad exit.

    A missing program or a timeout becomes a non-zero result (127 / 124, like a shell) so
    that callers have one kind of failure to describe.
    """
    log(f"$ {shlex.join(argv)}")
    try:
        proc = subprocess.run(
            argv,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(_ENV, **(env or {})),
            check=False,
        )
    except FileNotFoundError:
        return Completed(argv, 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return Completed(argv, 124, out, f"timed out after {timeout:g} s")
    return Completed(argv, proc.returncode, proc.stdout, proc.stderr)


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B unit`: KEY=value lines."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def unit_properties(unit: str, properties: tuple[str, ...]) -> dict[str, str]:
    """A systemd unit's properties, as `systemctl show` reports them."""
    args = [arg for prop in properties for arg in ("-p", prop)]
    return parse_show(run(["systemctl", "show", *args, unit]).stdout)


def read_text(path: str | Path, default: str | None = None) -> str | None:
    """A file's text, or ``default`` when it does not exist or cannot be read."""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return default


class Cleanup:
    """Undo steps registered right after each resource is acquired, run in reverse.

    Every step runs even when an earlier one fails; the errors are collected so that a
    check can report a leak instead of hiding it.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self.errors: list[str] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def run_all(self) -> list[str]:
        while self._steps:
            what, step = self._steps.pop()
            try:
                outcome = step()
            except Exception as exc:
                self.errors.append(f"{what}: {exc}")
                continue
            if isinstance(outcome, Completed) and not outcome.ok:
                self.errors.append(f"{what}: {outcome.why()}")
        return self.errors

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.run_all()


def with_cleanup_errors(result: Result, errors: list[str]) -> Result:
    """A check that left something behind fails, whatever it found before."""
    if not errors:
        return result
    data = dict(result.data, cleanup_errors=errors)
    return failed(f"cleanup failed ({'; '.join(errors)}); before that: {result.detail}", **data)


def wait_until(predicate: Callable[[], bool], deadline_s: float, interval: float = 1.0) -> bool:
    """Poll against a wall-clock deadline (not a retry count): TCG makes every step slow."""
    deadline = time.monotonic() + deadline_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def kernel_release() -> str:
    return os.uname().release


def boot_time() -> float | None:
    """The boot time (epoch seconds) the kernel reports in /proc/stat."""
    for line in (read_text("/proc/stat") or "").splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return None


def which(program: str) -> str | None:
    """Where a program is, looking where run() looks."""
    return shutil.which(program, path=_PATH)
