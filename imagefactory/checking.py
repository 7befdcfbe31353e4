"""What `inv check` does: pick the artifact or host, then hand over to certify."""

from __future__ import annotations

import time
from pathlib import Path

from . import records
from .certify import certify_record, check_host
from .definitions import select_images
from .errors import ConfigError
from .providers import get_provider
from .settings import Settings
from .ssh import SSHTarget
from .steps import StepLog


def latest_record(settings: Settings, image: str, provider: str) -> Path:
    found = [
        path
        for path, record in records.find_all(settings.build_dir)
        if record.image == image and record.provider == provider
    ]
    if not found:
        raise ConfigError(
            f"no built artifact of {image} on {provider} in {settings.build_dir} "
            f"(run `inv build --image {image} --provider {provider}` first)"
        )
    return max(found, key=lambda p: records.serial_key(p.parent.name))


def certify_latest(
    settings: Settings, image: str, provider: str, record: str | None, log: StepLog
) -> bool:
    spec = get_provider(provider)
    [definition] = select_images(settings.images_dir, [image])
    path = Path(record) if record else latest_record(settings, image, spec.name)
    spec.recover(definition, settings, log)  # check instances a crashed run left behind
    result = certify_record(path, spec, definition, settings.checks_dir, settings.cache_dir, log)
    # The verdict, not the state: a published image that passes again stays published.
    return result.certification is not None and result.certification.passed


def parse_host(host: str) -> tuple[str, str]:
    user, at, address = host.rpartition("@")
    if not at or not user or not address:
        raise ConfigError(f"--host: expected USER@ADDR, got {host!r}")
    return user, address


def check_existing_host(
    settings: Settings, host: str, port: int, key: str | None, image: str | None, log: StepLog
) -> bool:
    user, address = parse_host(host)
    key_path = Path(key).expanduser() if key else None
    if key_path and not key_path.is_file():
        raise ConfigError(f"--key: {key_path} is not a file")
    # A provider assessment applies the default image's kernel module lists.
    [reference] = select_images(settings.images_dir, [settings.default_image])
    definition = select_images(settings.images_dir, [image])[0] if image else None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    report_dir = settings.build_dir / "checks" / f"{address}-{port}-{stamp}"
    target = SSHTarget(user, address, port, key_path)
    result = check_host(target, definition, reference, settings.checks_dir, report_dir, log)
    return result.passed
