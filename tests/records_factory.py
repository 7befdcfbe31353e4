"""Records of fake artifacts (small random files) for tests of the gate, publish and rebuild."""

from __future__ import annotations

import os
from pathlib import Path

from imagefactory import records
from imagefactory.certify import checks_version
from imagefactory.digests import sha256_file
from imagefactory.records import Certification, CheckResult, Provenance, Record, Transition
from imagefactory.settings import Settings

PACKAGES = {"strongswan-starter": "5.8.2-1ubuntu3.6", "openssh-server": "1:8.2p1-4ubuntu0.11"}


def make_record(
    settings: Settings,
    serial: str = "20261126.1",
    state: str = "certified",
    image: str = "ubuntu-20.04",
    provider: str = "qemu",
    size: int = 64 * 1024,
    inputs_sha256: str = "",
    packages: dict[str, str] | None = None,
) -> Path:
    """A record at the place `inv build` puts it, with a random artifact and a manifest."""
    directory = records.records_dir(settings.build_dir) / image / provider / serial
    directory.mkdir(parents=True)
    artifact = directory / f"{image}-{serial}.qcow2"
    artifact.write_bytes(os.urandom(size))
    packages = PACKAGES if packages is None else packages
    manifest = directory / f"{image}-{serial}.manifest"
    manifest.write_text("".join(f"{n}\t{v}\n" for n, v in packages.items()))
    sha = sha256_file(artifact)
    history = [Transition(state="built", at=records.now())]
    certification = None
    if state != "built":
        passed = state != "rejected"
        certification = Certification(
            artifact_sha256=sha,
            checks_version=checks_version(settings.checks_dir),
            passed=passed,
            at=records.now(),
            target="test",
            results=[CheckResult(name="snapd", status="pass" if passed else "fail", detail="test")],
        )
        history.append(Transition(state="certified" if passed else "rejected", at=records.now()))
    record = Record(
        image=image,
        provider=provider,
        serial=serial,
        state="built" if state == "built" else ("rejected" if state == "rejected" else "certified"),
        artifact=str(artifact),
        sha256=sha,
        size=size,
        kernel="5.4.0-216-generic",
        manifest=str(manifest),
        packages=packages,
        provenance=Provenance(
            git_commit="0" * 40,
            git_dirty=False,
            template_sha256="1" * 64,
            packer_version="1.6.6",
            inputs_sha256=inputs_sha256,
        ),
        timings={"total": 1.0},
        history=history,
        certification=certification,
    )
    path = directory / records.RECORD_NAME
    records.save(record, path)
    return path
