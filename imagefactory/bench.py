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


def record(settings: Settings, result: dict[str, Any], output: str | None) -> Path:
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
    result["recorded_in"] = str(record(settings, result, output))
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
