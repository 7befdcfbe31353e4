"""Mutable state of one build run, apart from the frozen image definition (mkosi's Context)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .definitions import ImageDefinition
from .settings import Settings
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
