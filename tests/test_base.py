"""Base images: key pinning, cache keys and entries, cloud-image verification, the runner.

The e2e test builds the real focal base with mmdebstrap and boots it under QEMU.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from imagefactory import base
from imagefactory.base import (
    ARCHIVE_KEYRING,
    CLOUD_IMAGE_KEYRING,
    QCOW2_NAME,
    BaseBuildError,
    KeyringError,
    MirrorError,
    MissingSuiteError,
    VerificationError,
    base_inputs,
    build_base,
    cache_entry,
    cache_key,
    configure_tree,
    fetch_cloud_image,
    hygiene_problems,
    mmdebstrap_command,
    pinned_keyring,
    release_dates,
)
from imagefactory.definitions import CloudImageBase, ImageDefinition, load_image
from imagefactory.errors import ToolMissingError
from imagefactory.runner import CommandError, require_tool, run
from imagefactory.settings import REPO_ROOT, Settings, default_cache_dir
from imagefactory.steps import StepLog

IMAGE = load_image(REPO_ROOT / "images" / "ubuntu-20.04.yaml")
PINNED = list(IMAGE.base.archive.keyring_fingerprints)


def quiet_log() -> StepLog:
    return StepLog(out=io.StringIO())


def with_archive(image: ImageDefinition, **changes: object) -> ImageDefinition:
    archive = image.base.archive.model_copy(update=changes)
    return image.model_copy(update={"base": image.base.model_copy(update={"archive": archive})})


def key_fingerprints(keyring: Path) -> list[str]:
    out = subprocess.run(
        ["gpg", "--show-keys", "--with-colons", keyring], capture_output=True, text=True
    ).stdout
    lines = out.splitlines()
    # The fingerprint line that follows each primary key (not its subkeys).
    return [
        lines[i + 1].split(":")[9]
        for i, line in enumerate(lines)
        if line.startswith("pub:") and lines[i + 1].startswith("fpr:")
    ]


# --- throwaway signing keys and a local download server ---------------------------------------


class GpgKeys:
    """Two throwaway signing keys (A, B) in their own GNUPGHOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.a = self._generate("Test Key A <a@example.invalid>")
        self.b = self._generate("Test Key B <b@example.invalid>")

    def _gpg(self, *args: str | Path) -> str:
        env = os.environ | {"GNUPGHOME": str(self.home)}
        return subprocess.run(
            ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args],
            env=env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def _generate(self, uid: str) -> str:
        self._gpg("--quick-gen-key", uid, "ed25519", "sign", "never")
        listing = self._gpg("--list-keys", "--with-colons", uid)
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))

    def export(self, path: Path, *fingerprints: str, armor: bool = True) -> Path:
        self._gpg(*(["--armor"] if armor else []), "--output", path, "--export", *fingerprints)
        return path

    def sign(self, fingerprint: str, data: Path, signature: Path) -> None:
        self._gpg("--yes", "-u", fingerprint, "--detach-sign", "--output", signature, data)

    def stop(self) -> None:
        env = os.environ | {"GNUPGHOME": str(self.home)}
        subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)


@pytest.fixture(scope="module")
def gpg_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgKeys]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    keys = GpgKeys(home)
    try:
        yield keys
    finally:
        keys.stop()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- archive key pinning ---------------------------------------------------------------------


def test_committed_archive_keys_are_exactly_the_pinned_ones(tmp_path: Path) -> None:
    keyring = tmp_path / "archive.gpg"
    assert pinned_keyring(ARCHIVE_KEYRING, PINNED, keyring) == PINNED
    assert sorted(key_fingerprints(keyring)) == sorted(PINNED)


def test_committed_cloud_image_key_matches_the_pin(tmp_path: Path) -> None:
    assert IMAGE.base.cloud_image is not None
    pins = IMAGE.base.cloud_image.keyring_fingerprints
    assert pinned_keyring(CLOUD_IMAGE_KEYRING, pins, tmp_path / "cloud.gpg") == pins


def test_a_wrong_fingerprint_is_refused(tmp_path: Path) -> None:
    wrong = [*PINNED[:-1], PINNED[-1][:-1] + ("0" if PINNED[-1][-1] != "0" else "1")]
    with pytest.raises(KeyringError, match=f"missing {wrong[-1]}"):
        pinned_keyring(ARCHIVE_KEYRING, wrong, tmp_path / "k.gpg")
    assert not (tmp_path / "k.gpg").exists()


