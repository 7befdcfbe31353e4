"""The local store: atomic publication, signatures, simplestreams, retention, recovery."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import gnupg
import pytest

from imagefactory import records
from imagefactory.definitions import ImageDefinition, load_image
from imagefactory.digests import sha256_file
from imagefactory.records import Provenance, Record, Transition
from imagefactory.settings import REPO_ROOT
from imagefactory.store import CONTENT_ID, LocalStore, StoreConfig, StoreError

IMAGE_YAML = REPO_ROOT / "images" / "ubuntu-20.04.yaml"
NAME = "ubuntu-20.04"
SERIAL = "20261126.1"
PRODUCT_ID = "org.imagefactory:strongswan:20.04:amd64"
PACKAGES = {"strongswan-starter": "5.8.2-1ubuntu3.6", "openssh-server": "1:8.2p1-4ubuntu0.11"}
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def image() -> ImageDefinition:
    return load_image(IMAGE_YAML)


def fake_record(where: Path, serial: str = SERIAL, data: bytes | None = None) -> Record:
    """A published record of a random artifact (64 KiB unless ``data``) and its manifest."""
    directory = where / "artifacts" / serial
    directory.mkdir(parents=True)
    artifact = directory / f"{NAME}-{serial}.qcow2"
    artifact.write_bytes(os.urandom(64 * 1024) if data is None else data)
    manifest = directory / f"{NAME}-{serial}.manifest"
    manifest.write_text("".join(f"{n}\t{v}\n" for n, v in PACKAGES.items()))
    history = [Transition(state=s, at=records.now()) for s in ("built", "certified", "published")]
    return Record(
        image=NAME,
        provider="qemu",
        serial=serial,
        state="published",
        artifact=str(artifact),
        sha256=sha256_file(artifact),
        size=artifact.stat().st_size,
        kernel="5.4.0-216-generic",
        manifest=str(manifest),
        packages=PACKAGES,
        provenance=Provenance(
            git_commit="0" * 40, git_dirty=False, template_sha256="1" * 64, packer_version="1.6.6"
        ),
        timings={"total": 1.0},
        history=history,
    )


class Log(list):
    def __call__(self, message: str) -> None:
        self.append(message)


def make_store(root: Path, **config: object) -> tuple[LocalStore, Log]:
    log = Log()
    return LocalStore(StoreConfig(root, **config), log), log  # type: ignore[arg-type]


def streams(root: Path) -> tuple[dict, dict]:
    """(index.json, products file) as published."""
    v1 = root / "streams" / "v1"
    return (
        json.loads((v1 / "index.json").read_text()),
        json.loads((v1 / f"{CONTENT_ID}.json").read_text()),
    )


def published_serials(root: Path) -> list[str]:
    products = streams(root)[1]["products"]
    return sorted(products.get(PRODUCT_ID, {}).get("versions", {}), key=records.serial_key)


def contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# --- GnuPG homes: short paths (gpg-agent sockets), agents stopped afterwards -------------


def _short_home() -> str:
    return tempfile.mkdtemp(prefix="g", dir="/tmp")


def _drop_home(home: str) -> None:
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def signer() -> Iterator[tuple[str, str]]:
    """(GNUPGHOME, fingerprint) of a throwaway passphrase-less ed25519 signing key."""
    home = _short_home()
    try:
        subprocess.run(
            ["gpg", "--homedir", home, "--batch", "--passphrase", "", "--quick-gen-key",
             "Test <t@example.org>", "ed25519", "sign", "never"],
            check=True, capture_output=True,
        )  # fmt: skip
        [key] = gnupg.GPG(gnupghome=home).list_keys(secret=True)
        yield home, key["fingerprint"]
    finally:
        _drop_home(home)


@pytest.fixture
def verifier(signer: tuple[str, str]) -> Iterator[gnupg.GPG]:
    """A fresh GnuPG home holding only the signer's public key."""
    home = _short_home()
    try:
        public = gnupg.GPG(gnupghome=signer[0]).export_keys(signer[1])
        gpg = gnupg.GPG(gnupghome=home)
        assert gpg.import_keys(public).count == 1
        assert not gpg.list_keys(secret=True)
        yield gpg
    finally:
        _drop_home(home)


# --- publish ---------------------------------------------------------------------------


