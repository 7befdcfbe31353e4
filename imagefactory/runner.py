"""The one path to child processes (except Packer, which goes through packer.py).

Every command is logged as a shell line, runs in its own process group (so an
interrupt or a timeout stops it together with whatever it started: mmdebstrap's
apt, a chroot's helpers, QEMU) and fails with a ``CommandError`` that names the
command and the tail of its stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import FactoryError, ToolMissingError

LineHandler = Callable[[str], None]
STDERR_TAIL = 15
# Where root's tools live; a non-root PATH on Debian leaves them out.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# How long a process group gets between SIGTERM and SIGKILL (mmdebstrap unmounts on SIGTERM).
TERM_GRACE_S = 30.0

logger = logging.getLogger("imagefactory.run")
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls it


class Terminated(BaseException):  # like KeyboardInterrupt: not an error
    """SIGTERM arrived: unwind, cleaning up on the way, as for Ctrl-C."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets ``sig`` when we die, even by SIGKILL (Linux).

    Children run in their own process group (so an interrupt stops them as a whole), which
    also means a killed run would orphan them; this closes that gap for QEMU and Packer.
    """

    def arrange() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return arrange


class CommandError(FactoryError):
    """A command exited non-zero or ran out of time."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr_tail: list[str]) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        what = "timed out" if returncode is None else f"failed (exit {returncode})"
        message = f"{shlex.join(self.cmd)} {what}"
        if stderr_tail:
            message += ":\n  " + "\n  ".join(stderr_tail)
        super().__init__(message)


def require_tool(name: str, package: str) -> str:
    """The absolute path of ``name``, or ToolMissingError naming the Debian package."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    path = shutil.which(name, path=search)
    if path is None:
        raise ToolMissingError(
            f"{name} not found; install the Debian package {package} (apt-get install {package})"
        )
    return path


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    input: str | None = None,
    timeout: float | None = None,
    log: LineHandler | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; ``env`` is added to the current environment.

    Without ``capture`` stdout goes to ours and stderr is passed through line by line
    (kept for the error message); with it both are returned as text.
    """
    argv = [os.fspath(part) for part in cmd]
    (log or logger.info)(f"$ {shlex.join(argv)}")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE,
        env=os.environ | dict(env) if env else None,
        cwd=cwd,
        text=True,
        errors="replace",
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    try:
        stdout, stderr_lines = _communicate(proc, input, capture, timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        raise CommandError(argv, None, [f"no exit after {timeout:g} s"]) from None
    except BaseException:
        _stop_group(proc)
        raise
    stderr = "".join(stderr_lines)
    if check and proc.returncode != 0:
        tail = [line.rstrip("\n") for line in stderr_lines if line.strip()][-STDERR_TAIL:]
        raise CommandError(argv, proc.returncode, tail)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _communicate(
    proc: subprocess.Popen[str], input: str | None, capture: bool, timeout: float | None
) -> tuple[str | None, list[str]]:
    if capture:
        stdout, stderr = proc.communicate(input, timeout=timeout)
        return stdout, stderr.splitlines(keepends=True)
    # Pass stderr through as it comes (mmdebstrap's progress) but remember its tail.
    tail: deque[str] = deque(maxlen=200)
    reader = threading.Thread(target=_tee, args=(proc.stderr, tail), daemon=True)
    reader.start()
    if input is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(input)
        proc.stdin.close()
    proc.wait(timeout=timeout)
    reader.join()
    return None, list(tail)


def _tee(stream, tail: deque[str]) -> None:
    for line in stream:
        tail.append(line)
        sys.stderr.write(line)
    sys.stderr.flush()


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the whole process group, SIGKILL it if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=TERM_GRACE_S)
    # The leader may be gone while its children still run: kill the group regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
