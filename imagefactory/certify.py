"""Certify: run checks/ inside a booted instance and record the verdict for that digest.

The machine comes from the provider (a QEMU overlay of the artifact, a cloud instance)
or is any host a maintainer names; either way the checks run over SSH, change nothing
beyond a temporary directory they remove, and report one JSON line per check.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import parity, records
from .definitions import Checks, ImageDefinition
from .digests import sha256_file, sha256_tree
from .errors import FactoryError
from .records import Certification, CheckResult, Record
from .ssh import SSHTarget
from .steps import StepLog

# Every check an image definition can enable, in the order they run (the schema's order).
FULL_PROFILE = list(Checks.model_fields)
# What Algo's guide asks of a new hosting provider's stock VM (no image of ours on it).
ASSESSMENT_PROFILE = ["environment", "kernel_modules", "xfrm", "ikev2_tunnel"]
CHECKS_TIMEOUT_S = 900


class CheckRunError(FactoryError):
    """The checks could not run at all (as opposed to running and failing)."""


class CertificationFailed(FactoryError):
    """Checks ran and at least one required check failed."""

    exit_code = 6


def checks_version(checks_dir: Path) -> str:
    return sha256_tree(checks_dir)


def expectations(
    checks_dir: Path,
    allowed_keys: list[str],
    image: ImageDefinition | None,
    provider: str | None,
    reference: ImageDefinition,
    parity_reference: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """What the checks judge against. Without an image: the provider assessment, using
    ``reference``'s kernel module lists (what a VPN server on that provider would need).
    ``parity_reference`` is what the build recorded of Ubuntu's own image (its seeds)."""
    modules = (image or reference).checks.kernel_modules
    base = {
        "checks_version": checks_version(checks_dir),
        "allowed_authorized_keys": allowed_keys,
        "kernel_modules": modules.model_dump() if modules else {"required": [], "optional": []},
    }
    if image is None:
        return base | {
            "profile": "assessment",
            "image": None,
            "release": None,
            "codename": None,
            "kernel_flavour": None,
            "service": None,
            "boot": None,
            "packages": None,
            "apparmor": None,
            "updates": None,
            "parity": None,
            "checks": ASSESSMENT_PROFILE,
        }
    enabled = set(image.checks.enabled())
    return base | {
        "profile": "full",
        "image": image.name,
        "release": image.release,
        "codename": image.codename,
        "kernel_flavour": image.kernel_flavour_on(provider) if provider else image.kernel_flavour,
        "service": image.service.model_dump(),
        "boot": image.boot.model_dump(),
        "packages": {"purge": image.packages.purge, "pin_away": image.packages.pin_away},
        "apparmor": _section(image.checks.apparmor),
        "updates": _section(image.checks.updates),
        "parity": parity.expectations(image, parity_reference or {}),
        "checks": [name for name in FULL_PROFILE if name in enabled],
    }


def _section(expectations: BaseModel | None) -> dict[str, Any] | None:
    return expectations.model_dump() if expectations is not None else None


def run_checks(
    target: SSHTarget, checks_dir: Path, expect: dict[str, Any], log: StepLog
) -> list[CheckResult]:
    """Copy checks/ to a temporary directory on the target, run them as root, remove it."""
    # 0711: apt's _apt user must reach the private lists the snapd check updates in it.
    remote = target.text(
        "d=$(mktemp -d /tmp/imagefactory-checks.XXXXXX) && chmod 0711 $d && echo $d"
    )
    if not remote.startswith("/tmp/imagefactory-checks."):
        raise CheckRunError(f"{target.label}: unexpected temporary directory {remote!r}")
    try:
        target.upload_tree(checks_dir, f"{remote}/checks")
        target.upload_text(json.dumps(expect, indent=2), f"{remote}/expectations.json")
        command = (
            f"sudo -n python3 {remote}/checks/run.py --expect {remote}/expectations.json "
            f"--workdir {remote}/work"
        )
        result = target.run(command, timeout=CHECKS_TIMEOUT_S, check=False)
    finally:
        target.run(f"sudo -n rm -rf {shlex.quote(remote)}", check=False, timeout=60)
    stdout = result.stdout.decode(errors="replace")
    if result.returncode not in (0, 1):
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise CheckRunError(
            f"{target.label}: checks did not run (exit {result.returncode}): {' | '.join(tail)}"
        )
    results = [CheckResult.model_validate_json(line) for line in stdout.splitlines() if line]
    for item in results:
        mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}[item.status]
        log.say(f"{mark} {item.name} ({item.duration:.1f} s): {item.detail}")
    missing = set(expect["checks"]) - {r.name for r in results}
    if missing:
        raise CheckRunError(f"{target.label}: no result for {', '.join(sorted(missing))}")
    return results


def verdict(results: list[CheckResult]) -> bool:
    return all(r.status != "fail" for r in results if r.required)


