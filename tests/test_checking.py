"""checking.certify_latest: its answer is the verdict, whatever state the record is in."""

from __future__ import annotations

import pytest

from imagefactory import checking, records
from imagefactory.settings import Settings

from .records_factory import make_record

VERDICTS = [("published", True), ("published", False), ("certified", True), ("rejected", False)]


@pytest.mark.parametrize(("state", "passes"), VERDICTS)
def test_the_answer_is_whether_todays_checks_passed(settings: Settings, monkeypatch, state, passes):
    """A scheduler re-certifies a published image: "stays published" must not exit 6."""
    path = make_record(settings, state="certified" if passes else "rejected")
    record = records.load(path)
    record.state = state
    monkeypatch.setattr(checking, "certify_record", lambda *args: record)
    assert checking.certify_latest(settings, "ubuntu-20.04", "qemu", str(path), None) is passes
