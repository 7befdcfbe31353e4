"""Benchmarks: measure and record stage timings (goals live here, not in timed tests)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from . import matrix
from .packer import Packer
from .settings import Settings
from .steps import StepLog

# Goal from the foundation issue: the whole matrix renders and validates in under 5 s.
MATRIX_GOAL_SECONDS = 5.0


def header(benchmark: str) -> dict[str, Any]:
    """What every result carries: which benchmark, when, and on what machine."""
    return {
        "benchmark": benchmark,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }


def record_result(settings: Settings, result: dict[str, Any], output: str | None) -> Path:
    path = Path(output) if output else settings.build_dir / "bench.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(result, sort_keys=True) + "\n")
    return path


def render_and_validate(
    settings: Settings, packer: Packer, log: StepLog, output: str | None = None
) -> dict[str, Any]:
    pairs = matrix.select_pairs(settings, None, None)
    started = time.monotonic()
    with log.step("render matrix"):
        matrix.render_pairs(settings, pairs, packer.features(), log)
    with log.step("render and validate matrix"):
        matrix.validate_pairs(settings, pairs, packer, log)
    result = {
        **header("render-validate-matrix"),
        "packer": str(packer.version()),
        "pairs": len(pairs),
        "seconds": {
            "render": log.timings["render matrix"],
            "render_and_validate": log.timings["render and validate matrix"],
            "total": round(time.monotonic() - started, 3),
        },
        "goal_seconds": MATRIX_GOAL_SECONDS,
    }
    result["recorded_in"] = str(record_result(settings, result, output))
    return result


def summary(result: dict[str, Any]) -> str:
    seconds = result["seconds"]
    goal = result["goal_seconds"]
    verdict = "within" if seconds["render_and_validate"] <= goal else "OVER"
    return (
        f"{result['pairs']} pairs: render {seconds['render']:.2f} s, render+validate "
        f"{seconds['render_and_validate']:.2f} s ({verdict} the {goal:.0f} s goal) "
        f"on {result['cpus']} cpus, Packer {result['packer']}; recorded in {result['recorded_in']}"
    )


# Goals from the build issue: a warm build (cached base) under 4 min on 2 cores without KVM,
# and a published qcow2 under 160 MB.
WARM_BUILD_GOAL_SECONDS = 240.0
PUBLISHED_SIZE_GOAL_BYTES = 160 * 1000 * 1000


def build_stages(
    settings: Settings, packer: Packer, log: StepLog, image: str, output: str | None = None
) -> dict[str, Any]:
    """Cold base (rebuilt), warm base (cache hit), then a build on the warm base."""
    from . import build
    from .base import build_base

    [pair] = matrix.select_pairs(settings, [image], ["qemu"])
    with log.step("cold base"):
        cold = build_base(pair.image, settings, log, refresh=True)
    with log.step("warm base"):
        build_base(pair.image, settings, log)
    started = time.monotonic()
    with log.step("build on warm base"):
        _, record = build.build(pair.image, pair.provider, settings, packer, log)
    result = {
        **header("build-stages"),
        "image": image,
        "accelerator": record.provenance.accelerator,
        "seconds": {
            "cold_base": log.timings["cold base"],
            "warm_base": log.timings["warm base"],
            "build": round(time.monotonic() - started, 3),
            "packer_build": record.timings.get("packer build", 0.0),
            "total": round(log.timings["cold base"] + time.monotonic() - started, 3),
        },
        "bytes": {"base_qcow2": cold.size, "published_qcow2": record.size},
        "goals": {
            "warm_build_seconds": WARM_BUILD_GOAL_SECONDS,
            "published_qcow2_bytes": PUBLISHED_SIZE_GOAL_BYTES,
        },
    }
    result["recorded_in"] = str(record_result(settings, result, output))
    return result


def build_summary(result: dict[str, Any]) -> str:
    s, b, goals = result["seconds"], result["bytes"], result["goals"]
    build_ok = "within" if s["build"] <= goals["warm_build_seconds"] else "OVER"
    size_ok = "within" if b["published_qcow2"] <= goals["published_qcow2_bytes"] else "OVER"
    return (
        f"cold base {s['cold_base']:.0f} s, warm base {s['warm_base']:.1f} s, build "
        f"{s['build']:.0f} s ({build_ok} the {goals['warm_build_seconds']:.0f} s goal; packer "
        f"{s['packer_build']:.0f} s), total {s['total']:.0f} s; base {b['base_qcow2'] / 1e6:.0f} "
        f"MB, published qcow2 {b['published_qcow2'] / 1e6:.0f} MB ({size_ok} the 160 MB goal); "
        f"{result['accelerator']} on {result['cpus']} cpus; recorded in {result['recorded_in']}"
    )


# Goal from the certify issue: the certified image is ready in at most 0.7x the time of a
# stock-like image (the archive base, snapd still seeded), booted the same way.
BOOT_RATIO_GOAL = 0.7


def boot_comparison(
    settings: Settings, log: StepLog, image: str, output: str | None = None
) -> dict[str, Any]:
    """Boot-to-ready of the stock-like base and of the latest built image, same run."""
    import shutil
    import tempfile

    from .base import build_base
    from .checking import latest_record
    from .providers import booted_overlay
    from .records import load

    [pair] = matrix.select_pairs(settings, [image], ["qemu"])
    stock = build_base(pair.image, settings, log).path
    record = load(latest_record(settings, image, "qemu"))
    timings: dict[str, dict[str, float]] = {}
    for label, disk in (("stock_like", stock), ("certified", Path(record.artifact))):
        work = Path(tempfile.mkdtemp(prefix="bench-boot-", dir=settings.build_dir))
        try:
            with (
                log.step(f"boot {label}"),
                booted_overlay(disk, work, settings.cache_dir, log) as vm,
            ):
                timings[label] = vm.timings
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ratio = timings["certified"]["system_ready"] / timings["stock_like"]["system_ready"]
    certification = record.certification
    result = {
        **header("boot-to-ready"),
        "image": image,
        "seconds": timings,
        "ratio": round(ratio, 3),
        "check_stage_seconds": certification.boot.get("checks") if certification else None,
        "goal_ratio": BOOT_RATIO_GOAL,
    }
    result["recorded_in"] = str(record_result(settings, result, output))
    return result


def boot_summary(result: dict[str, Any]) -> str:
    stock, cert = result["seconds"]["stock_like"], result["seconds"]["certified"]
    verdict = "within" if result["ratio"] <= result["goal_ratio"] else "OVER"
    checks = result["check_stage_seconds"]
    check_stage = f"{checks:.0f} s" if checks else "not run yet"
    return (
        f"ready (ssh / cloud-init / systemd): stock-like {stock['ssh']:.0f} / "
        f"{stock['cloud_init']:.0f} / {stock['system_ready']:.0f} s, certified {cert['ssh']:.0f} / "
        f"{cert['cloud_init']:.0f} / {cert['system_ready']:.0f} s: ratio {result['ratio']:.2f} "
        f"({verdict} the {result['goal_ratio']} goal); check stage "
        f"{check_stage}; recorded in {result['recorded_in']}"
    )


# Goals from the publish issue: a cold `inv pipeline` under 8 min on 2 cores without KVM, and
# a no-op `inv rebuild` (nothing changed) under 30 s.
COLD_PIPELINE_GOAL_SECONDS = 480.0
NOOP_REBUILD_GOAL_SECONDS = 30.0


def pipeline_stages(
    settings: Settings, packer: Packer, log: StepLog, image: str, output: str | None = None
) -> dict[str, Any]:
    """A cold pipeline (empty build directory, base rebuilt) then a no-op rebuild, in a
    scratch build directory so the user's records and store stay as they are."""
    import dataclasses
    import shutil
    import tempfile

    from . import pipeline, rebuild

    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=settings.build_dir))
    local = dataclasses.replace(settings, build_dir=scratch, store_dir=scratch / "store")
    try:
        pairs = matrix.select_pairs(local, [image], ["qemu"])
        started = time.monotonic()
        outcomes = pipeline.run_pipeline(pairs, local, packer, log, refresh_base=True)
        cold = time.monotonic() - started
        started = time.monotonic()
        noop, _ = rebuild.rebuild(pairs, local, packer, log, force=False)
        noop_seconds = time.monotonic() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        **header("pipeline"),
        "image": image,
        "verdicts": {"cold_pipeline": outcomes[0].status, "noop_rebuild": noop[0].status},
        "seconds": {
            "cold_pipeline": round(cold, 1),
            **{f"cold_{k}": v for k, v in outcomes[0].timings.items()},
            "noop_rebuild": round(noop_seconds, 1),
        },
        "goals": {
            "cold_pipeline_seconds": COLD_PIPELINE_GOAL_SECONDS,
            "noop_rebuild_seconds": NOOP_REBUILD_GOAL_SECONDS,
        },
    }
    result["recorded_in"] = str(record_result(settings, result, output))
    return result