def junit_xml(suite: str, results: list[CheckResult]) -> str:
    root = ET.Element(
        "testsuite",
        name=suite,
        tests=str(len(results)),
        failures=str(sum(r.status == "fail" for r in results)),
        skipped=str(sum(r.status == "skip" for r in results)),
        time=f"{sum(r.duration for r in results):.3f}",
    )
    for result in results:
        case = ET.SubElement(
            root, "testcase", classname=suite, name=result.name, time=f"{result.duration:.3f}"
        )
        if result.status == "fail":
            ET.SubElement(case, "failure", message=result.detail).text = json.dumps(result.data)
        elif result.status == "skip":
            ET.SubElement(case, "skipped", message=result.detail)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def summary(label: str, results: list[CheckResult]) -> str:
    failed = [r.name for r in results if r.status == "fail" and r.required]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    head = f"{label}: {'CERTIFIED' if not failed else 'REJECTED'}"
    tail = f" (failed: {', '.join(failed)})" if failed else ""
    return (
        f"{head}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped{tail}"
    )


def write_reports(directory: Path, stem: str, certification: Certification, label: str) -> None:
    records.write_atomically(
        directory / f"{stem}.json", certification.model_dump_json(indent=2) + "\n"
    )
    records.write_atomically(directory / f"{stem}.xml", junit_xml(label, certification.results))
    records.write_atomically(
        directory / f"{stem}.txt", summary(label, certification.results) + "\n"
    )


def certify_record(
    record_path: Path,
    provider,
    image: ImageDefinition,
    checks_dir: Path,
    cache_dir: Path,
    log: StepLog,
) -> Record:
    """Boot a fresh instance of the artifact, run every check, record certified|rejected."""
    record = records.load(record_path)
    artifact = Path(record.artifact)
    if provider.local_artifacts and sha256_file(artifact) != record.sha256:
        raise CheckRunError(f"{artifact}: its sha256 no longer matches {record_path}")
    label = f"{record.image} {record.serial} on {record.provider}"
    work = Path(tempfile.mkdtemp(prefix="check-", dir=record_path.parent))
    try:
        with (
            log.step(f"certify {label}"),
            provider.instance(record, image, work, cache_dir, log) as instance,
        ):
            expect = expectations(
                checks_dir,
                instance.allowed_keys,
                image,
                record.provider,
                image,
                parity_reference=record.parity_reference,
            )
            started = time.monotonic()
            with log.step("checks"):
                results = run_checks(instance.target, checks_dir, expect, log)
            instance.timings["checks"] = round(time.monotonic() - started, 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the boot's private key is in there
    certification = Certification(
        artifact_sha256=record.sha256,
        checks_version=expect["checks_version"],
        passed=verdict(results),
        at=records.now(),
        target=f"fresh {record.provider} instance ({instance.target.label})",
        results=results,
        boot=instance.timings,
        system_state=instance.system_state,
        earlier_boots=instance.earlier_boots,
    )
    record.certification = certification
    if record.state == "published" and certification.passed:
        log.say(f"{label} stays published: it passes today's checks too")
    else:
        if record.state == "published":
            log.say(f"warning: {label} is published but fails today's checks")
        record.move_to("certified" if certification.passed else "rejected")
    write_reports(record_path.parent, "certification", certification, label)
    records.save(record, record_path)
    provider.record_verdict(record, image, log)
    log.say(summary(label, results))
    return record


def public_keys_for(key: Path | None) -> list[str]:
    """The public keys the connection may use: they count as this boot's own."""
    candidates = (
        [key.with_name(key.name + ".pub")] if key else sorted(Path.home().glob(".ssh/*.pub"))
    )
    keys = [p.read_text().strip() for p in candidates if p.is_file()]
    if key and not keys:
        derived = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=False
        )
        keys = [derived.stdout.strip()] if derived.returncode == 0 else []
    return keys


def check_host(
    target: SSHTarget,
    image: ImageDefinition | None,
    reference: ImageDefinition,
    checks_dir: Path,
    report_dir: Path,
    log: StepLog,
) -> Certification:
    """Run the checks on an existing machine: the provider assessment without an image,
    that image's full profile with one (an instance of it booted elsewhere)."""
    profile = "assessment" if image is None else f"{image.name} profile"
    label = f"{target.label} ({profile})"
    with log.step(f"check {label}"):
        target.wait_until_reachable(60)
        expect = expectations(
            checks_dir, public_keys_for(target.key), image, None, reference=reference
        )
        results = run_checks(target, checks_dir, expect, log)
    certification = Certification(
        artifact_sha256="",
        checks_version=expect["checks_version"],
        passed=verdict(results),
        at=records.now(),
        target=target.label,
        results=results,
    )
    write_reports(report_dir, "checks", certification, label)
    log.say(summary(label, results))
    log.say(f"reports: {report_dir}/checks.{{json,xml,txt}}")
    return certification
