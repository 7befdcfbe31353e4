"""Scheduled rebuilds: skip what did not change, --force, reports, webhook, the run lock."""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from filelock import FileLock

from imagefactory import build, matrix, notify, pipeline, rebuild, records, runs
from imagefactory.publish import publish_record
from imagefactory.settings import Settings
from imagefactory.steps import StepLog

from .conftest import run_inv
from .records_factory import PACKAGES, make_record


@pytest.fixture
def focal_qemu(settings: Settings) -> matrix.Pair:
    [pair] = matrix.select_pairs(settings, ["ubuntu-20.04"], ["qemu"])
    return pair


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> list[str]:
    """Build/certify/publish replaced by a fake that publishes a new random artifact;
    returns the serials it produced. Template validation is skipped (tested elsewhere)."""
    built: list[str] = []

    def fake(pair, settings_, packer, log, refresh_base, outcome) -> None:
        serial = f"20261127.{len(built) + 1}"
        inputs = build.inputs_sha256(pair.image, pair.provider, settings_)
        path = make_record(settings_, serial=serial, inputs_sha256=inputs)
        published = publish_record(path, settings_, log)
        outcome.status, outcome.published = "published", published.publication.location
        built.append(serial)

    monkeypatch.setattr(pipeline, "_build_certify_publish", fake)
    monkeypatch.setattr(pipeline.matrix, "validate_pairs", lambda *args: None)
    return built


def archive_offers(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str]) -> list[int]:
    calls: list[int] = []

    def candidates(image, settings, packages, log) -> dict[str, str]:
        calls.append(1)
        return versions

    monkeypatch.setattr("imagefactory.archive_state.candidate_versions", candidates)
    return calls


def run(settings: Settings, pair: matrix.Pair, force: bool = False):
    return rebuild.rebuild([pair], settings, None, StepLog(), force)  # type: ignore[arg-type]


def test_first_run_builds_then_an_unchanged_image_is_skipped(
    settings: Settings, focal_qemu, fake_pipeline, monkeypatch
) -> None:
    asked = archive_offers(monkeypatch, dict(PACKAGES))
    outcomes, report = run(settings, focal_qemu)
    assert [o.status for o in outcomes] == ["published"] and fake_pipeline == ["20261127.1"]
    assert asked == []  # never published before: nothing to compare with
    outcomes, report = run(settings, focal_qemu)
    assert [o.status for o in outcomes] == ["skipped"] and fake_pipeline == ["20261127.1"]
    assert "20261127.1 is current" in outcomes[0].reason and asked == [1]
    assert report["exit_code"] == 0 and report["pairs"][0]["status"] == "skipped"


def test_a_newer_package_in_the_archive_rebuilds(
    settings: Settings, focal_qemu, fake_pipeline, monkeypatch
) -> None:
    run(settings, focal_qemu)
    archive_offers(monkeypatch, PACKAGES | {"openssh-server": "1:8.2p1-4ubuntu0.12"})
    outcomes, _ = run(settings, focal_qemu)
    assert [o.status for o in outcomes] == ["published"]
    assert fake_pipeline == ["20261127.1", "20261127.2"]


def test_changed_inputs_rebuild_without_asking_the_archive(
    settings: Settings, focal_qemu, fake_pipeline, monkeypatch
) -> None:
    make_record(settings, serial="20261126.1", inputs_sha256="0" * 64)
    publish_record(
        records.records_dir(settings.build_dir) / "ubuntu-20.04/qemu/20261126.1/record.json",
        settings,
        StepLog(),
    )
    asked = archive_offers(monkeypatch, dict(PACKAGES))
    outcomes, _ = run(settings, focal_qemu)
    assert [o.status for o in outcomes] == ["published"] and asked == []


def test_force_rebuilds_an_unchanged_image(
    settings: Settings, focal_qemu, fake_pipeline, monkeypatch
) -> None:
    run(settings, focal_qemu)
    asked = archive_offers(monkeypatch, dict(PACKAGES))
    outcomes, report = run(settings, focal_qemu, force=True)
    assert [o.status for o in outcomes] == ["published"] and asked == []
    assert report["force"] is True and len(fake_pipeline) == 2


def test_a_failed_pair_is_reported_and_the_next_pair_still_runs(
    settings: Settings, monkeypatch
) -> None:
    pairs = matrix.select_pairs(settings, ["ubuntu-20.04", "ubuntu-22.04"], ["qemu"])
    seen: list[str] = []

    def fake(pair, settings_, packer, log, refresh_base, outcome) -> None:
        seen.append(pair.image.name)
        if pair.image.name == "ubuntu-20.04":
            raise build.PackerError("packer build failed: boom")
        outcome.status, outcome.published = "published", "/store/x"

    monkeypatch.setattr(pipeline, "_build_certify_publish", fake)
    monkeypatch.setattr(pipeline.matrix, "validate_pairs", lambda *args: None)
    outcomes, report = rebuild.rebuild(pairs, settings, None, StepLog(), True)  # type: ignore[arg-type]
    assert seen == ["ubuntu-20.04", "ubuntu-22.04"]
    assert [o.status for o in outcomes] == ["failed", "published"]
    assert report["exit_code"] == 5  # Packer's exit code, the first failure's
    table = pipeline.summary_table(outcomes)
    assert "packer build failed: boom" in table and "/store/x" in table


