"""Scheduled rebuilds: unattended, factory.jobs pairs at a time, skipping what did not
change, leaving a JSON and JUnit report behind and optionally telling a webhook."""

from __future__ import annotations

import json
import platform
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import records
from .build import inputs_sha256
from .certify import checks_version
from .errors import FactoryError
from .matrix import Pair
from .notify import post_report
from .packer import Packer
from .pipeline import Outcome, exit_code, run_pipeline
from .publish import publishable_records
from .records import Record
from .settings import Settings
from .steps import StepLog


def last_published(settings: Settings, pair: Pair) -> tuple[Path, Record] | None:
    for path in publishable_records(settings, pair.image.name, pair.provider.name):
        record = records.load(path)
        if record.state == "published":
            return path, record
    return None


def unchanged_reason(pair: Pair, settings: Settings, log: StepLog) -> str | None:
    """Why the last published image of the pair is still current, or None to rebuild."""
    last = last_published(settings, pair)
    if last is None:
        log.say(f"{pair.label}: never published; building")
        return None
    _, record = last
    if record.provenance.inputs_sha256 != inputs_sha256(pair.image, pair.provider, settings):
        log.say(f"{pair.label}: definition, templates or mirror changed since {record.serial}")
        return None
    cert = record.certification
    if cert is None or cert.checks_version != checks_version(settings.checks_dir):
        log.say(f"{pair.label}: checks/ changed since {record.serial} was certified")
        return None
    from . import archive_state  # apt and the archive: only needed to decide a skip

    candidates = archive_state.candidate_versions(pair.image, settings, record.packages, log.say)
    moved = archive_state.changed_packages(record.packages, candidates)
    if moved:
        sample = ", ".join(f"{n} {old} -> {new}" for n, (old, new) in sorted(moved.items())[:5])
        log.say(f"{pair.label}: {len(moved)} packages have newer versions ({sample}…)")
        return None
    return (
        f"{record.serial} is current (same inputs and checks; the archive offers the same "
        f"versions of its {len(record.packages)} packages)"
    )


def rebuild(
    pairs: list[Pair],
    settings: Settings,
    packer: Packer,
    log: StepLog,
    force: bool,
    jobs: int | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    started, clock = records.now(), time.monotonic()
    skip = None if force else (lambda pair, own: unchanged_reason(pair, settings, own))
    jobs = jobs or settings.jobs
    try:
        outcomes = run_pipeline(pairs, settings, packer, log, skip_check=skip, jobs=jobs)
    except FactoryError as exc:  # before any pair ran (e.g. a template no longer validates)
        log.say(f"FAILED: {exc}")
        outcomes = [
            Outcome(p.image.name, p.provider.name, "failed", str(exc), exit_code=exc.exit_code)
            for p in pairs
        ]
    report = {
        "kind": "imagefactory-rebuild",
        "started": started,
        "finished": records.now(),
        "duration_s": round(time.monotonic() - clock, 1),
        "host": platform.node(),
        "force": force,
        "jobs": jobs,
        "exit_code": exit_code(outcomes),
        "pairs": [asdict(o) for o in outcomes],
    }
    return outcomes, report


def write_reports(report: dict[str, Any], directory: Path) -> Path:
    """rebuild-<time>.json/.xml plus rebuild-latest.* for whoever polls; returns the JSON."""
    stamp = report["started"].replace("-", "").replace(":", "")
    text = json.dumps(report, indent=2) + "\n"
    xml = junit(report)
    for stem in (f"rebuild-{stamp}", "rebuild-latest"):
        records.write_atomically(directory / f"{stem}.json", text)
        records.write_atomically(directory / f"{stem}.xml", xml)
    return directory / f"rebuild-{stamp}.json"


def junit(report: dict[str, Any]) -> str:
    pairs = report["pairs"]
    root = ET.Element(
        "testsuite",
        name="rebuild",
        tests=str(len(pairs)),
        failures=str(sum(p["status"] in ("failed", "rejected") for p in pairs)),
        skipped=str(sum(p["status"] == "skipped" for p in pairs)),
        time=f"{report['duration_s']:.1f}",
        timestamp=report["started"],
    )
    for pair in pairs:
        case = ET.SubElement(
            root,
            "testcase",
            classname="rebuild",
            name=f"{pair['image']} on {pair['provider']}",
            time=f"{sum(pair['timings'].values()):.1f}",
        )
        if pair["status"] in ("failed", "rejected"):
            ET.SubElement(case, "failure", message=f"{pair['status']}: {pair['reason']}")
        elif pair["status"] == "skipped":
            ET.SubElement(case, "skipped", message=pair["reason"])
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def notify(report: dict[str, Any], settings: Settings, log: StepLog) -> bool | None:
    """Tell the webhook, if one is configured and this run is worth telling."""
    if not settings.webhook_url:
        return None
    if settings.webhook_on == "failure" and report["exit_code"] == 0:
        return None
    return post_report(settings.webhook_url, report, log)
