"""The cloud-init-stage helper that boot.cloud_init_single_process installs (rendered from
templates/scripts/40-boot.sh.j2 and run with /bin/sh here): a stage unit hands its stage to the
one cloud-init process, falls back to running the stage itself when that process is not up, and
the apt hook puts the package's own units back when an upgrade changes cloud-init's protocol."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from imagefactory.definitions import load_image
from imagefactory.packer import PackerFeatures, PackerVersion
from imagefactory.providers import get_provider
from imagefactory.render import render_files
from imagefactory.settings import REPO_ROOT

FOCAL = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")
SOCKET_PY = "usr/lib/python3/dist-packages/cloudinit/socket.py"
OURS = [
    "etc/systemd/system/cloud-init-main.service",
    "etc/systemd/system/cloud-init.target.wants/cloud-init-main.service",
    "etc/systemd/system/cloud-init-local.service.d/50-imagefactory-single-process.conf",
    "etc/systemd/system/cloud-final.service.d/50-imagefactory-single-process.conf",
    "etc/apt/apt.conf.d/80imagefactory-cloud-init",
]


def helper_text() -> str:
    files = render_files(
        FOCAL, get_provider("qemu"), REPO_ROOT / "templates", PackerFeatures(PackerVersion(1, 6, 6))
    )
    script = files["scripts/40-boot.sh"]
    start = script.index("cat > \"$helper\" <<'SH'\n") + len("cat > \"$helper\" <<'SH'\n")
    return script[start : script.index("\nSH\n", start) + 1]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A directory standing in for /, laid out as the build leaves the image."""
    root = tmp_path / "root"
    (root / SOCKET_PY).parent.mkdir(parents=True)
    (root / SOCKET_PY).write_text("class SocketSync: ...\n")
    lib = root / "usr/local/lib/imagefactory"
    lib.mkdir(parents=True)
    (lib / "cloud-init-stage").write_text(helper_text())
    digest = hashlib.sha256((root / SOCKET_PY).read_bytes()).hexdigest()
    (lib / "cloud-init-socket.sha256").write_text(digest + "\n")
    (lib / "cloud-init-protocol").write_text("datagram\n")  # 20.04's cloud-init 24.4
    for path in OURS:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("ours\n")
    return root


def fake_tools(bin_dir: Path, main_active: bool, reply: str) -> None:
    """systemctl and nc.openbsd stand-ins: nc records its arguments and prints the reply."""
    bin_dir.mkdir(exist_ok=True)
    tools = {
        "systemctl": f"#!/bin/sh\nexit {0 if main_active else 3}\n",
        "nc.openbsd": f'#!/bin/sh\necho "$@" > "{bin_dir}/nc.args"\ncat > "{bin_dir}/nc.stdin"\n'
        f"printf '%s' \"{reply}\"\n",
    }
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def run_helper(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "IMAGEFACTORY_ROOT": str(root),
        "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
    }
    helper = root / "usr/local/lib/imagefactory/cloud-init-stage"
    return subprocess.run(
        ["sh", str(helper), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_verify_keeps_the_units_while_the_protocol_is_unchanged(root: Path) -> None:
    done = run_helper(root, "--verify")
    assert done.returncode == 0 and done.stderr == ""
    assert all((root / path).exists() for path in OURS)


def test_verify_restores_the_package_units_when_cloud_init_changes(root: Path) -> None:
    (root / SOCKET_PY).write_text("class SocketSync:  # stream sockets now\n")
    done = run_helper(root, "--verify")
    assert done.returncode == 0
    assert "stage protocol changed" in done.stderr
    assert [path for path in OURS if (root / path).exists()] == []
    assert (root / SOCKET_PY).exists(), "only our own files go"


def test_verify_restores_them_when_cloud_init_is_gone(root: Path) -> None:
    (root / SOCKET_PY).unlink()
    assert run_helper(root, "--verify").returncode == 0
    assert [path for path in OURS if (root / path).exists()] == []


def test_a_stage_is_handed_to_the_main_process(root: Path) -> None:
    fake_tools(root / "bin", main_active=True, reply="echo 'Completed stage local'; exit 0;")
    done = run_helper(root, "local", "false")
    assert done.returncode == 0 and done.stdout == "Completed stage local\n"
    share = root / "run/cloud-init/share"
    args = (root / "bin/nc.args").read_text().split()
    assert args == ["-Uu", "-W1", f"{share}/local.sock", "-s", f"{share}/local-return.sock"]


def test_from_cloud_init_25_a_stage_is_one_stream_connection(root: Path) -> None:
    # 22.04's and 24.04's cloud-init 26.x: SOCK_STREAM, the answer on the same connection.
    (root / "usr/local/lib/imagefactory/cloud-init-protocol").write_text("stream\n")
    fake_tools(root / "bin", main_active=True, reply="echo 'Completed stage network'; exit 0;")
    done = run_helper(root, "network", "false")
    assert done.returncode == 0 and done.stdout == "Completed stage network\n"
    args = (root / "bin/nc.args").read_text().split()
    assert args == ["-U", f"{root}/run/cloud-init/share/network.sock"]
    # Exactly what cloud-init reads: an unread newline turns its close into a reset, and
    # 22.04's nc then drops the answer (seen on the first 22.04 certification here).
    assert (root / "bin/nc.stdin").read_bytes() == b"start"


def test_the_main_process_exit_status_becomes_the_units(root: Path) -> None:
    fake_tools(root / "bin", main_active=True, reply="echo 'fatal error'; exit 1;")
    done = run_helper(root, "network", "true")
    assert done.returncode == 1 and done.stdout == "fatal error\n"


def test_no_answer_fails_the_stage_instead_of_passing_it(root: Path) -> None:
    fake_tools(root / "bin", main_active=True, reply="")
    done = run_helper(root, "config", "true")
    assert done.returncode == 1
    assert "cloud-init did not answer for its config stage" in done.stderr


def test_without_the_main_process_the_stage_runs_on_its_own(root: Path) -> None:
    fake_tools(root / "bin", main_active=False, reply="unused")
    marker = root / "ran"
    done = run_helper(root, "final", "sh", "-c", f"echo final > {marker}")
    assert done.returncode == 0 and marker.read_text() == "final\n"
    assert "not running: running this stage on its own" in done.stderr
    assert not (root / "bin/nc.args").exists()
