"""SSH to a machine under test: a throwaway guest of ours, or any host a maintainer names."""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import FactoryError
from .runner import require_tool


class SSHError(FactoryError):
    """The machine could not be reached, or a command on it failed."""


class GuestStoppedError(SSHError):
    """The machine stopped (or its kernel panicked) before SSH came up: waiting is pointless."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SSHTarget:
    user: str
    host: str
    port: int = 22
    key: Path | None = None
    # A throwaway guest has new host keys every boot: don't record or check them.
    throwaway: bool = False

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _ssh(self) -> list[str]:
        args = [require_tool("ssh", "openssh-client"), "-p", str(self.port)]
        args += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]
        args += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.key:
            args += ["-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        if self.throwaway:
            args += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        else:
            args += ["-o", "StrictHostKeyChecking=accept-new"]
        return [*args, f"{self.user}@{self.host}"]

    def run(
        self, command: str, timeout: float = 600, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            result = subprocess.run(
                [*self._ssh(), command],
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise SSHError(f"{self.label}: `{command}` did not finish in {timeout:.0f} s") from None
        if check and result.returncode != 0:
            tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise SSHError(
                f"{self.label}: `{command}` failed (exit {result.returncode}): {' | '.join(tail)}"
            )
        return result

    def text(self, command: str, timeout: float = 600) -> str:
        return self.run(command, timeout).stdout.decode(errors="replace").strip()

    def wait_until_reachable(
        self, timeout: float, stopped: Callable[[], str | None] = lambda: None
    ) -> float:
        """Seconds until `true` ran over SSH; polls against a deadline, not a retry count.
        ``stopped`` says why the machine will never answer (then this fails at once)."""
        started = time.monotonic()
        deadline = started + timeout
        last = ""
        while time.monotonic() < deadline:
            if reason := stopped():
                raise GuestStoppedError(f"{self.label}: {reason} before SSH came up", reason)
            try:
                self.run("true", timeout=30)
                return time.monotonic() - started
            except SSHError as exc:
                last = str(exc)
            time.sleep(2)
        raise SSHError(f"{self.label}: no SSH after {timeout:.0f} s ({last})")

    def upload_tree(self, local: Path, remote: str) -> None:
        """Copy a directory's contents to ``remote`` (created) as one tar stream."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(local.rglob("*")):
                if "__pycache__" not in path.parts and path.is_file():
                    tar.add(path, arcname=path.relative_to(local).as_posix())
        self.run(f"mkdir -p {remote} && tar -xzf - -C {remote}", stdin=buffer.getvalue())

    def upload_text(self, text: str, remote: str) -> None:
        self.run(f"cat > {remote}", stdin=text.encode())


def wait_until_ready(
    target: SSHTarget,
    powered_on: float,
    timeout: float,
    stopped: Callable[[], str | None] = lambda: None,
) -> tuple[dict[str, float], str]:
    """Boot-to-ready timings (seconds since power-on): SSH up, cloud-init done, systemd
    settled; and systemd's state (running, or degraded with failed units)."""
    deadline = powered_on + timeout
    target.wait_until_reachable(deadline - time.monotonic(), stopped)
    timings = {"ssh": round(time.monotonic() - powered_on, 3)}
    remaining = max(deadline - time.monotonic(), 30)
    target.run("cloud-init status --wait >/dev/null", timeout=remaining, check=False)
    timings["cloud_init"] = round(time.monotonic() - powered_on, 3)
    state = target.run(
        "systemctl is-system-running --wait",
        timeout=max(deadline - time.monotonic(), 30),
        check=False,
    )
    timings["system_ready"] = round(time.monotonic() - powered_on, 3)
    return timings, state.stdout.decode(errors="replace").strip()