def test_an_extra_key_in_the_archive_key_file_is_refused(tmp_path: Path, gpg_keys) -> None:
    mixed = tmp_path / "mixed.asc"
    extra = gpg_keys.export(tmp_path / "a.asc", gpg_keys.a).read_text()
    mixed.write_text(ARCHIVE_KEYRING.read_text() + extra)
    with pytest.raises(KeyringError, match=gpg_keys.a):
        pinned_keyring(mixed, PINNED, tmp_path / "k.gpg")


def test_build_base_refuses_a_key_file_of_other_keys(settings: Settings, gpg_keys) -> None:
    other = gpg_keys.export(settings.cache_dir.parent / "other.asc", gpg_keys.a)
    with pytest.raises(KeyringError, match="do not match the pinned fingerprints"):
        build_base(IMAGE, settings, quiet_log(), key_file=other)
    assert [p.name for p in (settings.cache_dir / "base").iterdir() if p.is_dir()] == []


def test_an_unreachable_mirror_is_one_line_naming_it(settings: Settings) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/ubuntu"
    with pytest.raises(MirrorError) as caught:
        build_base(IMAGE, Settings(cache_dir=settings.cache_dir, mirror=mirror), quiet_log())
    assert mirror in str(caught.value)
    assert "\n" not in str(caught.value)


def _mirror_with(root: Path, *suites: str) -> str:
    for suite in suites:
        (root / "dists" / suite).mkdir(parents=True)
        (root / "dists" / suite / "InRelease").write_text("signed\n")
    return f"file://{root}"


def test_a_pocket_the_mirror_lacks_is_refused_naming_it(settings: Settings, tmp_path) -> None:
    mirror = _mirror_with(tmp_path / "mirror", "focal", "focal-updates")  # no focal-security
    with pytest.raises(MissingSuiteError) as caught:
        build_base(IMAGE, Settings(cache_dir=settings.cache_dir, mirror=mirror), quiet_log())
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert f"{mirror} has no pocket focal-security of focal" in message
    assert [p.name for p in (settings.cache_dir / "base").iterdir() if p.is_dir()] == []


def test_a_codename_the_mirror_lacks_is_refused_naming_it(settings: Settings, tmp_path) -> None:
    mirror = _mirror_with(tmp_path / "mirror", "focal", "focal-updates", "focal-security")
    pockets = ["nosuch", "nosuch-updates"]
    image = with_archive(IMAGE, pockets=pockets).model_copy(update={"codename": "nosuch"})
    with pytest.raises(MissingSuiteError, match="has no pocket nosuch of nosuch"):
        build_base(image, Settings(cache_dir=settings.cache_dir, mirror=mirror), quiet_log())


def test_mmdebstrap_trusts_only_the_pinned_keyring(tmp_path: Path) -> None:
    keyring = tmp_path / "pinned.gpg"
    argv = mmdebstrap_command(base_inputs(IMAGE, Settings()), keyring, tmp_path / "tree")
    assert f"--keyring={keyring}" in argv
    joined = " ".join(argv).lower()
    for insecure in ("allowinsecure", "allow-insecure", "trusted=yes", "check-gpg", "allowunauth"):
        assert insecure not in joined
    assert "--include=" in joined and "linux-image-virtual" in joined
    mirror = IMAGE.base.archive.mirror
    assert argv[-3:] == [
        f"deb {mirror} focal main universe",
        f"deb {mirror} focal-updates main universe",
        f"deb {mirror} focal-security main universe",
    ]


# --- cache key -------------------------------------------------------------------------------


def key_of(image: ImageDefinition, settings: Settings | None = None) -> str:
    return cache_key(base_inputs(image, settings or Settings()))


def test_cache_key_ignores_what_does_not_change_the_base(tmp_path: Path) -> None:
    reference = key_of(IMAGE)
    archive = IMAGE.base.archive
    same = [
        key_of(IMAGE, Settings(build_dir=tmp_path / "b", cache_dir=tmp_path / "c")),
        # The mirror actually used is the same one.
        key_of(IMAGE, Settings(mirror=archive.mirror + "/")),
        key_of(with_archive(IMAGE, packages=list(reversed(archive.packages)))),
        key_of(with_archive(IMAGE, packages=[*archive.packages, archive.packages[0]])),
        # The image layer (what Packer installs on top) is not part of the base.
        key_of(IMAGE.model_copy(update={"checks": IMAGE.checks.model_copy(update={"xfrm": None})})),
    ]
    assert same == [reference] * len(same)


