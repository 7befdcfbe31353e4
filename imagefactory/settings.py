"""Run-time settings: where things live and which tools to use.

They come from invoke's configuration (the ``factory:`` section of ``invoke.yaml``,
overridable as ``INVOKE_FACTORY_<KEY>`` environment variables); image content
lives in ``images/``, not here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "imagefactory"


@dataclass(frozen=True)
class Settings:
    images_dir: Path = REPO_ROOT / "images"
    templates_dir: Path = REPO_ROOT / "templates"
    checks_dir: Path = REPO_ROOT / "checks"
    # Rendered templates, build outputs and records; git-ignored.
    build_dir: Path = REPO_ROOT / "build"
    # Base images and downloads, shared by every checkout of this user.
    cache_dir: Path = field(default_factory=default_cache_dir)
    packer: str = "packer"
    # Overrides every image's archive mirror (a local mirror or caching proxy).
    mirror: str = ""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "invoke.yaml") -> Settings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: factory.{unknown[0]}: unknown setting "
                f"(allowed: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if value in (None, ""):
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(
                    f"{source}: factory.{name}: expected a string, got {type(value).__name__}"
                )
            kwargs[name] = Path(value).expanduser() if known[name].type == "Path" else str(value)
        return cls(**kwargs)

    def rendered_dir(self, image: str, provider: str) -> Path:
        return self.build_dir / "rendered" / image / provider
