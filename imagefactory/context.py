"""Mutable state of one build run, apart from the frozen image definition (mkosi's Context)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .definitions import ImageDefinition
from .settings import Settings
from .ssh import SSHTarget
from .steps import StepLog


@dataclass
class BuildRun:
    image: ImageDefinition
    settings: Settings
    log: StepLog
    serial: str
    directory: Path  # where the artifact and its record end up
    refresh_base: bool = False
    # Provenance facts gathered along the way (base digest, accelerator, versions ...).
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        """Ephemeral inputs (SSH key, seed, Packer output); removed when the build ends."""
        return self.directory / "work"


@dataclass(frozen=True)
class BuiltArtifact:
    location: str  # a file path, or the provider's image id
    sha256: str
    size: int


@dataclass
class Instance:
    """A booted machine under test, as the checks see it."""

    target: SSHTarget
    allowed_keys: list[str]  # this boot's authorized keys; any other is a hygiene failure
    timings: dict[str, float] = field(default_factory=dict)  # seconds since power-on
    system_state: str = ""  # `systemctl is-system-running` once boot settled
    earlier_boots: list[str] = field(default_factory=list)  # boots that never came up, and why
