"""The only path to the packer binary, through packer-py.

packer-py's ``PackerExecutable`` buffers all output until Packer exits, formats
list arguments as Python reprs and never raises. ``StreamingPackerExecutable``
keeps its command vocabulary (build/validate/version) but streams machine-readable
lines as they come; ``Packer`` turns them into progress, errors and artifacts.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from packerpy import PackerExecutable

from .errors import GuestPanicError, PackerError, ToolMissingError
from .runner import die_with_parent

LineHandler = Callable[[str], None]
# Polled while Packer runs: why its guest will never come up, or None while it may.
GuestWatch = Callable[[], str | None]
WATCH_INTERVAL_S = 5.0


@dataclass(frozen=True, order=True)
class PackerVersion:
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> PackerVersion:
        match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
        if not match:
            raise PackerError(f"cannot read a Packer version from {text.strip()!r}")
        return cls(*(int(g) for g in match.groups()))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class PackerFeatures:
    """What the rendered template may use, by the Packer that will run it."""

    version: PackerVersion

    @property
    def supports_required_plugins(self) -> bool:
        # Plugins split out of Packer in 1.7; `packer init` reads required_plugins.
        return self.version >= PackerVersion(1, 7, 0)


@dataclass(frozen=True)
class MachineLine:
    """One `-machine-readable` line: timestamp,target,type,data..."""

    target: str
    kind: str
    data: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> MachineLine | None:
        parts = line.rstrip("\n").split(",")
        if len(parts) < 3 or not parts[0].isdigit():
            return None
        data = tuple(
            p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
            for p in parts[3:]
        )
        return cls(target=parts[1], kind=parts[2], data=data)


@dataclass
class Artifact:
    builder: str
    id: str = ""
    files: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    returncode: int
    lines: list[MachineLine]

    @property
    def errors(self) -> list[str]:
        found = [
            line.data[-1].strip()
            for line in self.lines
            if (line.kind == "ui" and line.data[:1] == ("error",)) or line.kind == "error"
        ]
        return [e for e in found if e]

    def artifacts(self) -> list[Artifact]:
        by_index: dict[tuple[str, str], Artifact] = {}
        for line in self.lines:
            if line.kind != "artifact" or len(line.data) < 2:
                continue
            index, key, *rest = line.data
            artifact = by_index.setdefault((line.target, index), Artifact(builder=line.target))
            if key == "id" and rest:
                artifact.id = rest[0]
            elif key == "file" and len(rest) >= 2 and rest[1] not in artifact.files:
                # Packer repeats an artifact's lines when a post-processor passes it on.
                artifact.files.append(rest[1])
        return [a for a in by_index.values() if a.id or a.files]


class StreamingPackerExecutable(PackerExecutable):
    """packer-py's executable, streaming each output line to ``on_line`` as it arrives."""

    def __init__(
        self,
        executable_path: str,
        env: Mapping[str, str],
        on_line: LineHandler,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(executable_path=executable_path, machine_readable=True)
        self.env = dict(env)
        self.on_line = on_line
        self.cwd = cwd
        self.watch: GuestWatch | None = None
        self.stopped_because: str | None = None  # the watch's reason, when it stopped Packer

    @staticmethod
    def _explode_args(**kwargs: object) -> list[str]:
        # packer-py would turn a list into "-only=['a', 'b']"; Packer wants "-only=a,b".
        fixed = {
            k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            for k, v in kwargs.items()
        }
        return PackerExecutable._explode_args(**fixed)

    def command(self, packer_cmd: str, template: str | None = None, **kwargs: object) -> list[str]:
        args = [self.configuration[PackerExecutable.PATH], packer_cmd]
        if "machine-readable" in self.configuration:
            args.append("-machine-readable")
        args.extend(self._explode_args(**kwargs))
        if template:
            args.append(template)
        return args

    def execute_cmd(self, packer_cmd: str, template: str | None = None, **kwargs: object):
        args = self.command(packer_cmd, template, **kwargs)
        # Own process group: an interrupt stops Packer and the QEMU it started together.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            text=True,
            bufsize=1,
            start_new_session=True,
            # If we are killed, Packer gets SIGTERM and stops the QEMU it started.
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        collected: list[str] = []
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        if self.watch:
            threading.Thread(target=self._watch, args=(proc, self.watch), daemon=True).start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                collected.append(line)
                self.on_line(line)
            proc.wait()
        except BaseException:
            _stop_group(proc)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
        return proc.returncode, "".join(collected).encode(), b""

    def _watch(self, proc: subprocess.Popen, watch: GuestWatch) -> None:
        while proc.poll() is None:
            if reason := watch():
                self.stopped_because = reason
                _stop_group(proc)
                return
            time.sleep(WATCH_INTERVAL_S)


# Packer processes running in any thread: an interrupt in the main thread stops them all
# (`packer validate` runs one per core in worker threads, which signals never reach).
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def stop_running() -> None:
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def redactor(secrets: Iterable[str]) -> Callable[[str], str]:
    values = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(text: str) -> str:
        for value in values:
            text = text.replace(value, "<redacted>")
        return text

    return redact


class Packer:
    """Runs Packer: validate, build, version. Raises PackerError on any failure."""

    def __init__(
        self,
        executable: str = "packer",
        env: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
        log: LineHandler | None = None,
    ) -> None:
        path = shutil.which(executable)
        if path is None:
            raise ToolMissingError(
                f"packer not found (looked for {executable!r} on PATH); "
                "install it with `apt-get install packer` (./factory does so on first use)"
            )
        self.path = path
        base = dict(os.environ if env is None else env)
        base.setdefault("CHECKPOINT_DISABLE", "1")  # no update check: this may run offline
        self.env = base
        self.redact = redactor(list(secrets))
        self.log = log or (lambda _line: None)
        self._version: PackerVersion | None = None

    def logging_to(self, log: LineHandler) -> Packer:
        """This Packer, its progress lines going to ``log`` (one pair's, in a parallel run)."""
        other = copy.copy(self)
        other.log = log
        return other

    def _executable(self, on_line: LineHandler, extra_env: Mapping[str, str] | None = None):
        env = self.env | dict(extra_env or {})
        return StreamingPackerExecutable(self.path, env=env, on_line=on_line)

    def _run(
        self,
        command: str,
        template: Path | None,
        extra_env=None,
        quiet=False,
        watch: GuestWatch | None = None,
        **kwargs,
    ) -> Outcome:
        lines: list[MachineLine] = []

        def on_line(raw: str) -> None:
            parsed = MachineLine.parse(raw)
            if parsed is None:
                return
            lines.append(parsed)
            if not quiet and parsed.kind == "ui" and len(parsed.data) >= 2:
                for text in parsed.data[1].splitlines():
                    if text.strip():
                        self.log(self.redact(text))

        executable = self._executable(on_line, extra_env)
        executable.watch = watch
        returncode, _, _ = executable.execute_cmd(
            command, str(template) if template else None, **kwargs
        )
        if executable.stopped_because:
            raise GuestPanicError(
                f"{template}: packer {command} stopped: {executable.stopped_because}"
            )
        return Outcome(returncode=returncode, lines=lines)

    def version(self) -> PackerVersion:
        if self._version is None:
            outcome = self._run("version", None, quiet=True)
            texts = [" ".join(line.data) for line in outcome.lines if line.kind == "version"]
            self._version = PackerVersion.parse(texts[0] if texts else "")
        return self._version

    def features(self) -> PackerFeatures:
        return PackerFeatures(self.version())

    def validate(
        self,
        template: Path,
        variables: Mapping[str, str],
        syntax_only: bool = False,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        kwargs: dict[str, object] = {"var": dict(variables)}
        if syntax_only:
            kwargs["syntax_only"] = True
        outcome = self._run("validate", template, extra_env=extra_env, **kwargs)
        if outcome.returncode != 0:
            raise PackerError(f"{template}: packer validate failed: {self._summary(outcome)}")

    def build(
        self,
        template: Path,
        variables: Mapping[str, str],
        only: list[str] | None = None,
        force: bool = True,
        watch: GuestWatch | None = None,
    ) -> list[Artifact]:
        """``watch`` is polled while the build runs; a reason from it stops Packer at once
        (GuestPanicError) instead of letting it wait out its SSH timeout."""
        kwargs: dict[str, object] = {"var": dict(variables), "color": "false"}
        if force:
            kwargs["force"] = True
        if only:
            kwargs["only"] = only
        outcome = self._run("build", template, watch=watch, **kwargs)
        if outcome.returncode != 0:
            raise PackerError(f"{template}: packer build failed: {self._summary(outcome)}")
        artifacts = outcome.artifacts()
        if not artifacts:
            # `-only=<typo>` builds nothing and exits 0 (Packer 1.6.6).
            raise PackerError(f"{template}: packer build exited 0 but produced no artifact")
        return artifacts

    def _summary(self, outcome: Outcome) -> str:
        errors = outcome.errors
        text = (
            " | ".join(" ".join(e.split()) for e in errors)
            if errors
            else f"exit {outcome.returncode}"
        )
        return self.redact(text)
