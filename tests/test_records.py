"""Records on disk: one unreadable record is named, listed as such, and hides no other."""

from __future__ import annotations

import json
from pathlib import Path

from imagefactory import records
from imagefactory.publish import publishable_records
from imagefactory.settings import Settings

from .conftest import run_inv
from .records_factory import make_record


def two_records_one_truncated(tmp_path: Path) -> tuple[Settings, Path, Path]:
    settings = Settings(build_dir=tmp_path / "build")
    good = make_record(settings, serial="20261201.1", image="ubuntu-22.04")
    bad = make_record(settings, serial="20261201.1")
    bad.write_text(bad.read_text()[:100])  # a disk filled up mid-write, say
    return settings, good, bad


def test_a_truncated_record_is_listed_as_unreadable_beside_the_others(tmp_path: Path):
    _, good, bad = two_records_one_truncated(tmp_path)
    result = run_inv("records", "--json", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["record"]: row for row in json.loads(result.stdout)}
    assert rows[str(good)]["state"] == "certified"
    assert rows[str(bad)]["state"] == "unreadable"
    assert rows[str(bad)]["image"] == "ubuntu-20.04" and "JSON" in rows[str(bad)]["problem"]
    assert f"warning: {bad}: unreadable record" in result.stderr
    table = run_inv("records", tmp=tmp_path)
    assert table.returncode == 0 and "unreadable" in table.stdout


def test_the_unreadable_record_names_its_field(tmp_path: Path):
    settings, _, bad = two_records_one_truncated(tmp_path)
    data = json.loads(make_record(settings, serial="20261201.2").read_text())
    data["size"] = "big"
    bad.write_text(json.dumps(data))
    [(path, problem)] = records.scan(settings.build_dir)[1]
    assert path == bad and problem.startswith("unreadable record: size: ")


def test_publishing_the_others_goes_on(tmp_path: Path):
    settings, good, _ = two_records_one_truncated(tmp_path)
    assert publishable_records(settings, "ubuntu-22.04", "qemu") == [good]
    assert publishable_records(settings, "ubuntu-20.04", "qemu") == []
