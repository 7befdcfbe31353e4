"""Artifact records: one JSON file per artifact, next to it, moving through the states
built -> certified | rejected -> published. Publishing reads only the record."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

State = Literal["built", "certified", "rejected", "published"]
RECORD_NAME = "record.json"


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    git_commit: str
    git_dirty: bool
    template_sha256: str
    packer_version: str
    qemu_version: str = ""
    base_image_sha256: str = ""
    archive_release_dates: dict[str, str] = {}
    accelerator: str = ""
    # Digest of everything that decides the build (definition, templates, mirror, provider):
    # a scheduled rebuild skips an image whose inputs and archive versions did not move.
    inputs_sha256: str = ""
    # Builds before this one that were stopped because their guest's kernel panicked (TCG).
    earlier_builds: list[str] = []


class CheckResult(BaseModel):
    name: str
    status: Literal["pass", "fail", "skip"]
    required: bool = True
    detail: str = ""
    duration: float = 0.0
    data: dict[str, Any] = {}


class Certification(BaseModel):
    """The verdict of the checks for one artifact digest and one version of checks/."""

    model_config = ConfigDict(extra="forbid")

    artifact_sha256: str
    checks_version: str
    passed: bool
    at: str
    target: str  # where the checks ran (overlay boot, or user@host)
    results: list[CheckResult]
    boot: dict[str, float] = {}  # seconds: ssh, cloud_init, system_ready, checks
    system_state: str = ""  # `systemctl is-system-running` after boot
    # Boots of this artifact before the one checked that never came up, and why (a kernel
    # panic of the emulator's, retried once under TCG): evidence, not hidden.
    earlier_boots: list[str] = []


class Publication(BaseModel):
    """Where the artifact went: a store directory, or the provider's published image id."""

    model_config = ConfigDict(extra="forbid")

    location: str
    at: str
    checks_version: str  # of the certification the gate accepted


class Transition(BaseModel):
    state: State
    at: str


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    image: str
    provider: str
    serial: str
    state: State
    artifact: str  # a path for local artifacts, the provider's image id for clouds
    sha256: str
    size: int
    kernel: str
    manifest: str  # path of the dpkg-query -W manifest beside the artifact
    packages: dict[str, str]
    # Ubuntu's own image of the release: its seeds' metapackage -> dependency groups, as the
    # archive listed them at build (the parity check's reference).
    parity_reference: dict[str, list[str]] = {}
    provenance: Provenance
    timings: dict[str, float]
    history: list[Transition]
    certification: Certification | None = None
    publication: Publication | None = None

    def move_to(self, state: State) -> None:
        self.state = state
        self.history.append(Transition(state=state, at=now()))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same directory + fsync + rename: a reader sees old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save(record: Record, path: Path) -> None:
    write_atomically(path, record.model_dump_json(indent=2) + "\n")


def load(path: Path) -> Record:
    try:
        return Record.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        what = f"{field}: {error['msg']}" if field else error["msg"]
        raise ConfigError(f"{path}: unreadable record: {what[:200]}") from None
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: unreadable record: {first[:200]}") from None


def serial_key(serial: str) -> tuple[int, ...]:
    """Sort key of a YYYYMMDD.N serial: 20261126.10 comes after 20261126.9."""
    return tuple(int(n) for n in serial.split(".") if n.isdigit())


def records_dir(build_dir: Path) -> Path:
    return build_dir / "artifacts"


def scan(build_dir: Path) -> tuple[list[tuple[Path, Record]], list[tuple[Path, str]]]:
    """Every record: those that load, and those that do not with why (one bad file must
    not hide the others)."""
    found, unreadable = [], []
    for path in sorted(records_dir(build_dir).glob(f"*/*/*/{RECORD_NAME}")):
        try:
            found.append((path, load(path)))
        except ConfigError as exc:
            unreadable.append((path, str(exc).removeprefix(f"{path}: ")))
    return found, unreadable


def find_all(build_dir: Path) -> list[tuple[Path, Record]]:
    """The records that load: an unreadable one is nothing anyone may certify or publish."""
    return scan(build_dir)[0]


def unreadable_summary(path: Path, problem: str) -> dict[str, Any]:
    """`inv records` row of a record that does not load: where it is, and why."""
    image, provider, serial = path.parts[-4:-1]
    return {
        "image": image,
        "provider": provider,
        "serial": serial,
        "state": "unreadable",
        "sha256": "",
        "size": 0,
        "kernel": "",
        "artifact": "",
        "record": str(path),
        "published": None,
        "problem": problem,
    }


def summary(path: Path, record: Record) -> dict[str, Any]:
    """The stable, machine-readable view of a record (`inv records --json`)."""
    return {
        "image": record.image,
        "provider": record.provider,
        "serial": record.serial,
        "state": record.state,
        "sha256": record.sha256,
        "size": record.size,
        "kernel": record.kernel,
        "artifact": record.artifact,
        "record": str(path),
        "published": record.publication.location if record.publication else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no artifacts yet (run `inv build`)"
    columns = ["image", "provider", "serial", "state", "sha256", "size", "artifact"]
    cells = [
        [
            str(r[c])[:12]
            if c == "sha256"
            else f"{r[c] / 2**20:.0f} MiB"
            if c == "size"
            else str(r[c])
            for c in columns
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def dumps(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
