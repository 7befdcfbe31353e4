"""The packer-py wrapper: command lines, streaming, machine-readable parsing, failures."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from imagefactory import packer as packer_module
from imagefactory import qemu
from imagefactory.errors import GuestPanicError, PackerError, ToolMissingError
from imagefactory.packer import MachineLine, Packer, PackerVersion

FAKE = str(Path(__file__).parent / "fakes" / "packer")


def fake_packer(tmp_path: Path, scenario: str, **env: str) -> tuple[Packer, list[str], Path]:
    argv_log = tmp_path / "argv.jsonl"
    lines: list[str] = []
    environ = os.environ | {"FAKE_PACKER_SCENARIO": scenario, "FAKE_PACKER_ARGV": str(argv_log)}
    packer = Packer(FAKE, env=environ | env, secrets=env.values(), log=lines.append)
    return packer, lines, argv_log


def argv_of(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_build_command_line(tmp_path: Path) -> None:
    packer, _, argv_log = fake_packer(tmp_path, "ok")
    packer.build(tmp_path / "t.pkr.hcl", {"serial": "20261126.1", "a": "b c"}, only=["qemu.image"])
    assert argv_of(argv_log)[-1] == [
        "build", "-machine-readable",
        "-var", "serial=20261126.1", "-var", "a=b c",
        "-color=false", "-force", "-only=qemu.image",
        str(tmp_path / "t.pkr.hcl"),
    ]  # fmt: skip


def test_validate_command_line_syntax_only(tmp_path: Path) -> None:
    packer, _, argv_log = fake_packer(tmp_path, "ok")
    packer.validate(tmp_path / "t.pkr.hcl", {"serial": "1"}, syntax_only=True)
    assert argv_of(argv_log)[-1] == [
        "validate", "-machine-readable", "-var", "serial=1", "-syntax-only",
        str(tmp_path / "t.pkr.hcl"),
    ]  # fmt: skip


def test_build_returns_artifacts_and_logs_ui_lines(tmp_path: Path) -> None:
    packer, lines, _ = fake_packer(tmp_path, "ok")
    artifacts = packer.build(tmp_path / "t.pkr.hcl", {})
    assert [(a.builder, a.id, a.files) for a in artifacts] == [
        ("qemu.image", "VM", ["/out/disk.qcow2"])
    ]
    assert "==> qemu.image: building, token is " in lines


def test_secrets_are_redacted_from_the_log(tmp_path: Path) -> None:
    packer, lines, _ = fake_packer(tmp_path, "ok", HCLOUD_TOKEN="hc-secret-value-123")
    packer.build(tmp_path / "t.pkr.hcl", {})
    assert not any("hc-secret-value-123" in line for line in lines)
    assert any("<redacted>" in line for line in lines)


def test_output_streams_before_packer_exits(tmp_path: Path) -> None:
    seen: list[float] = []
    environ = os.environ | {"FAKE_PACKER_SCENARIO": "slow"}
    packer = Packer(FAKE, env=environ, log=lambda _line: seen.append(time.monotonic()))
    packer.build(tmp_path / "t.pkr.hcl", {})
    finished = time.monotonic()
    assert seen and finished - seen[0] >= 1.0, "the first line arrived only when Packer exited"


def test_a_guest_that_panicked_stops_packer_at_once(tmp_path: Path, monkeypatch) -> None:
    """Packer 1.6.6 would wait out ssh_timeout (15 min) for a guest whose kernel panicked."""
    monkeypatch.setattr(packer_module, "WATCH_INTERVAL_S", 0.1)
    packer, _, _ = fake_packer(tmp_path, "hang")
    console = tmp_path / "console.log"
    threading.Timer(
        0.5, console.write_text, ["Kernel panic - not syncing: Fatal exception"]
    ).start()
    started = time.monotonic()
    with pytest.raises(GuestPanicError, match=r"stopped: the kernel panicked \(Fatal exception\)"):
        packer.build(tmp_path / "t.pkr.hcl", {}, watch=qemu.console_watch(console))
    assert time.monotonic() - started < 30


def test_exit_zero_without_artifact_is_a_failure(tmp_path: Path) -> None:
    packer, _, _ = fake_packer(tmp_path, "no-artifact")
    with pytest.raises(PackerError, match="exited 0 but produced no artifact"):
        packer.build(tmp_path / "t.pkr.hcl", {}, only=["qemu.typo"])


def test_failure_carries_packers_error_line(tmp_path: Path) -> None:
    packer, _, _ = fake_packer(tmp_path, "fail")
    with pytest.raises(PackerError, match="Timeout waiting for SSH"):
        packer.build(tmp_path / "t.pkr.hcl", {})


def test_version_and_features(tmp_path: Path) -> None:
    packer, _, _ = fake_packer(tmp_path, "ok", FAKE_PACKER_VERSION="1.9.4")
    assert packer.version() == PackerVersion(1, 9, 4)
    assert packer.features().supports_required_plugins


def test_missing_packer() -> None:
    with pytest.raises(ToolMissingError, match="packer not found"):
        Packer("/nonexistent/packer")


def test_machine_line_unescapes_commas() -> None:
    line = MachineLine.parse("1700000000,qemu.image,ui,say,a%!(PACKER_COMMA) b\\nc\n")
    assert line == MachineLine("qemu.image", "ui", ("say", "a, b\nc"))
    assert MachineLine.parse("not machine readable") is None