def test_publish_writes_a_complete_checkable_serial_directory(
    tmp_path: Path, image: ImageDefinition
) -> None:
    root = tmp_path / "store"
    store, _ = make_store(root)
    record = fake_record(tmp_path)

    target = store.publish(record, image)

    assert target == root / NAME / SERIAL
    base = f"{NAME}-{SERIAL}"
    assert contents(target) == sorted(
        [f"{base}.qcow2", f"{base}.manifest", "record.json", "product.json", "SHA256SUMS"]
    )
    assert (target / f"{base}.qcow2").read_bytes() == Path(record.artifact).read_bytes()
    check = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=target, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 2
    stored = records.load(target / "record.json")
    assert stored.state == "published"
    assert stored.sha256 == record.sha256
    assert stored.artifact == f"{NAME}/{SERIAL}/{base}.qcow2"
    assert stored.manifest == f"{NAME}/{SERIAL}/{base}.manifest"
    assert (root / stored.artifact).is_file() and (root / stored.manifest).is_file()
    # A static web server running as another user must be able to read all of it.
    assert target.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in target.iterdir())
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in (root / "streams" / "v1").iterdir())
    assert published_serials(root) == [SERIAL]
    assert contents(root / ".staging") == []
    assert not (root / "streams" / "v1" / "index.sjson").exists()


@pytest.mark.parametrize("problem", ["state", "artifact", "image"])
def test_publish_refuses_what_is_not_publishable(
    tmp_path: Path, image: ImageDefinition, problem: str
) -> None:
    store, _ = make_store(tmp_path / "store")
    record = fake_record(tmp_path)
    if problem == "state":
        record.state = "certified"
    elif problem == "artifact":
        Path(record.artifact).unlink()
    else:
        record.image = "ubuntu-22.04"
    with pytest.raises(StoreError) as refused:
        store.publish(record, image)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "store" / NAME).exists()


def test_digest_mismatch_publishes_nothing(tmp_path: Path, image: ImageDefinition) -> None:
    root = tmp_path / "store"
    store, _ = make_store(root)
    store.publish(fake_record(tmp_path / "a", serial="20261125.1"), image)
    index_before = (root / "streams" / "v1" / "index.json").read_bytes()
    products_before = (root / "streams" / "v1" / f"{CONTENT_ID}.json").read_bytes()
    record = fake_record(tmp_path / "b")
    Path(record.artifact).write_bytes(os.urandom(64 * 1024))  # changed after the record

    with pytest.raises(StoreError, match="sha256") as refused:
        store.publish(record, image)

    message = str(refused.value)
    assert record.artifact in message and record.sha256 in message and "\n" not in message
    assert contents(root / NAME) == ["20261125.1"]
    assert contents(root / ".staging") == []
    assert (root / "streams" / "v1" / "index.json").read_bytes() == index_before
    assert (root / "streams" / "v1" / f"{CONTENT_ID}.json").read_bytes() == products_before


# --- signatures ------------------------------------------------------------------------


def test_signed_store_verifies_with_the_public_key_alone(
    tmp_path: Path, image: ImageDefinition, signer: tuple[str, str], verifier: gnupg.GPG
) -> None:
    home, fingerprint = signer
    root = tmp_path / "store"
    store, _ = make_store(root, signing_key=fingerprint, gnupghome=home)
    target = store.publish(fake_record(tmp_path), image)

    sums, signature = target / "SHA256SUMS", target / "SHA256SUMS.gpg"
    assert signature.read_text().startswith("-----BEGIN PGP SIGNATURE-----")
    verified = verifier.verify_file(str(signature), data_filename=str(sums))
    assert verified.valid and verified.pubkey_fingerprint == fingerprint

    v1 = root / "streams" / "v1"
    for name in ("index", CONTENT_ID):
        signed = (v1 / f"{name}.sjson").read_text()
        assert signed.startswith("-----BEGIN PGP SIGNED MESSAGE-----")
        assert verifier.verify(signed).valid
        assert (v1 / f"{name}.json").read_text().strip() in signed

    tampered = tmp_path / "SHA256SUMS"
    tampered.write_text(sums.read_text().replace(" *", "0 *", 1))
    assert not verifier.verify_file(str(signature), data_filename=str(tampered)).valid
    forged = (v1 / "index.sjson").read_text().replace("index:1.0", "index:9.9")
    assert not verifier.verify(forged).valid


