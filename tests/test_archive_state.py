"""What the archive would install today: apt in a private state directory, against a signed
local archive served on 127.0.0.1 (no network)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagefactory import archive_state, base
from imagefactory.archive_state import (
    ArchiveStateError,
    candidate_versions,
    changed_packages,
    parse_policy,
    update_problem,
)
from imagefactory.definitions import ImageDefinition, load_image
from imagefactory.settings import REPO_ROOT, Settings

IMAGE = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")
NEEDS_APT = pytest.mark.skipif(
    not (shutil.which("apt-get") and shutil.which("gpg")),
    reason="needs apt-get and gpg (Debian packages apt, gpg)",
)

FOCAL = {
    "hello": "1.0-1",
    "strongswan": "5.8.2-1ubuntu3",
    "libc6": "2.31-0ubuntu9",
    # Installed on the host at a far newer version: the host's dpkg status must not count.
    "apt": "0.1-fake",
}
UPDATES = {"strongswan": "5.8.2-1ubuntu3.6"}
MANIFEST = {
    "hello": "1.0-1",
    "strongswan": "5.8.2-1ubuntu3",
    "libc6:amd64": "2.31-0ubuntu9",
    "apt": "0.1-fake",
    "dropped-from-archive": "2.0-1",
}


# --- a signed archive on 127.0.0.1 ----------------------------------------------------------


class Keys:
    """Two throwaway ed25519 signing keys: ``pinned`` and ``other``."""

    def __init__(self) -> None:
        # Short, under /tmp: gpg-agent's socket path must fit in sun_path.
        self.home = Path(tempfile.mkdtemp(prefix="gpg-", dir="/tmp"))
        self.pinned = self._generate("Test Archive <t@example.org>")
        self.other = self._generate("Other Archive <o@example.org>")

    def gpg(self, *args: str | Path) -> str:
        return subprocess.run(
            ["gpg", "--homedir", self.home, "--batch", "--yes", "--pinentry-mode", "loopback",
             "--passphrase", "", *args],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def _generate(self, uid: str) -> str:
        self.gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
        listing = self.gpg("--list-keys", "--with-colons", uid)
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", self.home, "--kill", "gpg-agent"], check=False)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    if not shutil.which("gpg"):
        pytest.skip("needs gpg")
    made = Keys()
    try:
        yield made
    finally:
        made.close()


class Archive:
    """A Debian-style archive (component main, amd64) whose pockets we publish and re-sign."""

    def __init__(self, root: Path, url: str, keys: Keys) -> None:
        self.root, self.url, self.keys = root, url, keys
        # Each publication's files get a later mtime: If-Modified-Since has 1 s resolution.
        self.clock = time.time() - 3600

    def publish(self, pocket: str, packages: dict[str, str], signer: str | None = None) -> None:
        dist = self.root / "dists" / pocket
        binary = dist / "main/binary-amd64"
        binary.mkdir(parents=True, exist_ok=True)
        text = "\n".join(stanza(name, version) for name, version in sorted(packages.items()))
        (binary / "Packages").write_text(text)
        (binary / "Packages.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
        release = dist / "Release"
        release.write_text(release_text(pocket, binary))
        for signed in ("InRelease", "Release.gpg"):
            (dist / signed).unlink(missing_ok=True)
        if signer is not None:
            self.sign(dist, signer)
        self.clock += 10
        for path in dist.rglob("*"):
            os.utime(path, (self.clock, self.clock))

    def sign(self, dist: Path, signer: str) -> None:
        release = dist / "Release"
        self.keys.gpg("-u", signer, "--clearsign", "--output", dist / "InRelease", release)
        self.keys.gpg("-u", signer, "--armor", "--detach-sign", "--output",
                      dist / "Release.gpg", release)  # fmt: skip


def stanza(name: str, version: str) -> str:
    deb = f"pool/main/{name[0]}/{name}/{name}_{version}_amd64.deb"
    return (
        f"Package: {name}\nArchitecture: amd64\nVersion: {version}\nPriority: optional\n"
        f"Section: misc\nMaintainer: Test <t@example.org>\nInstalled-Size: 10\n"
        f"Filename: {deb}\nSize: 1024\nSHA256: {hashlib.sha256(deb.encode()).hexdigest()}\n"
        f"Description: {name}, a test package\n"
    )


def release_text(pocket: str, binary: Path, valid_until: str | None = None) -> str:
    sums = "".join(
        f" {hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_size} "
        f"main/binary-amd64/{p.name}\n"
        for p in sorted(binary.iterdir())
    )
    until = f"Valid-Until: {valid_until}\n" if valid_until else ""
    return (
        f"Origin: Test\nLabel: Test\nSuite: {pocket}\nCodename: focal\n"
        f"Date: {formatdate(time.time() - 600, usegmt=True)}\n{until}"
        f"Architectures: amd64\nComponents: main\nDescription: test archive\nSHA256:\n{sums}"
    )


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def archive(tmp_path: Path, keys: Keys) -> Iterator[Archive]:
    """focal and focal-updates signed by the pinned key, served on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    made = Archive(root, f"http://127.0.0.1:{server.server_address[1]}/ubuntu/", keys)
    made.root = root / "ubuntu"
    made.publish("focal", FOCAL, keys.pinned)
    made.publish("focal-updates", UPDATES, keys.pinned)
    try:
        yield made
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def pinned(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive key file holds exactly the test archive's key."""
    key_file = tmp_path / "test-archive-keyring.asc"
    keys.gpg("--armor", "--output", key_file, "--export", keys.pinned)
    monkeypatch.setattr(base, "ARCHIVE_KEYRING", key_file)


def image_for(mirror: str, keys: Keys) -> ImageDefinition:
    archive = IMAGE.base.archive.model_copy(
        update={
            "mirror": mirror,
            "pockets": ["focal", "focal-updates"],
            "components": ["main"],
            "keyring_fingerprints": [keys.pinned],
        }
    )
    return IMAGE.model_copy(update={"base": IMAGE.base.model_copy(update={"archive": archive})})


def ask(archive: Archive, settings: Settings, names=MANIFEST) -> tuple[dict[str, str], list[str]]:
    said: list[str] = []
    found = candidate_versions(image_for(archive.url, archive.keys), settings, names, said.append)
    return found, said


# --- against the local archive ----------------------------------------------------------------


@NEEDS_APT
def test_candidates_are_the_highest_version_across_pockets(
    archive: Archive, settings: Settings, pinned: None
) -> None:
    found, said = ask(archive, settings, [*MANIFEST, "not-in-the-archive"])
    assert found == {
        "hello": "1.0-1",
        "strongswan": "5.8.2-1ubuntu3.6",  # focal-updates beats focal
        "libc6": "2.31-0ubuntu9",  # asked as libc6:amd64
        "apt": "0.1-fake",  # not the host's installed apt
    }
    assert "archive candidates: 4 of 6 packages known" in said


@NEEDS_APT
def test_changed_packages_finds_exactly_the_one_that_moved(
    archive: Archive, settings: Settings, pinned: None
) -> None:
    found, _ = ask(archive, settings)
    assert changed_packages(MANIFEST, found) == {
        "strongswan": ("5.8.2-1ubuntu3", "5.8.2-1ubuntu3.6")
    }


@NEEDS_APT
def test_a_second_run_reuses_the_state_and_sees_the_archive_move(
    archive: Archive, settings: Settings, pinned: None
) -> None:
    started = time.monotonic()
    ask(archive, settings)
    cold = time.monotonic() - started
    lists = archive_state.state_dir(settings, image_for(archive.url, archive.keys)) / "state/lists"
    assert any(lists.glob("*focal-updates_main_binary-amd64_Packages*"))

    started = time.monotonic()
    found, said = ask(archive, settings)
    warm = time.monotonic() - started
    assert "archive indices: 0 fetched, 2 unchanged" in said  # If-Modified-Since: 304s
    assert found["strongswan"] == "5.8.2-1ubuntu3.6" and warm < max(2 * cold, 5)

    archive.publish("focal-updates", UPDATES | {"hello": "1.0-1ubuntu1"}, archive.keys.pinned)
    found, said = ask(archive, settings)
    assert found["hello"] == "1.0-1ubuntu1"
    assert any(line.startswith("archive indices: 2 fetched, 1 unchanged") for line in said)


@NEEDS_APT
def test_a_repository_signed_by_another_key_is_refused(
    archive: Archive, settings: Settings, pinned: None
) -> None:
    archive.publish("focal-updates", UPDATES, archive.keys.other)
    with pytest.raises(ArchiveStateError) as caught:
        ask(archive, settings)
    message = str(caught.value)
    assert "\n" not in message and archive.url.rstrip("/") in message
    assert f"NO_PUBKEY {archive.keys.other[-16:]}" in message


@NEEDS_APT
def test_a_re_signed_archive_gives_no_stale_answer(
    archive: Archive, settings: Settings, pinned: None
) -> None:
    ask(archive, settings)  # good lists in the state directory
    archive.publish("focal-updates", {"strongswan": "9.9-evil"}, archive.keys.other)
    with pytest.raises(ArchiveStateError, match="NO_PUBKEY"):
        ask(archive, settings)


@NEEDS_APT
def test_an_unsigned_archive_is_refused(archive: Archive, settings: Settings, pinned: None) -> None:
    archive.publish("focal-updates", UPDATES, signer=None)
    with pytest.raises(ArchiveStateError, match=r"focal-updates.* is not signed"):
        ask(archive, settings)


@NEEDS_APT
def test_an_expired_release_is_refused_whatever_the_host_allows(
    archive: Archive, settings: Settings, pinned: None
) -> None:
    # The host's apt.conf.d may say Acquire::Check-Valid-Until "false"; it must not apply.
    dist = archive.root / "dists/focal-updates"
    expired = formatdate(time.time() - 300, usegmt=True)
    (dist / "Release").write_text(
        release_text("focal-updates", dist / "main/binary-amd64", expired)
    )
    archive.sign(dist, archive.keys.pinned)
    with pytest.raises(ArchiveStateError, match="expired"):
        ask(archive, settings)


@NEEDS_APT
def test_an_unreachable_mirror_is_one_line_naming_it(
    archive: Archive, settings: Settings, pinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_state, "RETRIES", 0)  # not 7 s of backoff
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/ubuntu"
    with pytest.raises(ArchiveStateError) as caught:
        candidate_versions(image_for(archive.url, archive.keys), Settings(
            cache_dir=settings.cache_dir, mirror=mirror), MANIFEST, lambda _: None)  # fmt: skip
    message = str(caught.value)
    assert "\n" not in message and f"apt-get update from {mirror} failed" in message
    assert "Failed to fetch" in message


@NEEDS_APT
def test_a_mirror_that_never_answers_times_out_in_one_line(
    archive: Archive, settings: Settings, pinned: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_state, "UPDATE_TIMEOUT_S", 1)
    with socket.socket() as silent:  # connections queue in the backlog, never answered
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        mirror = f"http://127.0.0.1:{silent.getsockname()[1]}/ubuntu"
        moved = Settings(cache_dir=settings.cache_dir, mirror=mirror)
        with pytest.raises(ArchiveStateError) as caught:
            candidate_versions(image_for(archive.url, archive.keys), moved, MANIFEST, print)
    assert str(caught.value) == f"apt-get update from {mirror} failed: no answer within 1 s"


def test_no_packages_asks_nothing(settings: Settings) -> None:
    assert candidate_versions(IMAGE, settings, [], lambda _: None) == {}
    assert not (settings.cache_dir / archive_state.STATE_DIR).exists()


def test_a_name_that_is_no_package_never_reaches_apt(settings: Settings) -> None:
    with pytest.raises(ArchiveStateError, match="'-oDir=/'"):
        candidate_versions(IMAGE, settings, ["hello", "-oDir=/"], lambda _: None)


# --- parsing, comparing, the configuration -----------------------------------------------------

POLICY = """\
strongswan:
  Installed: (none)
  Candidate: 5.8.2-1ubuntu3.6
  Version table:
     5.8.2-1ubuntu3.6 500
        500 http://archive.ubuntu.com/ubuntu focal-updates/main amd64 Packages
     5.8.2-1ubuntu3 500
        500 http://archive.ubuntu.com/ubuntu focal/main amd64 Packages
libc6:amd64:
  Installed: 2.36-9+deb12u10
  Candidate: 2.31-0ubuntu9.18
  Version table:
openssh-server:
  Installed: (none)
  Candidate: 1:8.2p1-4ubuntu0.13
  Version table:
     1:8.2p1-4ubuntu0.13 500
        500 http://archive.ubuntu.com/ubuntu focal-updates/main amd64 Packages
ubuntu-advantage-tools:
  Installed: (none)
  Candidate: 38ubuntu0~20.04
  Version table:
     38ubuntu0~20.04 500 (phased 10%)
        500 http://archive.ubuntu.com/ubuntu focal-updates/main amd64 Packages
mail-transport-agent:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


def test_parse_policy() -> None:
    assert parse_policy(POLICY) == {
        "strongswan": "5.8.2-1ubuntu3.6",
        "libc6": "2.31-0ubuntu9.18",
        "openssh-server": "1:8.2p1-4ubuntu0.13",
        "ubuntu-advantage-tools": "38ubuntu0~20.04",
    }
    assert parse_policy("") == {}


def test_changed_packages_strips_qualifiers_and_ignores_what_the_archive_lacks() -> None:
    candidates = {"libc6": "2.31-0ubuntu9.18", "bash": "5.0-6ubuntu1.2", "zlib1g": "1:1.2.11"}
    manifest = {
        "libc6:amd64": "2.31-0ubuntu9.17",
        "bash": "5.0-6ubuntu1.2",
        "zlib1g:amd64": "1:1.2.11",
        "tzdata:all": "2024a-0ubuntu0.20.04",
        "removed": "1.0",
    }
    assert changed_packages(manifest, candidates) == {
        "libc6:amd64": ("2.31-0ubuntu9.17", "2.31-0ubuntu9.18")
    }
    assert changed_packages({}, candidates) == {}


UPDATE_NO_PUBKEY = """\
W: GPG error: http://127.0.0.1:8000/ubuntu focal InRelease: The following signatures couldn't \
be verified because the public key is not available: NO_PUBKEY 0123456789ABCDEF
E: The repository 'http://127.0.0.1:8000/ubuntu focal InRelease' is not signed.
N: Updating from such a repository can't be done securely, and is therefore disabled by default.
"""


def test_update_problem_picks_the_telling_line() -> None:
    assert update_problem(100, UPDATE_NO_PUBKEY).startswith("GPG error: http://127.0.0.1:8000")
    unreachable = (REPO_ROOT / "tests/data/focal/apt-update-unreachable.stderr").read_text()
    assert update_problem(0, unreachable).startswith("Failed to fetch http://archive.ubuntu.com")
    assert update_problem(0, "W: Some index files failed to download.\n")
    assert update_problem(0, "W: Download is performed unsandboxed as root\n") is None
    assert update_problem(100, "") == "exit 100"


def test_apt_reads_no_host_configuration(tmp_path: Path) -> None:
    config = archive_state.apt_config(tmp_path, tmp_path / "sources.list")
    for line in ('Dir::Etc::main "/dev/null";', 'Dir::Etc::parts "/dev/null";',
                 'Dir::Etc::Trusted "/dev/null";', 'Dir::Etc::TrustedParts "/dev/null";',
                 f'Dir::State::status "{tmp_path}/state/status";'):  # fmt: skip
        assert line in config.splitlines()
    for insecure in ("allowinsecure", "trusted=yes", "allowunauthenticated", "check-valid"):
        assert insecure not in config.lower()