def pipeline_summary(result: dict[str, Any]) -> str:
    s, goals, verdicts = result["seconds"], result["goals"], result["verdicts"]
    cold_ok = "within" if s["cold_pipeline"] <= goals["cold_pipeline_seconds"] else "OVER"
    noop_ok = "within" if s["noop_rebuild"] <= goals["noop_rebuild_seconds"] else "OVER"
    stages = ", ".join(
        f"{k[5:]} {v:.0f} s" for k, v in s.items() if k.startswith("cold_") and k != "cold_pipeline"
    )
    return (
        f"cold pipeline {s['cold_pipeline']:.0f} s ({cold_ok} the "
        f"{goals['cold_pipeline_seconds']:.0f} s goal; {stages}; {verdicts['cold_pipeline']}), "
        f"no-op rebuild {s['noop_rebuild']:.1f} s ({noop_ok} the "
        f"{goals['noop_rebuild_seconds']:.0f} s goal; {verdicts['noop_rebuild']}); "
        f"recorded in {result['recorded_in']}"
    )


# Goals from the releases issue, per release on 2 cores without KVM: a cold pipeline (base
# from the archive, build, certify, publish) within 6 min, the check stage within 60 s, the
# certified image ready in at most 0.7x a stock-like image's time, a qcow2 within 200 MB.
RELEASE_GOALS = {
    "cold_pipeline_seconds": 360.0,
    "check_stage_seconds": 60.0,
    "boot_ratio": 0.7,
    "qcow2_bytes": 200 * 1000 * 1000,
}


