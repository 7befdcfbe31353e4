"""Build one image for one provider: render, Packer build, collect, record (state: built)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from . import parity, records
from .context import BuildRun, BuiltArtifact
from .definitions import ImageDefinition
from .digests import sha256_tree
from .errors import GuestPanicError, PackerError
from .packer import Artifact, Packer
from .providers import Provider
from .render import render
from .settings import REPO_ROOT, Settings
from .steps import StepLog


def next_serial(parent: Path, today: str | None = None) -> str:
    """YYYYMMDD.N, N counting builds of that day (like Ubuntu's cloud-image serials)."""
    today = today or time.strftime("%Y%m%d", time.gmtime())
    taken = {p.name for p in parent.glob(f"{today}.*")} if parent.exists() else set()
    n = 1
    while f"{today}.{n}" in taken:
        n += 1
    return f"{today}.{n}"


def git_state(root: Path = REPO_ROOT) -> tuple[str, bool]:
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, bool(status.strip())


def inputs_sha256(image: ImageDefinition, provider: Provider, settings: Settings) -> str:
    """What decides the image besides the archive's package versions (checked separately)."""
    inputs = {
        "definition": image.model_dump(mode="json"),
        "provider": provider.name,
        "templates": sha256_tree(settings.templates_dir),
        "mirror": settings.mirror,
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_report(report_dir: Path) -> tuple[dict[str, str], str, str]:
    """(facts, manifest text, parity reference text) from the build's report tarball."""
    tarball = report_dir / "report.tar"
    if not tarball.is_file():
        raise PackerError(f"{tarball}: the build did not deliver its report")
    with tarfile.open(tarball) as tar:
        files = {
            Path(m.name).name: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    facts = dict(line.split("=", 1) for line in files.get("facts", "").splitlines() if "=" in line)
    return facts, files.get("packages.manifest", ""), files.get("reference.control", "")


def parse_manifest(text: str) -> dict[str, str]:
    packages = {}
    for line in text.splitlines():
        name, _, version = line.partition("\t")
        if name and version:
            packages[name] = version
    return packages


def build(
    image: ImageDefinition,
    provider: Provider,
    settings: Settings,
    packer: Packer,
    log: StepLog,
    refresh_base: bool = False,
    keep_on_error: bool = False,
) -> tuple[Path, records.Record]:
    parent = records.records_dir(settings.build_dir) / image.name / provider.name
    serial = next_serial(parent)
    run = BuildRun(image, settings, log, serial, parent / serial, refresh_base=refresh_base)
    run.work.mkdir(parents=True)
    ok = False
    try:
        record_path, record = _build(run, provider, packer)
        ok = True
        return record_path, record
    finally:
        # The work directory holds this build's private key: never leave it behind on success.
        if ok or not keep_on_error:
            shutil.rmtree(run.work, ignore_errors=True)
        if not ok and not keep_on_error:
            shutil.rmtree(run.directory, ignore_errors=True)
        elif not ok:
            log.say(f"kept for debugging (contains the build's private key): {run.directory}")


def _build(run: BuildRun, provider: Provider, packer: Packer) -> tuple[Path, records.Record]:
    log = run.log
    started = time.monotonic()
    outer = f"build {run.image.name} on {provider.name}, serial {run.serial}"
    with log.step(outer):
        with log.step("render"):
            destination = run.settings.rendered_dir(run.image.name, provider.name)
            rendered = render(
                run.image, provider, run.settings.templates_dir, destination, packer.features()
            )
        with log.step("prepare"):
            variables = {
                "serial": run.serial,
                "manifest_path": str(run.work / "packer-manifest.json"),
                "report_directory": str(run.work / "report"),
            } | provider.prepare_build(run)
        with log.step("packer build"):
            artifacts = _packer_build(run, provider, packer, rendered.template, variables)
        with log.step("collect"):
            built = provider.collect(run, artifacts)
            facts, manifest_text, reference_text = read_report(run.work / "report")
            facts["reference"] = reference_text
    timings = {name: seconds for name, seconds in log.timings.items() if name != outer}
    timings["total"] = round(time.monotonic() - started, 3)
    return _record(run, provider, built, rendered.sha256, packer, facts, manifest_text, timings)


def _packer_build(
    run: BuildRun, provider: Provider, packer: Packer, template: Path, variables: dict[str, str]
) -> list[Artifact]:
    """Packer's build, stopped at once if its guest's kernel panics. Under TCG that is an
    emulator race (see providers.booted_overlay): one more attempt, and the record says so."""
    only = [f"{provider.name}.image"]
    try:
        return packer.build(template, variables, only, True, provider.build_watch(run))
    except GuestPanicError as exc:
        if variables.get("accelerator") != "tcg":
            raise
        run.log.say(f"warning: {exc}; building once more")
        run.provenance["earlier_builds"] = [f"build 1: {exc}"]
    return packer.build(template, variables, only, True, provider.build_watch(run))


def _record(
    run: BuildRun,
    provider: Provider,
    built: BuiltArtifact,
    template_sha256: str,
    packer: Packer,
    facts: dict[str, str],
    manifest_text: str,
    timings: dict[str, float],
) -> tuple[Path, records.Record]:
    manifest = run.directory / f"{run.image.name}-{run.serial}.manifest"
    manifest.write_text(manifest_text)
    commit, dirty = git_state()
    record = records.Record(
        image=run.image.name,
        provider=provider.name,
        serial=run.serial,
        state="built",
        artifact=built.location,
        sha256=built.sha256,
        size=built.size,
        kernel=facts.get("kernel", ""),
        manifest=str(manifest),
        packages=parse_manifest(manifest_text),
        parity_reference=parity.reference_for(run.image, facts.get("reference", "")),
        provenance=records.Provenance(
            git_commit=commit,
            git_dirty=dirty,
            template_sha256=template_sha256,
            packer_version=str(packer.version()),
            inputs_sha256=inputs_sha256(run.image, provider, run.settings),
            **run.provenance,
        ),
        timings=timings,
        history=[records.Transition(state="built", at=records.now())],
    )
    path = run.directory / records.RECORD_NAME
    records.save(record, path)
    run.log.say(f"built {built.location} (sha256 {built.sha256[:16]}…, {built.size} bytes)")
    return path, record
