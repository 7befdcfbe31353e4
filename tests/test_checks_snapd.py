"""checks/snapd.py: purge logic against apt output recorded in a focal guest; the pin proven
with this host's real apt against the check's stand-in archive and the pin stanza the build
writes (tests/golden/ubuntu-20.04.20-purge.sh)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from .guest import guest_module

ROOT = Path(__file__).resolve().parents[1]
FOCAL = ROOT / "tests" / "data" / "focal"


snapd = guest_module("snapd")
checklib = guest_module("checklib")


def build_pin_file() -> str:
    """The preferences file the build's purge script writes (rendered golden copy)."""
    script = (ROOT / "tests" / "golden" / "ubuntu-20.04.20-purge.sh").read_text()
    return re.search(r"<<'PIN'\n(.*?)\nPIN\n", script, re.S).group(1)


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("install ok installed", "installed"),
        ("deinstall ok config-files", "config-files"),
        ("unknown ok not-installed", "absent"),
        (None, "absent"),
        ("hold ok half-installed", "installed"),
    ],
)
def test_package_state(status: str | None, state: str) -> None:
    assert snapd.package_state(status) == state


@pytest.mark.parametrize(
    ("recording", "candidate", "known"),
    [
        ("apt-cache-policy.pinned", None, True),
        ("apt-cache-policy.unpinned", "2.67.1+20.04", True),
    ],
)
def test_policy_candidate_from_recorded_apt(recording: str, candidate, known: bool) -> None:
    assert snapd.policy_candidate((FOCAL / recording).read_text()) == (candidate, known)


def test_policy_without_lists_knows_nothing() -> None:
    # Without lists apt-cache policy prints nothing for an unknown package.
    assert snapd.policy_candidate("") == (None, False)


def test_the_recorded_pinned_install_fails_for_the_pin() -> None:
    recorded = (FOCAL / "apt-get-install-s.pinned").read_text()
    assert recorded.startswith("exit 100")
    assert "E: Package 'snapd' has no installation candidate" in recorded


def stand_in(tmp_path: Path, preferences: str | None) -> object:
    """The check's private apt on this host, with ``preferences`` as the image's pin file."""
    etc = tmp_path / "etc-apt"
    (etc / "preferences.d").mkdir(parents=True)
    (etc / "apt.conf.d").mkdir()
    (etc / "apt.conf.d" / "15update-stamp").write_text(
        'APT::Update::Post-Invoke-Success {"touch /var/lib/apt/periodic/update-success-stamp";};'
    )
    if preferences is not None:
        (etc / "preferences.d" / "imagefactory-pin-away").write_text(preferences)
    work = tmp_path / "work"
    work.mkdir()
    return snapd.StandInArchive(work, "focal", "20.04", "amd64", etc=str(etc))


needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt")


@needs_apt
def test_apt_refuses_the_stand_in_under_the_builds_pin(tmp_path: Path) -> None:
    problems, data = snapd.check_pins(["snapd"], stand_in(tmp_path, build_pin_file()))
    assert problems == []
    assert data["snapd"]["candidate"] is None and data["snapd"]["apt_install_exit"] != 0


@needs_apt
def test_without_the_pin_apt_would_install_it(tmp_path: Path) -> None:
    problems, _ = snapd.check_pins(["snapd"], stand_in(tmp_path, None))
    newest = snapd.STAND_IN_VERSION.format(n=len(snapd.POCKETS) - 1)
    assert problems == [f"apt does not refuse snapd (it would install {newest})"]


@needs_apt
@pytest.mark.parametrize(
    ("pin", "refused"),
    [
        ("Package: snapd\nPin: version *\nPin-Priority: -10\n", True),
        ("Package: snap*\nPin: origin *\nPin-Priority: -1\n", True),
        ("Package: /^snap/\nPin: release a=*\nPin-Priority: -1\n", True),
        ("Package: lxd snapd\nPin: release *\nPin-Priority: -1\n", True),
        ("Package: *\nPin: release *\nPin-Priority: 500\n\n"
         "Package: snapd\nPin: release *\nPin-Priority: -1\n", True),
        ("Package: snapd\nPin: release a=focal-updates\nPin-Priority: -1\n", False),
        ("Package: snapd\nPin: version 2.*\nPin-Priority: -1\n", False),
        ("Package: snapd\nPin: release *\nPin-Priority: 100\n", False),
        ("# Package: snapd\n# Pin: release *\n# Pin-Priority: -1\n", False),
    ],
)  # fmt: skip
def test_apt_itself_judges_each_pin(tmp_path: Path, pin: str, refused: bool) -> None:
    """Real apt on this host, against the stand-in: narrower pins leave a snapd through."""
    problems, _ = snapd.check_pins(["snapd"], stand_in(tmp_path, pin))
    if refused:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith("apt does not refuse snapd")


@needs_apt
def test_the_stand_in_keeps_apt_state_and_hooks_private(tmp_path: Path) -> None:
    apt = stand_in(tmp_path, build_pin_file())
    snapd.check_pins(["snapd"], apt)
    parts = apt.root / "apt.conf.d"
    config = (parts / sorted(p.name for p in parts.iterdir())[-1]).read_text()
    assert f'Dir::State::Lists "{apt.root}/lists";' in config
    assert "#clear APT::Update::Post-Invoke-Success;" in config
    # Every pocket of the release is offered, with Ubuntu's release fields.
    sources = (apt.root / "sources.list").read_text().splitlines()
    assert [line.split()[3] for line in sources] == [
        "focal", "focal-updates", "focal-security", "focal-backports", "focal-proposed",
    ]  # fmt: skip
    release = (apt.root / "repo/dists/focal-security/Release").read_text()
    assert "Origin: Ubuntu\nLabel: Ubuntu\nSuite: focal-security\nVersion: 20.04\n" in release
    assert oct(os.stat(apt.root.parent).st_mode & 0o777) == "0o711"


def test_nothing_expected_is_a_skip(tmp_path: Path) -> None:
    result = snapd.check(checklib.Context({"packages": None}, tmp_path))
    assert result.status == "skip"
