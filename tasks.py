"""Invoke tasks: arguments in, calls into the imagefactory package, exit codes out.

Run them through ./factory (which installs what is missing first) or .venv/bin/inv.
Exit codes: 0 ok, 1 failure, 2 bad input, 3 template error, 4 tool missing, 5 Packer failed,
6 a required check failed (image rejected), 7 the gate refused to publish, 75 another run
holds the build directory (try later), 130 interrupted.
Set FACTORY_DEBUG=1 for a traceback instead of the one-line message.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from imagefactory import bench, checking, matrix, runner, runs
from imagefactory import build as builder
from imagefactory import pipeline as pipeline_
from imagefactory import rebuild as rebuild_
from imagefactory import records as artifact_records
from imagefactory.certify import CertificationFailed
from imagefactory.definitions import select_images
from imagefactory.errors import ConfigError, FactoryError
from imagefactory.matrix import all_secrets
from imagefactory.packer import Packer
from imagefactory.publish import publish_record, publishable_records
from imagefactory.settings import MAX_JOBS, Settings
from imagefactory.steps import StepLog

SELECTION_HELP = {
    "image": "image name from images/ (repeatable; default: every image)",
    "provider": "provider name, e.g. qemu, digitalocean (repeatable; default: every provider)",
}


def user_errors(func):
    """Turn a FactoryError into one line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(c, *args, **kwargs):
        # SIGTERM (systemd, cron, CI) unwinds like Ctrl-C: every cleanup runs (VMs, overlays,
        # loop devices, keys), then one line and 128 + 15.
        previous = signal.signal(signal.SIGTERM, runner.raise_terminated)
        try:
            return func(c, *args, **kwargs)
        except FactoryError as exc:
            if os.environ.get("FACTORY_DEBUG"):
                raise
            raise Exit(f"error: {exc}", code=exc.exit_code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None
        except runner.Terminated:
            raise Exit("terminated", code=143) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _settings(c) -> Settings:
    return Settings.from_mapping(dict(c.config.get("factory", {})))


def _port(port: object) -> int:
    text = "22" if port is None else str(port)
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"--port: {text[:20]!r} (allowed: 1 to 65535)")
    return int(text)


def _jobs(jobs: int) -> int | None:
    """--jobs as given (None: factory.jobs decides), within what a run may start."""
    if jobs and not 1 <= jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs: {jobs} (allowed: 1 to {MAX_JOBS})")
    return jobs or None


def _packer(settings: Settings, log: StepLog) -> Packer:
    # Packer's download cache belongs with ours, not in the current directory.
    env = os.environ | {"PACKER_CACHE_DIR": str(settings.cache_dir / "packer")}
    return Packer(settings.packer, env=env, secrets=all_secrets(os.environ), log=log.say)


@task(iterable=["image", "provider"], help=SELECTION_HELP)
@user_errors
def render(c, image=None, provider=None):
    """Render Packer templates for images x providers into build/rendered/."""
    settings = _settings(c)
    log = StepLog()
    pairs = matrix.select_pairs(settings, image, provider)
    matrix.render_pairs(settings, pairs, _packer(settings, log).features(), log)


@task(iterable=["image", "provider"], help=SELECTION_HELP)
@user_errors
def validate(c, image=None, provider=None):
    """Render, then `packer validate` every image x provider offline."""
    settings = _settings(c)
    log = StepLog()
    pairs = matrix.select_pairs(settings, image, provider)
    packer = _packer(settings, log)
    with log.step(f"validate {len(pairs)} templates"):
        matrix.validate_pairs(settings, pairs, packer, log)


@task(
    name="bench",
    help={
        "stage": "matrix (render+validate every pair), build (cold base, warm base, build) "
        "boot (boot-to-ready: stock-like base vs the latest built image), pipeline "
        "(a cold pipeline in a scratch build directory, then a no-op rebuild) or release "
        "(per release: cold pipeline, check stage, boot ratio, qcow2 size)",
        "image": "image for the build/boot/pipeline/release stages (default: "
        "factory.default_image; `all` with --stage release: every image)",
        "output": "JSON lines file to append results to (default: build/bench.jsonl)",
    },
)
@user_errors
def benchmark(c, stage="matrix", image=None, output=None):
    """Benchmark a stage and record its timings and sizes (build/bench.jsonl)."""
    settings = _settings(c)
    log = StepLog()
    packer = _packer(settings, log)
    if stage == "release":
        with runs.exclusive(settings.build_dir, "inv bench --stage release", log):
            for name in matrix.image_names(settings, [image] if image else None):
                print(
                    bench.release_summary(bench.release_stages(settings, packer, log, name, output))
                )
        return
    [image] = _one_image(settings, image)
    if stage == "matrix":
        print(bench.summary(bench.render_and_validate(settings, packer, log, output)))
    elif stage == "build":
        print(bench.build_summary(bench.build_stages(settings, packer, log, image, output)))
    elif stage == "boot":
        print(bench.boot_summary(bench.boot_comparison(settings, log, image, output)))
    elif stage == "pipeline":
        with runs.exclusive(settings.build_dir, "inv bench --stage pipeline", log):
            result = bench.pipeline_stages(settings, packer, log, image, output)
        print(bench.pipeline_summary(result))
    else:
        raise ConfigError(
            f"--stage: unknown stage {stage!r} (allowed: matrix, build, boot, pipeline, release)"
        )


