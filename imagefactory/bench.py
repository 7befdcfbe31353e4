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
        "benchmark": "render-validate-matrix",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
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
        "benchmark": "build-stages",
        "image": image,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
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
