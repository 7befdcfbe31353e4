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
from urllib.parse import urlsplit

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_WHEN = ("failure", "always")
MAX_JOBS = 16  # pairs at once; each one a QEMU guest of its own


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
    # The qemu provider's publisher: a directory any static web server can serve.
    # Default: <build_dir>/store.
    store_dir: Path | None = None
    # Retention: the newest N published serials of each image stay; older ones are pruned.
    keep: int = 3
    # GPG key (fingerprint or id) that signs SHA256SUMS and the streams; empty = unsigned.
    signing_key: str = ""
    gnupghome: str = ""  # GnuPG home holding signing_key (default: gpg's own, ~/.gnupg)
    # The image a task builds, checks or benchmarks when none is named (the embedded default).
    default_image: str = "ubuntu-20.04"
    # `inv rebuild` without --image/--provider: these IMAGE:PROVIDER pairs, comma-separated;
    # empty: every image in images_dir on qemu.
    schedule: str = ""
    # `inv rebuild` posts its JSON report here (on failure, or always with webhook_on=always).
    webhook_url: str = ""
    webhook_on: str = "failure"
    # How many image x provider pairs `inv pipeline` and `inv rebuild` run at once. A TCG
    # guest keeps about 0.8 of a core busy; beside another each pair takes ~1.4x as long, so
    # on 2 cores 2 builds the four releases cold in 37 min instead of ~55. Each guest: 2 GiB.
    jobs: int = 1

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
            kwargs[name] = _convert(source, name, known[name].type, value)
        settings = cls(**kwargs)
        settings.check(source)
        return settings

    def check(self, source: str = "invoke.yaml") -> None:
        if self.keep < 1:
            raise ConfigError(f"{source}: factory.keep: {self.keep} (allowed: 1 or more)")
        if not 1 <= self.jobs <= MAX_JOBS:
            raise ConfigError(f"{source}: factory.jobs: {self.jobs} (allowed: 1 to {MAX_JOBS})")
        if self.webhook_on not in WEBHOOK_WHEN:
            raise ConfigError(
                f"{source}: factory.webhook_on: {self.webhook_on!r} "
                f"(allowed: {', '.join(WEBHOOK_WHEN)})"
            )
        if self.webhook_url:
            _check_webhook_url(source, self.webhook_url)

    @property
    def store(self) -> Path:
        return self.store_dir or self.build_dir / "store"

    @property
    def scheduled_pairs(self) -> list[tuple[str, str]]:
        pairs = []
        for item in filter(None, (part.strip() for part in self.schedule.split(","))):
            image, colon, provider = item.partition(":")
            if not colon or not image or not provider:
                raise ConfigError(
                    f"factory.schedule: {item!r} is not IMAGE:PROVIDER (e.g. ubuntu-20.04:qemu)"
                )
            pairs.append((image, provider))
        return pairs

    def rendered_dir(self, image: str, provider: str) -> Path:
        return self.build_dir / "rendered" / image / provider


def _check_webhook_url(source: str, url: str) -> None:
    # The message never quotes the URL: its path or credentials may be the secret.
    where = f"{source}: factory.webhook_url"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: not an http(s) URL with a host")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or c.isspace() for c in url):
        raise ConfigError(f"{where}: contains whitespace or control characters")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when asked)
    except ValueError:
        raise ConfigError(f"{where}: its port is not a number from 1 to 65535") from None


def _convert(source: str, name: str, kind: str, value: Any) -> Any:
    """A setting from YAML or the environment (always a string there) as its field's type."""
    where = f"{source}: factory.{name}"
    if kind == "int":
        # YAML's true and 2.9 are not whole numbers (int() would make them 1 and 2).
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{where}: expected a whole number, got {str(value)[:40]!r}")
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
    return Path(value).expanduser() if kind.startswith("Path") else str(value)