@task(
    help={
        "image": "image name from images/ (default: factory.default_image)",
        "refresh": "rebuild even when a cached base with the same inputs exists",
    }
)
@user_errors
def base(c, image=None, refresh=False):
    """Build (or reuse from the cache) the base disk image from the Ubuntu archive."""
    from imagefactory.base import build_base

    settings = _settings(c)
    log = StepLog()
    [definition] = select_images(settings.images_dir, _one_image(settings, image))
    result = build_base(definition, settings, log, refresh=refresh)
    print(result.path)


@task(
    help={
        "image": "image name from images/ (default: factory.default_image)",
        "provider": "provider name (default: qemu)",
        "refresh_base": "rebuild the base image even when cached",
        "keep_on_error": "leave a failed build's work directory for debugging",
    }
)
@user_errors
def build(c, image=None, provider="qemu", refresh_base=False, keep_on_error=False):
    """Build one image for one provider with Packer; writes the artifact and its record."""
    settings = _settings(c)
    log = StepLog()
    [pair] = matrix.select_pairs(settings, _one_image(settings, image), [provider])
    packer = _packer(settings, log)
    with runs.exclusive(settings.build_dir, "inv build", log):
        record_path, _ = builder.build(
            pair.image, pair.provider, settings, packer, log, refresh_base, keep_on_error
        )
    print(record_path)


@task(help={"json": "print a JSON list (keys: image, provider, state, sha256, artifact, record)"})
@user_errors
def records(c, json=False):
    """List every artifact with its state, digest and paths."""
    settings = _settings(c)
    readable, unreadable = artifact_records.scan(settings.build_dir)
    rows = [artifact_records.summary(p, r) for p, r in readable]
    rows += [artifact_records.unreadable_summary(p, problem) for p, problem in unreadable]
    print(artifact_records.dumps(rows) if json else artifact_records.table(rows))
    for path, problem in unreadable:
        print(f"warning: {path}: {problem}", file=sys.stderr)


@task(
    help={
        "image": "image to certify (default: factory.default_image); with --host: that "
        "image's profile",
        "provider": "provider whose latest artifact of --image is certified (default: qemu)",
        "record": "certify this record.json instead of the latest artifact",
        "host": "USER@ADDR of an existing machine to check over SSH (no image: assessment)",
        "port": "SSH port for --host (default 22)",
        "key": "SSH private key for --host",
    }
)
@user_errors
def check(c, image=None, provider="qemu", record=None, host=None, port=None, key=None):
    """Certify: boot a fresh instance of the artifact and run checks/ in it (or check --host)."""
    settings = _settings(c)
    log = StepLog()
    if host:
        passed = checking.check_existing_host(settings, host, _port(port), key, image, log)
    else:
        with runs.exclusive(settings.build_dir, "inv check", log):
            [name] = _one_image(settings, image)
            passed = checking.certify_latest(settings, name, provider, record, log)
    if not passed:
        raise Exit("error: a required check failed (see above)", code=CertificationFailed.exit_code)


PAIR_HELP = {
    "image": "image name (repeatable; `all`: every image; default: factory.default_image)",
    "provider": "provider name (repeatable; default: qemu)",
}


def _one_image(settings: Settings, image: str | None) -> list[str]:
    if image == matrix.ALL:
        raise ConfigError("--image: this task takes one image, not all")
    return matrix.image_names(settings, [image] if image else None)


def _pairs(settings: Settings, image: list[str] | None, provider: list[str] | None):
    return matrix.select_pairs(settings, matrix.image_names(settings, image), provider or ["qemu"])