@pytest.mark.parametrize(
    "change",
    [
        "mirror-setting",
        "pockets",
        "components",
        "packages",
        "kernel_flavour",
        "disk_size",
        "fingerprints",
        "codename",
        "builder_version",
    ],
)
def test_cache_key_changes_with_each_input(change: str, monkeypatch) -> None:
    reference = key_of(IMAGE)
    archive = IMAGE.base.archive
    settings = Settings()
    image = IMAGE
    if change == "mirror-setting":
        settings = Settings(mirror="http://mirror.example.invalid/ubuntu")
    elif change == "pockets":
        image = with_archive(IMAGE, pockets=archive.pockets[:2])
    elif change == "components":
        image = with_archive(IMAGE, components=["main"])
    elif change == "packages":
        image = with_archive(IMAGE, packages=[*archive.packages, "vim"])
    elif change == "kernel_flavour":
        image = IMAGE.model_copy(update={"kernel_flavour": "kvm"})
    elif change == "disk_size":
        image = with_archive(IMAGE, disk_size="5G")
    elif change == "fingerprints":
        image = with_archive(IMAGE, keyring_fingerprints=PINNED[:1])
    elif change == "codename":
        image = IMAGE.model_copy(update={"codename": "jammy"})
    elif change == "builder_version":
        monkeypatch.setattr(base, "BUILDER_VERSION", base.BUILDER_VERSION + 1)
    assert key_of(image, settings) != reference


# --- cache entries (the heavy build replaced by a fake) --------------------------------------


class FakeBuild:
    """Stands in for mmdebstrap + disk + convert: writes a qcow2-sized blob, counts calls."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, work: Path, result: Path, inputs, keyring: Path, log) -> dict:
        self.calls += 1
        time.sleep(self.delay)
        if self.fail:
            raise BaseBuildError("fake build failed")
        (result / QCOW2_NAME).write_bytes(os.urandom(4096))
        dates = {pocket: "2026-01-01T00:00:00Z" for pocket in inputs["pockets"]}
        return {"release_dates": dates, "kernel": "5.4.0-1-generic"}


@pytest.fixture
def fake_build(monkeypatch) -> FakeBuild:
    fake = FakeBuild()
    monkeypatch.setattr(base, "_preflight", lambda *args: None)
    monkeypatch.setattr(base, "_build_into", fake)
    return fake


def entry_of(settings: Settings) -> Path:
    return cache_entry(settings, IMAGE.name, key_of(IMAGE, settings))


def test_a_second_build_is_a_cache_hit(settings: Settings, fake_build: FakeBuild) -> None:
    first = build_base(IMAGE, settings, quiet_log())
    log = quiet_log()
    second = build_base(IMAGE, settings, log)
    assert fake_build.calls == 1
    assert (first.from_cache, second.from_cache) == (False, True)
    assert second.sha256 == first.sha256 == hashlib.sha256(first.path.read_bytes()).hexdigest()
    assert second.release_dates == {p: "2026-01-01T00:00:00Z" for p in IMAGE.base.archive.pockets}
    assert "cache hit" in log.out.getvalue()
    manifest = json.loads((first.path.parent / "manifest.json").read_text())
    assert manifest["inputs"] == base_inputs(IMAGE, settings)


def test_a_corrupted_cache_entry_is_rebuilt(settings: Settings, fake_build: FakeBuild) -> None:
    first = build_base(IMAGE, settings, quiet_log())
    data = bytearray(first.path.read_bytes())
    data[100] ^= 0xFF
    first.path.write_bytes(bytes(data))
    log = quiet_log()
    second = build_base(IMAGE, settings, log)
    assert fake_build.calls == 2
    assert not second.from_cache
    assert "does not match its sha256" in log.out.getvalue()
    assert hashlib.sha256(second.path.read_bytes()).hexdigest() == second.sha256


def test_an_entry_without_manifest_is_rebuilt(settings: Settings, fake_build: FakeBuild) -> None:
    entry = entry_of(settings)
    entry.mkdir(parents=True)
    (entry / QCOW2_NAME).write_bytes(b"half a disk")
    built = build_base(IMAGE, settings, quiet_log())
    assert fake_build.calls == 1
    assert built.path.read_bytes() != b"half a disk"


def test_refresh_rebuilds_and_replaces(settings: Settings, fake_build: FakeBuild) -> None:
    first = build_base(IMAGE, settings, quiet_log())
    second = build_base(IMAGE, settings, quiet_log(), refresh=True)
    assert fake_build.calls == 2
    assert second.path == first.path and second.sha256 != first.sha256
    assert [p.name for p in first.path.parent.parent.iterdir() if p.is_dir()] == [
        first.path.parent.name
    ]


def test_a_failed_build_leaves_no_entry(settings: Settings, fake_build: FakeBuild) -> None:
    fake_build.fail = True
    with pytest.raises(BaseBuildError):
        build_base(IMAGE, settings, quiet_log())
    assert [p for p in (settings.cache_dir / "base").iterdir() if p.is_dir()] == []


def test_a_failed_refresh_keeps_the_previous_entry(
    settings: Settings, fake_build: FakeBuild
) -> None:
    first = build_base(IMAGE, settings, quiet_log())
    fake_build.fail = True
    with pytest.raises(BaseBuildError):
        build_base(IMAGE, settings, quiet_log(), refresh=True)
    assert build_base(IMAGE, settings, quiet_log()).sha256 == first.sha256


def test_concurrent_runs_build_once(settings: Settings, fake_build: FakeBuild) -> None:
    fake_build.delay = 0.5
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(build_base(IMAGE, settings, quiet_log())))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake_build.calls == 1
    assert len({r.sha256 for r in results}) == 1 and len(results) == 3


# --- what goes into the tree -----------------------------------------------------------------

CLEARSIGNED = """\
-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA512

