"""The main job for each (image, provider) pair: build -> certify -> publish (bento's
state machine). One pair's failure is reported and the next pair still runs; an image
that fails anywhere is never published."""

from __future__ import annotations

import multiprocessing
import os
import signal
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
from .runner import Terminated, die_with_parent, raise_terminated
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


# A pair's decision before building (told the pair's log): None to go ahead, or why it
# can be skipped.
SkipCheck = Callable[[Pair, StepLog], str | None]


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
                reason = skip_check(pair, log)
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
    jobs: int | None = None,
) -> list[Outcome]:
    """Validate every template first (cheap, catches a broken edit), then each pair, up to
    ``jobs`` of them at once. Each pair has a log (and record timings) of its own."""
    matrix.validate_pairs(settings, pairs, packer, log)
    jobs = jobs or settings.jobs
    parallel = jobs > 1 and len(pairs) > 1

    def runner(pair: Pair) -> Callable[[], Outcome]:
        own = log.child(f"[{pair.label}] " if parallel else "")
        own_packer = packer and packer.logging_to(own.say)  # (tests that fake builds: None)
        return lambda: run_pair(pair, settings, own_packer, own, refresh_base, skip_check)

    calls = [runner(p) for p in pairs]
    if not parallel:
        return [call() for call in calls]
    log.say(f"{len(pairs)} pairs, {min(jobs, len(pairs))} at a time")
    return _in_parallel(calls, jobs)


# The calls a parallel run's workers make, by index: forked workers inherit them (closures
# over a Packer and a skip check do not pickle); only the Outcome travels back.
_CALLS: list[Callable[[], Outcome]] = []


def _call(index: int) -> Outcome:
    # Only while a pair runs does SIGTERM unwind it (its cleanups run); an idle worker just
    # ends when the pool stops it.
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return _CALLS[index]()
    except Terminated:  # the run is stopping its workers: the cleanups ran while unwinding
        os._exit(143)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker_starts() -> None:
    die_with_parent(signal.SIGTERM)()  # a killed run takes its workers along
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited


def _in_parallel(calls: list[Callable[[], Outcome]], jobs: int) -> list[Outcome]:
    """Each call in a forked worker process. Processes, not threads: an interrupted or
    killed run takes its workers along (PDEATHSIG), and each worker its Packer and QEMU."""
    _CALLS[:] = calls
    pool = multiprocessing.get_context("fork").Pool(
        min(jobs, len(calls)), initializer=_worker_starts
    )
    try:
        pending = [pool.apply_async(_call, (i,)) for i in range(len(calls))]
        outcomes = [p.get() for p in pending]
        pool.close()
        return outcomes
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
        _CALLS.clear()


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
