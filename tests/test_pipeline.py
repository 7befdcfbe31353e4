"""pipeline.run_pipeline: pairs one by one or `jobs` at once, each with a log of its own."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imagefactory import matrix, pipeline
from imagefactory.settings import REPO_ROOT, Settings
from imagefactory.steps import StepLog


@pytest.fixture
def two_pairs(settings: Settings) -> list[matrix.Pair]:
    return matrix.select_pairs(settings, ["ubuntu-20.04", "ubuntu-22.04"], ["qemu"])


@pytest.fixture
def fake_stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each pair's build/certify/publish: one timed step, its process and time window written
    to a file (a forked worker's memory is its own), published."""
    monkeypatch.setattr(pipeline.matrix, "validate_pairs", lambda *args: None)

    def fake(pair, settings, packer, log, refresh_base, outcome) -> None:
        started = time.monotonic()
        with log.step(f"build {pair.image.name}"):
            time.sleep(1.0)
        facts = {
            "pid": os.getpid(),
            "window": [started, time.monotonic()],
            "steps": list(log.timings),
        }
        (tmp_path / f"{pair.image.name}.json").write_text(json.dumps(facts))
        outcome.status, outcome.published = "published", f"store/{pair.image.name}"

    monkeypatch.setattr(pipeline, "_build_certify_publish", fake)
    return tmp_path


def facts(directory: Path, image: str) -> dict:
    return json.loads((directory / f"{image}.json").read_text())


def test_one_job_runs_the_pairs_in_turn_each_timed_on_its_own(two_pairs, settings, fake_stages):
    out = io.StringIO()
    outcomes = pipeline.run_pipeline(two_pairs, settings, None, StepLog(out=out), jobs=1)  # type: ignore[arg-type]
    assert [o.published for o in outcomes] == ["store/ubuntu-20.04", "store/ubuntu-22.04"]
    first, second = facts(fake_stages, "ubuntu-20.04"), facts(fake_stages, "ubuntu-22.04")
    assert first["pid"] == second["pid"] == os.getpid()
    assert first["window"][1] <= second["window"][0]
    # A record's timings are its own pair's, not every step of the run so far.
    assert second["steps"] == ["build ubuntu-22.04"]
    assert "[ubuntu-" not in out.getvalue()


def test_two_jobs_run_two_pairs_at_once_in_workers_prefixed_in_order(
    two_pairs, settings, fake_stages
):
    out = io.StringIO()
    outcomes = pipeline.run_pipeline(two_pairs, settings, None, StepLog(out=out), jobs=2)  # type: ignore[arg-type]
    assert [(o.image, o.status) for o in outcomes] == [
        ("ubuntu-20.04", "published"),
        ("ubuntu-22.04", "published"),
    ]
    first, second = facts(fake_stages, "ubuntu-20.04"), facts(fake_stages, "ubuntu-22.04")
    assert len({first["pid"], second["pid"], os.getpid()}) == 3
    assert first["window"][0] < second["window"][1] and second["window"][0] < first["window"][1]


def start_with_two_workers(script: str, tmp_path: Path) -> tuple[subprocess.Popen, list[Path]]:
    """Run ``script`` (a two-job run whose workers each touch tmp_path/worker-<pid>) until
    both workers are busy; the run and their marker files."""
    run = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    while len(workers := list(tmp_path.glob("worker-*"))) < 2:
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.1)
    return run, workers


def test_a_parallel_run_killed_takes_its_workers_along(tmp_path: Path):
    """SIGKILL the run (a scheduler's timeout): no worker may go on building on its own."""
    script = textwrap.dedent(
        f"""
        import os, time
        from imagefactory import matrix, pipeline
        from imagefactory.settings import Settings
        from imagefactory.steps import StepLog

        def stuck(pair, settings, packer, log, refresh_base, outcome):
            open({str(tmp_path)!r} + f"/worker-{{os.getpid()}}", "w").close()
            time.sleep(120)

        pipeline._build_certify_publish = stuck
        pipeline.matrix.validate_pairs = lambda *args: None
        settings = Settings(build_dir=__import__("pathlib").Path({str(tmp_path)!r}))
        pairs = matrix.select_pairs(settings, ["ubuntu-20.04", "ubuntu-22.04"], ["qemu"])
        pipeline.run_pipeline(pairs, settings, None, StepLog(), jobs=2)
        """
    )
    run, workers = start_with_two_workers(script, tmp_path)
    run.send_signal(signal.SIGKILL)
    run.wait()
    pids = [int(w.name.removeprefix("worker-")) for w in workers]
    deadline = time.monotonic() + 10
    while (
        alive := [p for p in pids if Path(f"/proc/{p}").exists()]
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive == []


def test_a_parallel_run_terminated_lets_each_worker_clean_up(tmp_path: Path):
    """SIGTERM (systemd, cron): each worker unwinds through its cleanups, then all exit."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from pathlib import Path
        from imagefactory import matrix, pipeline, runner
        from imagefactory.settings import Settings
        from imagefactory.steps import StepLog

        def stuck(pair, settings, packer, log, refresh_base, outcome):
            try:
                Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}").touch()
                time.sleep(120)
            finally:
                Path({str(tmp_path)!r}, f"cleaned-{{os.getpid()}}").touch()

        pipeline._build_certify_publish = stuck
        pipeline.matrix.validate_pairs = lambda *args: None
        signal.signal(signal.SIGTERM, runner.raise_terminated)  # as tasks.py does
        settings = Settings(build_dir=Path({str(tmp_path)!r}))
        pairs = matrix.select_pairs(settings, ["ubuntu-20.04", "ubuntu-22.04"], ["qemu"])
        try:
            pipeline.run_pipeline(pairs, settings, None, StepLog(), jobs=2)
        except runner.Terminated:
            sys.exit(143)
        """
    )
    run, workers = start_with_two_workers(script, tmp_path)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 143
    pids = sorted(w.name.removeprefix("worker-") for w in workers)
    assert sorted(c.name.removeprefix("cleaned-") for c in tmp_path.glob("cleaned-*")) == pids
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


def test_jobs_out_of_range_is_one_line_naming_the_setting(tmp_path: Path):
    with pytest.raises(Exception, match=r"factory.jobs: 0 \(allowed: 1 to 16\)"):
        Settings.from_mapping({"jobs": "0"})
