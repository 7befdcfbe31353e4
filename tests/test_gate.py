"""The gate: only a passing certification of this exact artifact by today's checks/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from imagefactory import records
from imagefactory.gate import GateRefused, refusal, require_publishable
from imagefactory.publish import publish_record
from imagefactory.settings import REPO_ROOT, Settings
from imagefactory.steps import StepLog

from .conftest import run_inv
from .records_factory import make_record


def store_files(settings: Settings) -> list[Path]:
    root = settings.store
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_certified_artifact_passes(settings: Settings) -> None:
    path = make_record(settings)
    assert refusal(records.load(path), settings.checks_dir, local_artifact=True) is None


@pytest.mark.parametrize(
    ("state", "expected"),
    [("built", r"not certified \(state built\)"), ("rejected", "rejected by certification")],
)
def test_uncertified_or_rejected_is_refused(settings: Settings, state: str, expected: str) -> None:
    path = make_record(settings, state=state)
    with pytest.raises(GateRefused, match=expected) as caught:
        publish_record(path, settings, StepLog())
    assert caught.value.exit_code == 7
    assert store_files(settings) == []
    assert records.load(path).state == state  # nothing changed


def test_no_record_is_refused(settings: Settings) -> None:
    with pytest.raises(GateRefused, match="no record at"):
        publish_record(settings.build_dir / "nowhere" / "record.json", settings, StepLog())


def test_an_artifact_changed_after_certification_is_refused(settings: Settings) -> None:
    path = make_record(settings)
    artifact = Path(records.load(path).artifact)
    with artifact.open("r+b") as fh:  # one flipped byte
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(GateRefused, match="artifact changed after certification"):
        publish_record(path, settings, StepLog())
    assert store_files(settings) == []


def test_a_certification_of_another_digest_is_refused(settings: Settings) -> None:
    path = make_record(settings)
    data = json.loads(path.read_text())
    data["certification"]["artifact_sha256"] = "f" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(GateRefused, match="certification is for sha256 ffff"):
        require_publishable(records.load(path), path, settings.checks_dir, True)


def test_a_stale_checks_version_is_refused(tmp_path: Path) -> None:
    checks = tmp_path / "checks"
    shutil.copytree(REPO_ROOT / "checks", checks, ignore=shutil.ignore_patterns("__pycache__"))
    settings = Settings(build_dir=tmp_path / "build", checks_dir=checks)
    path = make_record(settings)
    (checks / "snapd.py").write_text((checks / "snapd.py").read_text() + "\n# changed\n")
    with pytest.raises(GateRefused, match=r"certified by checks version .* re-run `inv check`"):
        publish_record(path, settings, StepLog())
    assert store_files(settings) == []


def test_inv_publish_refuses_in_one_line_with_exit_7(tmp_path: Path) -> None:
    settings = Settings(build_dir=tmp_path / "build")
    make_record(settings, state="rejected")
    result = run_inv("publish", tmp=tmp_path)
    assert result.returncode == 7, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: not publishing ") and "rejected" in lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "build" / "store").exists()


def test_publish_puts_a_certified_artifact_in_the_store(settings: Settings) -> None:
    path = make_record(settings)
    published = publish_record(path, settings, StepLog())
    assert published.state == "published" and published.publication is not None
    assert [t.state for t in published.history] == ["built", "certified", "published"]
    where = Path(published.publication.location)
    assert where == settings.store / "ubuntu-20.04" / "20261126.1"
    assert (where / "ubuntu-20.04-20261126.1.qcow2").read_bytes() == Path(
        published.artifact
    ).read_bytes()
    assert records.load(path).state == "published"
    # Publishing again is harmless: same place, still published.
    again = publish_record(path, settings, StepLog())
    assert again.publication is not None and again.publication.location == str(where)
