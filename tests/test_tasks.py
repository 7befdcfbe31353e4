"""The tasks as a user runs them: bad input gives one line, a non-zero exit, and no files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from imagefactory.settings import REPO_ROOT

from .conftest import INV, run_inv


def assert_refused(result, code: int, *fragments: str, tmp: Path) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp / "build").exists(), "a refused run must write nothing"


def test_unknown_provider(tmp_path: Path) -> None:
    result = run_inv("render", "--provider", "linode", tmp=tmp_path)
    assert_refused(result, 2, "unknown provider 'linode'", "digitalocean", tmp=tmp_path)


def test_unknown_image(tmp_path: Path) -> None:
    result = run_inv("validate", "--image", "ubuntu-18.04", tmp=tmp_path)
    assert_refused(result, 2, "unknown image ubuntu-18.04", "ubuntu-20.04", tmp=tmp_path)


def _broken_image(images_copy: Path, text: str | None = None, change=None) -> dict[str, str]:
    path = images_copy / "ubuntu-22.04.yaml"
    if text is not None:
        path.write_text(text)
    if change is not None:
        data = yaml.safe_load(path.read_text())
        change(data)
        path.write_text(yaml.safe_dump(data))
    return {"INVOKE_FACTORY_IMAGES_DIR": str(images_copy)}


def test_malformed_yaml(tmp_path: Path, images_copy: Path) -> None:
    env = _broken_image(images_copy, text="name: ubuntu-22.04\npackages: {install: [a\n")
    result = run_inv("render", env=env, tmp=tmp_path)
    assert_refused(result, 2, "ubuntu-22.04.yaml", "malformed YAML", tmp=tmp_path)


def test_unknown_key(tmp_path: Path, images_copy: Path) -> None:
    env = _broken_image(images_copy, change=lambda d: d["service"].update(unti="x"))
    result = run_inv("render", env=env, tmp=tmp_path)
    assert_refused(
        result, 2, "ubuntu-22.04.yaml", "service.unti: unknown key", "allowed: unit", tmp=tmp_path
    )


def test_wrong_type(tmp_path: Path, images_copy: Path) -> None:
    env = _broken_image(images_copy, change=lambda d: d["packages"].update(purge="snapd"))
    result = run_inv("render", env=env, tmp=tmp_path)
    assert_refused(result, 2, "packages.purge", "valid list", tmp=tmp_path)


def test_template_with_undefined_variable(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(REPO_ROOT / "templates", templates)
    openstack = templates / "openstack.pkr.hcl.j2"
    openstack.write_text(openstack.read_text().replace("settings.flavor", "settings.flavour"))
    env = {"INVOKE_FACTORY_TEMPLATES_DIR": str(templates)}
    result = run_inv("render", env=env, tmp=tmp_path)
    assert_refused(result, 3, "openstack.pkr.hcl.j2:", "flavour", tmp=tmp_path)


@pytest.mark.parametrize("task", ["render", "validate"])
def test_packer_missing_from_path(tmp_path: Path, task: str) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = run_inv(task, env={"PATH": str(empty)}, tmp=tmp_path)
    assert_refused(result, 4, "packer not found", "apt-get install packer", tmp=tmp_path)


def test_unknown_setting(tmp_path: Path) -> None:
    config = tmp_path / "invoke.yaml"
    config.write_text("factory:\n  mirorr: http://example.invalid/ubuntu\n")
    result = run_inv("-f", str(config), "render", tmp=tmp_path)
    assert_refused(result, 2, "factory.mirorr: unknown setting", "mirror", tmp=tmp_path)


def test_help_lists_tasks_and_options(tmp_path: Path) -> None:
    listing = run_inv("--list", tmp=tmp_path)
    assert listing.returncode == 0
    for name in ("render", "validate", "bench", "test"):
        assert f"\n  {name} " in listing.stdout
    detail = run_inv("--help", "validate", tmp=tmp_path)
    assert "--image" in detail.stdout and "--provider" in detail.stdout


def test_render_writes_only_under_the_build_dir(tmp_path: Path) -> None:
    result = run_inv("render", "-i", "ubuntu-20.04", "-p", "qemu", tmp=tmp_path)
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "build" / "rendered" / "ubuntu-20.04" / "qemu"
    assert (rendered / "template.pkr.hcl").is_file()
    assert sorted(p.name for p in (rendered / "scripts").iterdir()) == [
        "00-prepare.sh", "10-upgrade.sh", "20-purge.sh", "30-strongswan.sh", "40-boot.sh",
        "80-report.sh",
        "90-cleanup.sh",
    ]  # fmt: skip


def test_a_single_image_task_refuses_all(tmp_path: Path) -> None:
    result = run_inv("build", "--image", "all", tmp=tmp_path)
    assert_refused(result, 2, "--image: this task takes one image, not all", tmp=tmp_path)


def test_an_unknown_bench_stage_names_the_stages(tmp_path: Path) -> None:
    result = run_inv("bench", "--stage", "warp", tmp=tmp_path)
    assert result.returncode == 2
    assert "allowed: matrix, build, boot, pipeline, release" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["rebuild", "--jobs", "17"], {}, "error: --jobs: 17 (allowed: 1 to 16)"),
        (["pipeline"], {"INVOKE_FACTORY_JOBS": "two"}, "factory.jobs: expected a whole number"),
    ],
)
def test_jobs_out_of_range_is_refused_before_anything_runs(tmp_path, args, env, message):
    result = run_inv(*args, env=env, tmp=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "build").exists()


def test_sigterm_stops_validate_at_once_cleans_up_and_exits_143(tmp_path: Path):
    """What systemd, cron and CI send: handled like Ctrl-C, not after every pair finished."""
    argv = tmp_path / "argv"
    env = os.environ | {
        "INVOKE_FACTORY_BUILD_DIR": str(tmp_path / "build"),
        "INVOKE_FACTORY_PACKER": str(REPO_ROOT / "tests/fakes/packer"),
        "FAKE_PACKER_SCENARIO": "hang",  # every `packer validate` hangs for 300 s
        "FAKE_PACKER_ARGV": str(argv),
        "TMPDIR": str(tmp_path),
    }
    run = subprocess.Popen([INV, "validate"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not argv.exists() or '"validate"' not in argv.read_text():
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.2)
    time.sleep(1)
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 143 and stderr.decode().strip().endswith("terminated")
    assert time.monotonic() - started < 30
    assert list(tmp_path.glob("imagefactory-validate-*")) == []  # its throwaway keys
    time.sleep(1)
    found = subprocess.run(["pgrep", "-f", str(tmp_path / "build")], capture_output=True, text=True)
    assert found.stdout == ""  # no packer validate left running


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["check", "--host", "u@h", "--port", "abc"], {}, "--port: 'abc' (allowed: 1 to 65535)"),
        (["records"], {"INVOKE_FACTORY_KEEP": "2.9"}, "factory.keep: expected a whole number"),
    ],
)
def test_a_bad_number_is_one_line(tmp_path, args, env, message):
    assert_refused(run_inv(*args, env=env, tmp=tmp_path), 2, message, tmp=tmp_path)


def test_keep_true_in_invoke_yaml_is_not_a_number(tmp_path):
    from imagefactory.errors import ConfigError
    from imagefactory.settings import Settings

    for value in (True, 2.9):
        with pytest.raises(ConfigError, match=r"factory\.keep: expected a whole number"):
            Settings.from_mapping({"keep": value})


def test_a_build_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    env = {"INVOKE_FACTORY_BUILD_DIR": str(tmp_path / "afile")}
    result = run_inv("pipeline", env=env, tmp=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: factory.build_dir: {tmp_path / 'afile'}: ")