def test_unknown_signing_key_publishes_nothing(
    tmp_path: Path, image: ImageDefinition, signer: tuple[str, str]
) -> None:
    root = tmp_path / "store"
    missing = "0123456789ABCDEF0123456789ABCDEF01234567"
    store, _ = make_store(root, signing_key=missing, gnupghome=signer[0])

    with pytest.raises(StoreError, match=f"signing_key {missing}: not found in {signer[0]}"):
        store.publish(fake_record(tmp_path), image)

    assert contents(root / NAME) == []
    assert contents(root / ".staging") == []


# --- simplestreams ---------------------------------------------------------------------


def test_streams_have_the_simplestreams_shape(tmp_path: Path, image: ImageDefinition) -> None:
    root = tmp_path / "store"
    store, _ = make_store(root)
    store.publish(fake_record(tmp_path), image)
    index, products = streams(root)

    assert set(products) == {"content_id", "datatype", "format", "updated", "products"}
    assert products["content_id"] == CONTENT_ID
    assert products["datatype"] == "image-downloads"
    assert products["format"] == "products:1.0"
    assert re.fullmatch(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", products["updated"])
    assert parsedate_to_datetime(products["updated"]).utcoffset().total_seconds() == 0
    assert list(products["products"]) == [PRODUCT_ID]
    product = products["products"][PRODUCT_ID]
    assert {k: v for k, v in product.items() if k != "versions"} == {
        "arch": "amd64",
        "os": "ubuntu",
        "release": "focal",
        "version": "20.04",
        "aliases": "20.04,focal",
    }
    assert list(product["versions"]) == [SERIAL]
    version = product["versions"][SERIAL]
    assert set(version) == {"label", "pubname", "items"}
    assert version["label"] == "release"
    assert version["pubname"] == f"imagefactory-focal-20.04-amd64-{SERIAL}"
    items = version["items"]
    assert set(items) == {"disk1.img", "manifest"}
    assert set(items["disk1.img"]) == {"ftype", "path", "sha256", "size", "md5"}
    assert set(items["manifest"]) == {"ftype", "path", "sha256", "size"}
    for ftype, item in items.items():
        assert item["ftype"] == ftype
        path = root / item["path"]
        assert not Path(item["path"]).is_absolute() and path.is_file()
        assert HEX64.match(item["sha256"]) and item["sha256"] == sha256_file(path)
        assert isinstance(item["size"], int) and item["size"] == path.stat().st_size
    disk = root / items["disk1.img"]["path"]
    assert items["disk1.img"]["md5"] == hashlib.md5(disk.read_bytes()).hexdigest()

    assert set(index) == {"format", "updated", "index"}
    assert index["format"] == "index:1.0"
    assert index["updated"] == products["updated"]
    assert index["index"] == {
        CONTENT_ID: {
            "datatype": "image-downloads",
            "path": f"streams/v1/{CONTENT_ID}.json",
            "format": "products:1.0",
            "updated": products["updated"],
            "products": [PRODUCT_ID],
        }
    }
    assert (root / index["index"][CONTENT_ID]["path"]).is_file()


# --- retention, idempotence, recovery ----------------------------------------------------


def test_retention_keeps_the_newest_serials_in_numeric_order(
    tmp_path: Path, image: ImageDefinition
) -> None:
    root = tmp_path / "store"
    store, log = make_store(root, keep=2)
    for serial in ("20261126.1", "20261126.2", "20261126.10", "20261127.1"):
        store.publish(fake_record(tmp_path, serial=serial), image)

    newest = ["20261126.10", "20261127.1"]  # a string sort would keep 20261126.2
    assert store.serials(NAME) == newest
    assert contents(root / NAME) == sorted(newest)
    assert published_serials(root) == newest
    assert [m for m in log if "pruned" in m] == [
        f"store: pruned {NAME} 20261126.1 (keep 2)",
        f"store: pruned {NAME} 20261126.2 (keep 2)",
    ]
    assert contents(root / ".trash") == []
    assert store.prune(NAME) == []

    # An older serial would be pruned as soon as it was published: refused up front.
    with pytest.raises(StoreError, match="would be pruned at once"):
        store.publish(fake_record(tmp_path / "late", serial="20261126.3"), image)
    assert contents(root / NAME) == sorted(newest)


def test_prune_unreferences_before_deleting(
    tmp_path: Path, image: ImageDefinition, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    store, _ = make_store(root, keep=1)
    store.publish(fake_record(tmp_path, serial="20261126.1"), image)
    listed_while_deleting: list[list[str]] = []
    rmtree = shutil.rmtree

    def watching_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        listed_while_deleting.append(published_serials(root))
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "rmtree", watching_rmtree)
    store.publish(fake_record(tmp_path, serial="20261126.2"), image)

    assert listed_while_deleting == [["20261126.2"]]
    assert published_serials(root) == ["20261126.2"]


def test_republishing_is_idempotent_but_a_serial_never_changes(
    tmp_path: Path, image: ImageDefinition
) -> None:
    root = tmp_path / "store"
    store, log = make_store(root)
    record = fake_record(tmp_path / "a")
    target = store.publish(record, image)
    disk = target / f"{NAME}-{SERIAL}.qcow2"
    stamp = disk.stat().st_mtime_ns

    assert store.publish(record, image) == target
    assert disk.stat().st_mtime_ns == stamp
    assert log[-1] == f"store: {NAME} {SERIAL} already published at {target}"

    other = fake_record(tmp_path / "b")
    with pytest.raises(StoreError, match="already holds a different artifact"):
        store.publish(other, image)
    assert sha256_file(disk) == record.sha256
    assert published_serials(root) == [SERIAL]
    assert contents(root / ".staging") == []


def test_recover_removes_leftovers_and_rebuilds_the_index(
    tmp_path: Path, image: ImageDefinition
) -> None:
    root = tmp_path / "store"
    store, log = make_store(root)
    store.publish(fake_record(tmp_path), image)
    (root / ".staging" / "xyz").mkdir()
    (root / ".staging" / "xyz" / "part.qcow2").write_bytes(b"half")
    (root / ".trash" / "abc").mkdir(parents=True)
    (root / ".trash" / "abc" / "old.qcow2").write_bytes(b"old")
    incomplete = root / NAME / "20261127.1"
    incomplete.mkdir()
    (incomplete / f"{NAME}-20261127.1.qcow2").write_bytes(b"no record")
    shutil.rmtree(root / "streams")  # the index is derived: losing it loses nothing
    log.clear()

    cleaned = store.recover()

    assert sorted(cleaned) == [".staging/xyz", ".trash/abc", f"{NAME}/20261127.1"]
    assert len(log) == 3 and all("removed leftover" in m for m in log)
    assert contents(root / ".staging") == [] and contents(root / ".trash") == []
    assert contents(root / NAME) == [SERIAL]
    assert store.serials(NAME) == [SERIAL]
    assert published_serials(root) == [SERIAL]
    assert store.recover() == []


# --- crash safety ----------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from imagefactory import records
from imagefactory.definitions import load_image
from imagefactory.store import LocalStore, StoreConfig

record = records.load(Path(sys.argv[1]))
store = LocalStore(StoreConfig(Path(sys.argv[2])), log=lambda message: None)
store.publish(record, load_image(Path(sys.argv[3])))
"""


def wait_for(condition: Callable[[], bool], child: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, "the publish finished before it could be killed"
        assert time.monotonic() < deadline, "the publish never started staging"
        time.sleep(0.002)


def test_a_killed_publish_leaves_nothing_published(tmp_path: Path, image: ImageDefinition) -> None:
    root = tmp_path / "store"
    block = os.urandom(1 << 20)
    record = fake_record(tmp_path, data=block * 300)
    saved = tmp_path / "record.json"
    records.save(record, saved)
    staging = root / ".staging"

    def staging_has_content() -> bool:
        return staging.is_dir() and any(
            p.is_file() and p.stat().st_size for p in staging.rglob("*")
        )

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(saved), str(root), str(IMAGE_YAML)], cwd=REPO_ROOT
    )
    try:
        wait_for(staging_has_content, child, timeout=30)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    assert child.returncode == -signal.SIGKILL
    assert staging_has_content()  # killed mid-publish: its staging is still there
    assert not (root / NAME / SERIAL).exists()
    products = root / "streams" / "v1" / f"{CONTENT_ID}.json"
    assert not products.exists() or SERIAL not in products.read_text()

    store, log = make_store(root)
    target = store.publish(record, image)

    assert target == root / NAME / SERIAL
    assert any("removed leftover .staging/" in m for m in log)
    assert contents(staging) == []
    assert sha256_file(target / f"{NAME}-{SERIAL}.qcow2") == record.sha256
    assert published_serials(root) == [SERIAL]
