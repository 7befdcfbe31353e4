"""The main job for each (image, provider) pair: build -> certify -> publish (bento's
state machine). One pair's failure is reported and the next pair still runs; an image
that fails anywhere is never published."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from . import build as builder
from . import matrix
from .certify import CertificationFailed, certify_record
from .errors import FactoryError
from .matrix import Pair
from .packer import Packer
from .publish import publish_record
from .settings import Settings
from .steps import StepLog

Status = Literal["published", "skipped", "rejected", "failed"]


@dataclass
class Outcome:
    image: str
    provider: str
    status: Status = "failed"
    reason: str = ""
    record: str = ""
    published: str = ""
    exit_code: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @property
    def label(self) -> str:
        return f"{self.image} on {self.provider}"

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 1)


# A pair's decision before building: None to go ahead, or why it can be skipped.
SkipCheck = Callable[[Pair], str | None]


def run_pair(
    pair: Pair,
    settings: Settings,
    packer: Packer,
    log: StepLog,
    refresh_base: bool = False,
    skip_check: SkipCheck | None = None,
) -> Outcome:
    outcome = Outcome(pair.image.name, pair.provider.name)
    try:
        # What a killed run left (check instances, a half-done publish) goes first.
        pair.provider.recover(pair.image, settings, log)
        if skip_check:
            with outcome.stage("decide"):
                reason = skip_check(pair)
            if reason:
                outcome.status, outcome.reason = "skipped", reason
                log.say(f"{pair.label}: skipped, {reason}")
                return outcome
        _build_certify_publish(pair, settings, packer, log, refresh_base, outcome)
    except FactoryError as exc:
        outcome.status, outcome.reason, outcome.exit_code = "failed", str(exc), exc.exit_code
        log.say(f"{pair.label}: FAILED: {exc}")
    return outcome


def _build_certify_publish(
    pair: Pair,
    settings: Settings,
    packer: Packer,
    log: StepLog,
    refresh_base: bool,
    outcome: Outcome,
) -> None:
    with outcome.stage("build"):
        record_path, _ = builder.build(
            pair.image, pair.provider, settings, packer, log, refresh_base
        )
    outcome.record = str(record_path)
    with outcome.stage("certify"):
        record = certify_record(
            record_path, pair.provider, pair.image, settings.checks_dir, settings.cache_dir, log
        )
    if record.state != "certified":
        cert = record.certification
        failed = [r.name for r in cert.results if r.status == "fail" and r.required] if cert else []
        outcome.status = "rejected"
        outcome.reason = f"failed: {', '.join(failed)}; not published"
        outcome.exit_code = CertificationFailed.exit_code
        return
    with outcome.stage("publish"):
        published = publish_record(record_path, settings, log)
    assert published.publication is not None
    outcome.status, outcome.published = "published", published.publication.location


def run_pipeline(
    pairs: list[Pair],
    settings: Settings,
    packer: Packer,
    log: StepLog,
    refresh_base: bool = False,
    skip_check: SkipCheck | None = None,
) -> list[Outcome]:
    """Validate every template first (cheap, catches a broken edit), then each pair."""
    matrix.validate_pairs(settings, pairs, packer, log)
    return [run_pair(p, settings, packer, log, refresh_base, skip_check) for p in pairs]


def exit_code(outcomes: list[Outcome]) -> int:
    """0 when everything was published or skipped; else the first failure's code."""
    failed = [o for o in outcomes if o.status == "failed"]
    rejected = [o for o in outcomes if o.status == "rejected"]
    worst = failed or rejected
    return (worst[0].exit_code or 1) if worst else 0


def summary_table(outcomes: list[Outcome]) -> str:
    stages = ["decide", "build", "certify", "publish"]
    used = [s for s in stages if any(s in o.timings for o in outcomes)]
    header = ["image", "provider", *(f"{s} s" for s in used), "verdict", "where / why"]
    rows = [
        [
            o.image,
            o.provider,
            *(f"{o.timings[s]:.0f}" if s in o.timings else "-" for s in used),
            o.status,
            o.published or o.reason,
        ]
        for o in outcomes
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header[:-1])]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
