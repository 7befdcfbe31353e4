"""Publish a record's artifact through its provider, only past the gate."""

from __future__ import annotations

from pathlib import Path

from . import records
from .certify import checks_version
from .definitions import select_images
from .gate import GateRefused, require_publishable
from .providers import get_provider
from .records import Publication, Record
from .settings import Settings
from .steps import StepLog


def publish_record(record_path: Path, settings: Settings, log: StepLog) -> Record:
    """Gate, publish, then record where it went (state: published)."""
    if not record_path.is_file():
        raise GateRefused(f"not publishing: no record at {record_path} (build and check first)")
    record = records.load(record_path)
    provider = get_provider(record.provider)
    [image] = select_images(settings.images_dir, [record.image])
    require_publishable(record, record_path, settings.checks_dir, provider.local_artifacts)
    label = f"{record.image} {record.serial} on {record.provider}"
    with log.step(f"publish {label}"):
        published = record.model_copy(deep=True)
        if published.state != "published":
            published.move_to("published")
        location = provider.publish(published, image, settings, log)
        published.publication = Publication(
            location=location, at=records.now(), checks_version=checks_version(settings.checks_dir)
        )
        records.save(published, record_path)
    log.say(f"published {label}: {location}")
    return published


def publishable_records(settings: Settings, image: str, provider: str) -> list[Path]:
    """Every record of the pair, newest serial first."""
    found = [
        path
        for path, record in records.find_all(settings.build_dir)
        if record.image == image and record.provider == provider
    ]
    return sorted(found, key=lambda p: records.serial_key(p.parent.name), reverse=True)