Origin: Ubuntu
Suite: {suite}
Codename: focal
Date: {date}
-----BEGIN PGP SIGNATURE-----
"""


def test_release_dates_come_from_each_pocket(tmp_path: Path) -> None:
    for suite, date in [
        ("focal", "Thu, 23 Apr 2020 17:33:17 UTC"),
        ("focal-updates", "Thu, 29 Oct 2026 23:48:55 UTC"),
    ]:
        name = f"archive.ubuntu.com_ubuntu_dists_{suite}_InRelease"
        (tmp_path / name).write_text(CLEARSIGNED.format(suite=suite, date=date))
    assert release_dates(tmp_path, ["focal", "focal-updates"]) == {
        "focal": "2020-04-23T17:33:17Z",
        "focal-updates": "2026-10-29T23:48:55Z",
    }
    with pytest.raises(BaseBuildError, match="focal-security"):
        release_dates(tmp_path, ["focal", "focal-security"])


def fake_tree(root: Path) -> Path:
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("secret")
    (root / "etc/shadow").write_text("root:*:20000:0:99999:7:::\nsshd:!:20000::::::\n")
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    (root / "var/lib/apt/lists/x_InRelease").write_text("list")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/lsb_release").write_text("")
    (root / "boot/grub").mkdir(parents=True)
    (root / "boot/grub/grub.cfg").write_text(
        "linux /boot/vmlinuz root=LABEL=cloudimg-rootfs ro console=tty1 console=ttyS0\n"
    )
    return root


def test_configure_tree_leaves_a_clean_base(tmp_path: Path) -> None:
    root = fake_tree(tmp_path / "root")
    assert "SSH host keys are present" in hygiene_problems(root)
    configure_tree(root, base_inputs(IMAGE, Settings(mirror="http://mirror.test/ubuntu")))
    assert hygiene_problems(root) == []
    assert (root / "etc/apt/sources.list").read_text().splitlines() == [
        "deb http://mirror.test/ubuntu focal main universe",
        "deb http://mirror.test/ubuntu focal-updates main universe",
        "deb http://mirror.test/ubuntu focal-security main universe",
    ]
    assert (root / "etc/fstab").read_text().startswith("LABEL=cloudimg-rootfs\t/\text4")
    cloud = (root / "etc/cloud/cloud.cfg.d/95_imagefactory.cfg").read_text()
    assert re.search(r"datasource_list:\n- NoCloud", cloud)
    assert "http://mirror.test/ubuntu" in cloud


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda r: (r / "etc/shadow").write_text("root:$6$salt$hash:1::::::\n"), "root has a"),
        (lambda r: (r / "etc/shadow").write_text("ubuntu::1::::::\n"), "ubuntu has a"),
        (lambda r: (r / "etc/machine-id").write_text("0123456789abcdef\n"), "machine-id"),
        (lambda r: (r / "boot/grub/grub.cfg").write_text("root=/dev/loop0p1\n"), "loop device"),
        (lambda r: (r / "usr/bin/lsb_release").unlink(), "lsb-release"),
    ],
)
def test_hygiene_catches(tmp_path: Path, damage, problem: str) -> None:
    root = fake_tree(tmp_path / "root")
    configure_tree(root, base_inputs(IMAGE, Settings()))
    damage(root)
    assert any(problem in p for p in hygiene_problems(root))


# --- Ubuntu's cloud image, verified ----------------------------------------------------------


def publish(www: Path, keys: GpgKeys, signer: str, *, sums_for: bytes | None = None) -> bytes:
    """Put an image, its SHA256SUMS (of ``sums_for`` if given) and a signature in ``www``."""
    image = os.urandom(300_000)
    (www / "focal.img").write_bytes(image)
    digest = hashlib.sha256(image if sums_for is None else sums_for).hexdigest()
    (www / "SHA256SUMS").write_text(f"{'0' * 64} *other.img\n{digest} *focal.img\n")
    keys.sign(signer, www / "SHA256SUMS", www / "SHA256SUMS.gpg")
    return image


def cloud_source(url: str, *fingerprints: str) -> CloudImageBase:
    return CloudImageBase(
        url=f"{url}/focal.img",
        sha256sums_url=f"{url}/SHA256SUMS",
        signature_url=f"{url}/SHA256SUMS.gpg",
        keyring_fingerprints=list(fingerprints),
    )


def cached_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.cache_dir.rglob("*") if not p.name.endswith(".lock"))


def test_a_verified_cloud_image_is_cached(settings: Settings, served, gpg_keys) -> None:
    www, url = served
    image = publish(www, gpg_keys, gpg_keys.a)
    key_file = gpg_keys.export(www.parent / "a.asc", gpg_keys.a)
    first = fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)
    assert first.path.read_bytes() == image
    assert (first.signer, first.from_cache) == (gpg_keys.a, False)
    (www / "focal.img").unlink()  # a cache hit must not download it again
    again = fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)
    assert (again.path, again.from_cache) == (first.path, True)


def test_a_wrong_checksum_is_refused_and_nothing_cached(
    settings: Settings, served, gpg_keys
) -> None:
    www, url = served
    publish(www, gpg_keys, gpg_keys.a, sums_for=b"some other image")
    key_file = gpg_keys.export(www.parent / "a.asc", gpg_keys.a)
    with pytest.raises(VerificationError, match="does not match the signed SHA256SUMS"):
        fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)
    assert "focal.img" not in cached_files(settings)


def test_a_bad_signature_is_refused_and_nothing_cached(
    settings: Settings, served, gpg_keys
) -> None:
    www, url = served
    image = publish(www, gpg_keys, gpg_keys.a)
    # Tampered after signing: points at a different image.
    sums = (www / "SHA256SUMS").read_text()
    evil = hashlib.sha256(image + b"x").hexdigest()
    (www / "SHA256SUMS").write_text(sums.replace(hashlib.sha256(image).hexdigest(), evil))
    key_file = gpg_keys.export(www.parent / "a.asc", gpg_keys.a)
    with pytest.raises(VerificationError, match="signature"):
        fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)
    assert "focal.img" not in cached_files(settings)


def test_a_signature_by_an_unpinned_key_is_refused(settings: Settings, served, gpg_keys) -> None:
    www, url = served
    publish(www, gpg_keys, gpg_keys.b)
    # The key file holds both keys; only A is pinned, so B's signature must not count.
    key_file = gpg_keys.export(www.parent / "ab.asc", gpg_keys.a, gpg_keys.b)
    with pytest.raises(VerificationError, match="not made by a pinned key"):
        fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)
    assert "focal.img" not in cached_files(settings)


def test_a_key_file_without_the_pinned_key_is_refused(settings: Settings, served, gpg_keys) -> None:
    www, url = served
    publish(www, gpg_keys, gpg_keys.b)
    key_file = gpg_keys.export(www.parent / "b.asc", gpg_keys.b)
    with pytest.raises(KeyringError):
        fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)


def test_a_missing_image_line_is_refused(settings: Settings, served, gpg_keys) -> None:
    www, url = served
    publish(www, gpg_keys, gpg_keys.a)
    (www / "SHA256SUMS").write_text(f"{'0' * 64} *other.img\n")
    gpg_keys.sign(gpg_keys.a, www / "SHA256SUMS", www / "SHA256SUMS.gpg")
    key_file = gpg_keys.export(www.parent / "a.asc", gpg_keys.a)
    with pytest.raises(VerificationError, match=r"no entry for focal\.img"):
        fetch_cloud_image(cloud_source(url, gpg_keys.a), settings, quiet_log(), key_file)


# --- the runner ------------------------------------------------------------------------------


def test_command_error_names_the_command_and_the_stderr_tail() -> None:
    script = "for i in $(seq 1 40); do echo line$i >&2; done; exit 3"
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", script], capture=True, log=lambda _: None)
    message = str(caught.value)
    assert message.startswith("sh -c ") and "failed (exit 3)" in message
    assert "line40" in message and "line26" in message and "line25" not in message


def test_run_logs_the_command_and_returns_output() -> None:
    logged: list[str] = []
    done = run(["printf", "%s", "a b"], capture=True, log=logged.append)
    assert done.stdout == "a b"
    assert logged == ["$ printf %s 'a b'"]


def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out"):
        run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1, log=print)
    assert time.monotonic() - started < 20
    child = int(pid_file.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()


def test_require_tool_names_the_package() -> None:
    assert require_tool("sh", "dash").endswith("/sh")
    with pytest.raises(ToolMissingError, match=r"apt-get install no-such-package\)$"):
        require_tool("no-such-tool-here", "no-such-package")


# --- the real thing --------------------------------------------------------------------------

BOOT_DEADLINE_S = 480
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, chroot)")


@pytest.mark.e2e
@needs_root
def test_mmdebstrap_refuses_an_archive_not_signed_by_the_keyring(tmp_path: Path, gpg_keys) -> None:
    keyring = gpg_keys.export(tmp_path / "other.gpg", gpg_keys.a, armor=False)
    argv = mmdebstrap_command(base_inputs(IMAGE, Settings()), keyring, tmp_path / "tree")
    with pytest.raises(CommandError, match=r"NO_PUBKEY 871920D1991BC93C"):
        run(argv, capture=True, timeout=600)


@pytest.mark.e2e
@needs_root
def test_the_focal_base_is_built_once_then_taken_from_the_cache(tmp_path: Path) -> None:
    """In the user's cache, which the session's fleet (tests/e2e.py) then reuses; booting it is
    the provider assessment's job (test_e2e_certify), which runs the checks on it."""
    settings = Settings(build_dir=tmp_path / "build", cache_dir=default_cache_dir())
    built = build_base(IMAGE, settings, StepLog())
    again = build_base(IMAGE, settings, StepLog())
    assert (again.from_cache, again.sha256, again.path) == (True, built.sha256, built.path)
    assert set(built.release_dates) == set(IMAGE.base.archive.pockets)
    info = json.loads(run(["qemu-img", "info", "--output=json", built.path], capture=True).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 4 * 2**30)
    assert re.fullmatch(r"5\.4\.0-\d+-generic", built.kernel)