@task(
    iterable=["image", "provider"],
    help=PAIR_HELP
    | {
        "record": "publish this record.json instead of each pair's newest certified artifact",
    },
)
@user_errors
def publish(c, image=None, provider=None, record=None):
    """Publish certified artifacts; the gate refuses anything not certified as it is now."""
    settings = _settings(c)
    log = StepLog()
    if record:
        paths = [Path(record)]
    else:
        paths = [_newest_record(settings, pair) for pair in _pairs(settings, image, provider)]
    with runs.exclusive(settings.build_dir, "inv publish", log):
        for path in paths:
            published = publish_record(path, settings, log)
            print(published.publication.location)


def _newest_record(settings: Settings, pair) -> Path:
    found = publishable_records(settings, pair.image.name, pair.provider.name)
    if not found:
        raise ConfigError(f"no built artifact of {pair.label} (run `inv pipeline` first)")
    return found[0]


JOBS_HELP = {"jobs": "pairs at once (default: factory.jobs, 1)"}


@task(
    iterable=["image", "provider"],
    help=PAIR_HELP | {"refresh_base": "rebuild the base"} | JOBS_HELP,
)
@user_errors
def pipeline(c, image=None, provider=None, refresh_base=False, jobs=0):
    """The main job: validate -> base -> build -> certify -> publish (default image on qemu)."""
    settings, jobs = _settings(c), _jobs(jobs)
    log = StepLog()
    pairs = _pairs(settings, image, provider)
    packer = _packer(settings, log)
    with runs.exclusive(settings.build_dir, "inv pipeline", log):
        outcomes = pipeline_.run_pipeline(pairs, settings, packer, log, refresh_base, jobs=jobs)
    print(pipeline_.summary_table(outcomes))
    code = pipeline_.exit_code(outcomes)
    if code:
        raise Exit("error: not everything was published (see the table above)", code=code)


@task(
    iterable=["image", "provider"],
    help={
        "image": "image name (repeatable; `all`: every image; default: factory.schedule)",
        "provider": "provider name (repeatable; default: the pairs in factory.schedule)",
        "force": "rebuild even when nothing changed",
    }
    | JOBS_HELP,
)
@user_errors
def rebuild(c, image=None, provider=None, force=False, jobs=0):
    """For schedulers: the pipeline, skipping unchanged images; writes reports, notifies."""
    settings, jobs = _settings(c), _jobs(jobs)
    log = StepLog()
    if image or provider:
        pairs = _pairs(settings, image, provider)
    else:
        pairs = matrix.scheduled_pairs(settings)
    packer = _packer(settings, log)
    with runs.exclusive(settings.build_dir, "inv rebuild", log):
        outcomes, report = rebuild_.rebuild(pairs, settings, packer, log, force, jobs)
        path = rebuild_.write_reports(report, settings.build_dir / "reports")
    rebuild_.notify(report, settings, log)
    print(pipeline_.summary_table(outcomes))
    print(f"report: {path}")
    if report["exit_code"]:
        raise Exit(
            "error: the rebuild did not complete (see the table above)", code=report["exit_code"]
        )


@task(
    name="matrix",
    iterable=["image", "provider"],
    help=SELECTION_HELP | {"scheduled": "only the pairs in factory.schedule"},
)
@user_errors
def matrix_(c, image=None, provider=None, scheduled=False):
    """Print the image x provider matrix as JSON, for a CI system to fan out over runners."""
    settings = _settings(c)
    if scheduled:
        pairs = matrix.scheduled_pairs(settings)
    else:
        pairs = matrix.select_pairs(settings, image, provider)
    include = [{"image": p.image.name, "provider": p.provider.name} for p in pairs]
    print(json.dumps({"include": include}, indent=2))


@task(help={"fast": "skip the end-to-end tests (those marked e2e)", "k": "pytest -k expression"})
def test(c, fast=False, k=None):
    """Lint (ruff) and run the test suite; CI runs this."""
    python = shlex.quote(sys.executable)
    c.run(f"{python} -m ruff check .", pty=False)
    c.run(f"{python} -m ruff format --check .", pty=False)
    args = [sys.executable, "-m", "pytest"]
    if fast:
        args += ["-m", "not e2e"]
    if k:
        args += ["-k", k]
    c.run(shlex.join(args), pty=False)


ns = Collection(
    render,
    validate,
    base,
    build,
    check,
    publish,
    records,
    pipeline,
    rebuild,
    matrix_,
    benchmark,
    test,
)
# Every setting exists (empty = default) so INVOKE_FACTORY_<NAME> can override it.
ns.configure({"factory": {name: "" for name in Settings.names()}})