def release_stages(
    settings: Settings, packer: Packer, log: StepLog, image: str, output: str | None = None
) -> dict[str, Any]:
    """One release end to end in a scratch build directory: a cold pipeline (base rebuilt),
    then boot-to-ready of its stock-like base against the image just certified, same run."""
    import dataclasses
    import shutil
    import tempfile

    from . import pipeline
    from .records import load

    scratch = Path(tempfile.mkdtemp(prefix="bench-release-", dir=settings.build_dir))
    local = dataclasses.replace(settings, build_dir=scratch, store_dir=scratch / "store")
    try:
        pairs = matrix.select_pairs(local, [image], ["qemu"])
        started = time.monotonic()
        [outcome] = pipeline.run_pipeline(pairs, local, packer, log, refresh_base=True)
        cold = time.monotonic() - started
        record = load(Path(outcome.record)) if outcome.record else None
        boot = boot_comparison(local, log, image, output=str(scratch / "boot.jsonl"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cert = record.certification if record else None
    timings = record.timings if record else {}
    result = {
        **header("release"),
        "image": image,
        "verdict": outcome.status,
        "accelerator": record.provenance.accelerator if record else "",
        "seconds": {
            "cold_pipeline": round(cold, 1),
            "cold_base": timings.get("prepare", 0.0),
            "packer_build": timings.get("packer build", 0.0),
            "certify": outcome.timings.get("certify", 0.0),
            "check_stage": cert.boot.get("checks", 0.0) if cert else 0.0,
            "boot_stock_like": boot["seconds"]["stock_like"]["system_ready"],
            "boot_certified": boot["seconds"]["certified"]["system_ready"],
        },
        "checks": {r.name: r.duration for r in cert.results} if cert else {},
        "boot_ratio": boot["ratio"],
        "bytes": {"qcow2": record.size if record else 0},
        "goals": RELEASE_GOALS,
    }
    result["recorded_in"] = str(record_result(settings, result, output))
    return result


def release_summary(result: dict[str, Any]) -> str:
    s, goals = result["seconds"], result["goals"]

    def mark(value: float, goal: float) -> str:
        return "ok" if value <= goal else "OVER"

    slowest = sorted(result["checks"].items(), key=lambda kv: -kv[1])[:3]
    return (
        f"{result['image']}: {result['verdict']}; cold pipeline {s['cold_pipeline']:.0f} s "
        f"({mark(s['cold_pipeline'], goals['cold_pipeline_seconds'])}; base {s['cold_base']:.0f} s,"
        f" packer {s['packer_build']:.0f} s, certify {s['certify']:.0f} s); check stage "
        f"{s['check_stage']:.0f} s ({mark(s['check_stage'], goals['check_stage_seconds'])}; "
        f"slowest {', '.join(f'{n} {d:.0f} s' for n, d in slowest)}); ready stock-like "
        f"{s['boot_stock_like']:.0f} s, certified {s['boot_certified']:.0f} s: ratio "
        f"{result['boot_ratio']:.2f} ({mark(result['boot_ratio'], goals['boot_ratio'])}); qcow2 "
        f"{result['bytes']['qcow2'] / 1e6:.0f} MB "
        f"({mark(result['bytes']['qcow2'], goals['qcow2_bytes'])}); {result['accelerator']} on "
        f"{result['cpus']} cpus; recorded in {result['recorded_in']}"
    )