def test_reports_are_written_as_json_and_junit(settings: Settings, focal_qemu, fake_pipeline):
    _, report = run(settings, focal_qemu)
    path = rebuild.write_reports(report, settings.build_dir / "reports")
    saved = json.loads(path.read_text())
    assert saved == json.loads((path.parent / "rebuild-latest.json").read_text())
    pair = saved["pairs"][0]
    assert {pair["image"], pair["provider"], pair["status"]} == {
        "ubuntu-20.04",
        "qemu",
        "published",
    }
    assert pair["published"].endswith("ubuntu-20.04/20261127.1")
    assert set(saved) >= {"started", "finished", "duration_s", "exit_code", "pairs", "force"}
    suite = ET.parse(path.with_suffix(".xml")).getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    assert suite.find("testcase").get("name") == "ubuntu-20.04 on qemu"


# --- the webhook --------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.bodies.append(json.loads(body))  # type: ignore[attr-defined]
        status = self.server.statuses.pop(0) if self.server.statuses else 200  # type: ignore[attr-defined]
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadingHTTPServer]:
    monkeypatch.setattr(notify, "BACKOFF_S", 0.0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.bodies, server.statuses = [], []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/hook?token=s3cret"


def quiet_log() -> StepLog:
    return StepLog(out=io.StringIO())


def said(log: StepLog) -> str:
    return log.out.getvalue()  # type: ignore[attr-defined]


def test_webhook_gets_the_report_after_retrying_429_and_500(hook, caplog) -> None:
    hook.statuses += [429, 500]
    log = quiet_log()
    assert notify.post_report(url(hook), {"exit_code": 1}, log) is True
    assert hook.bodies == [{"exit_code": 1}] * 3
    assert "s3cret" not in said(log) + caplog.text


def test_a_failing_webhook_only_warns(hook, caplog) -> None:
    hook.statuses += [500] * 10
    log = quiet_log()
    assert notify.post_report(url(hook), {"exit_code": 1}, log) is False
    assert "warning: webhook http://127.0.0.1" in said(log) and "HTTP 500" in said(log)
    assert "s3cret" not in said(log) + caplog.text
    # Only scheme, host and port: a Slack-style webhook's secret is its path.
    assert "/hook" not in said(log) + caplog.text
    assert len(hook.bodies) == notify.RETRIES + 1


def test_an_unreachable_or_slow_webhook_only_warns(monkeypatch) -> None:
    monkeypatch.setattr(notify, "BACKOFF_S", 0.0)
    monkeypatch.setattr(notify, "TIMEOUT_S", (0.5, 0.5))
    log = quiet_log()
    with socket_that_never_answers() as port:
        assert notify.post_report(f"http://127.0.0.1:{port}/", {}, log) is False
    assert "not notified: ConnectionError" in said(log)
    with socket_that_never_answers() as port:
        pass  # closed now: connection refused
    assert notify.post_report(f"http://127.0.0.1:{port}/", {}, log) is False


class socket_that_never_answers:
    """A listening socket that accepts and then says nothing (a hung endpoint)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_notify_follows_webhook_on(hook, settings: Settings) -> None:
    ok = {"exit_code": 0}
    failure = Settings(build_dir=settings.build_dir, webhook_url=url(hook))
    assert rebuild.notify(ok, failure, StepLog()) is None  # success is not news by default
    assert rebuild.notify({"exit_code": 6}, failure, StepLog()) is True
    always = Settings(build_dir=settings.build_dir, webhook_url=url(hook), webhook_on="always")
    assert rebuild.notify(ok, always, StepLog()) is True
    assert [b["exit_code"] for b in hook.bodies] == [6, 0]


def test_a_bad_webhook_setting_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_inv("rebuild", env={"INVOKE_FACTORY_WEBHOOK_ON": "bogus"}, tmp=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: invoke.yaml: factory.webhook_on: 'bogus' (allowed: failure, always)"
    )


@pytest.mark.parametrize(
    ("webhook", "problem"),
    [
        ("http://hooks.example:99999/T0/B0/s3cret", "its port is not a number from 1 to 65535"),
        ("http:///T0/B0/s3cret", "not an http(s) URL with a host"),
        ("ftp://hooks.example/T0/B0/s3cret", "not an http(s) URL with a host"),
        (
            "https://hooks.example/T0/B0/s3cret\nX-Injected: 1",
            "contains whitespace or control characters",
        ),
    ],
)
def test_a_bad_webhook_url_is_refused_at_load_without_quoting_it(tmp_path, webhook, problem):
    result = run_inv("rebuild", env={"INVOKE_FACTORY_WEBHOOK_URL": webhook}, tmp=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: invoke.yaml: factory.webhook_url: {problem}"
    assert not (tmp_path / "build").exists()


# --- one run at a time ----------------------------------------------------------------------


def test_a_second_run_exits_at_once_with_its_own_code(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    with FileLock(build_dir / runs.LOCK_NAME):
        (build_dir / f"{runs.LOCK_NAME}.owner").write_text(
            json.dumps({"pid": 4242, "purpose": "inv rebuild", "since": "2026-11-26T00:00:00Z"})
        )
        started = time.monotonic()
        result = run_inv("rebuild", tmp=tmp_path)
        elapsed = time.monotonic() - started
    assert result.returncode == 75, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: another run holds ") and "inv rebuild, pid 4242" in line
    assert elapsed < 60  # at once: it did not wait for the lock


def test_sweep_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    settings = Settings(build_dir=tmp_path / "build")
    done = make_record(settings, state="built").parent
    (done / "work").mkdir()
    (done / "check-abc123").mkdir()
    half = records.records_dir(settings.build_dir) / "ubuntu-20.04" / "qemu" / "20261126.2"
    (half / "work").mkdir(parents=True)
    # A stand-in for a QEMU orphaned by a killed Packer: named like QEMU, using the build dir.
    qemu = subprocess.Popen(
        ["bash", "-c", f'exec -a qemu-system-x86_64 {sys.executable} -c "import time; '
         f'time.sleep(300)" -drive file={half}/work/disk.qcow2'],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not runs.qemu_processes(settings.build_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runs.qemu_processes(settings.build_dir) == [qemu.pid]
        with runs.exclusive(settings.build_dir, "test", StepLog()):
            pass
        assert qemu.wait(timeout=10) == -signal.SIGKILL
    finally:
        qemu.kill()
    assert not half.exists() and not (done / "work").exists()
    assert not (done / "check-abc123").exists() and (done / "record.json").is_file()
    assert not (settings.build_dir / f"{runs.LOCK_NAME}.owner").exists()


# --- the matrix for CI fan-out ---------------------------------------------------------------


def test_matrix_prints_every_pair_for_a_ci_matrix(tmp_path: Path) -> None:
    result = run_inv("matrix", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    include = json.loads(result.stdout)["include"]
    assert len(include) == 4 * 8 and {"image": "ubuntu-26.04", "provider": "qemu"} in include
    assert all(set(item) == {"image", "provider"} for item in include)


def test_the_default_schedule_is_every_release_on_qemu(tmp_path: Path) -> None:
    result = run_inv("matrix", "--scheduled", tmp=tmp_path)
    assert json.loads(result.stdout)["include"] == [
        {"image": f"ubuntu-{release}", "provider": "qemu"}
        for release in ("20.04", "22.04", "24.04", "26.04")
    ]


def test_image_all_and_repeated_images_select_each_release_once(settings) -> None:
    assert matrix.image_names(settings, None) == ["ubuntu-20.04"]  # factory.default_image
    assert matrix.image_names(settings, ["all"]) == [
        "ubuntu-20.04", "ubuntu-22.04", "ubuntu-24.04", "ubuntu-26.04",
    ]  # fmt: skip
    assert matrix.image_names(settings, ["ubuntu-24.04", "ubuntu-20.04", "ubuntu-24.04"]) == [
        "ubuntu-24.04",
        "ubuntu-20.04",
    ]
    other = dataclasses.replace(settings, default_image="ubuntu-26.04")
    assert matrix.image_names(other, None) == ["ubuntu-26.04"]


def test_a_provider_named_twice_by_its_aliases_is_selected_once(settings) -> None:
    """`-p do -p digitalocean` must not build and publish the same image twice."""
    pairs = matrix.select_pairs(
        settings, ["ubuntu-22.04"], ["do", "qemu", "digitalocean", "local", "ec2", "aws"]
    )
    assert [p.provider.name for p in pairs] == ["digitalocean", "qemu", "amazon-ebs"]


def test_a_default_image_that_is_not_defined_is_refused(tmp_path: Path) -> None:
    result = run_inv("pipeline", env={"INVOKE_FACTORY_DEFAULT_IMAGE": "ubuntu-18.04"}, tmp=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "error: factory.default_image: 'ubuntu-18.04' is not an image in"
    )
    assert "ubuntu-26.04" in result.stderr


def test_matrix_scheduled_follows_the_schedule_setting(tmp_path: Path) -> None:
    env = {"INVOKE_FACTORY_SCHEDULE": "ubuntu-22.04:hcloud, ubuntu-20.04:qemu"}
    result = run_inv("matrix", "--scheduled", env=env, tmp=tmp_path)
    assert json.loads(result.stdout)["include"] == [
        {"image": "ubuntu-22.04", "provider": "hcloud"},
        {"image": "ubuntu-20.04", "provider": "qemu"},
    ]
    bad = run_inv("matrix", "--scheduled", env={"INVOKE_FACTORY_SCHEDULE": "focal"}, tmp=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: factory.schedule: 'focal' is not IMAGE:PROVIDER (e.g. ubuntu-20.04:qemu)"
    )