def test_documentation_is_left_out_but_licences_stay(tmp_path: Path) -> None:
    argv = mmdebstrap_command(base_inputs(IMAGE, Settings()), tmp_path / "k.gpg", tmp_path / "t")
    exclude = argv.index("--dpkgopt=path-exclude=/usr/share/doc/*")
    include = argv.index("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    assert exclude < include, "dpkg applies filters in order: the include must come last"


# --- the disk's driver at boot, on every release ----------------------------------------------

KMOD = REPO_ROOT / "tests" / "data" / "kmod"


def test_a_compressed_driver_in_the_initramfs_counts() -> None:
    # 24.04 (6.8): virtio_blk is a zstd-compressed module, as lsinitramfs lists it.
    listing = "usr/lib/modules/6.8.0-151-generic/kernel/drivers/block/virtio_blk.ko.zst\n"
    assert base.drivers_missing_at_boot(listing, "", ["virtio_blk"]) == []
    assert base.drivers_missing_at_boot("kernel/drivers/block/virtio-blk.ko.xz\n", "",
                                        ["virtio_blk"]) == []  # fmt: skip


def test_a_built_in_driver_counts_without_the_initramfs() -> None:
    # 26.04 (7.0), as recorded: virtio_blk is built in, so no initramfs lists it.
    builtin = (KMOD / "7.0.0-44-generic" / "modules.builtin").read_text()
    assert base.drivers_missing_at_boot("", builtin, ["virtio_blk"]) == []


def test_a_driver_neither_built_in_nor_in_the_initramfs_is_missing() -> None:
    # 20.04 (5.4), as recorded: a module, so it must be in the initramfs.
    builtin = (KMOD / "5.4.0-216-generic" / "modules.builtin").read_text()
    listing = "lib/modules/5.4.0-216-generic/kernel/drivers/net/virtio_net.ko\n"
    assert base.drivers_missing_at_boot(listing, builtin, ["virtio_blk"]) == ["virtio_blk"]
