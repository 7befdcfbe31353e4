"""The qemu provider's publisher: a local directory any static web server can serve.

Layout under the store root::

    <image>/<serial>/<image>-<serial>.qcow2     the certified artifact
    <image>/<serial>/<image>-<serial>.manifest  its dpkg-query -W manifest
    <image>/<serial>/record.json                the record as published (store-relative paths)
    <image>/<serial>/product.json               facts the index needs (release, digests, sizes)
    <image>/<serial>/SHA256SUMS[.gpg]           sha256sum -c compatible, signed when configured
    streams/v1/index.json, streams/v1/<content_id>.json   simplestreams (+ .sjson when signed)
    .staging/ .trash/ .lock                     internal

A serial directory is built complete in ``.staging/`` and renamed into place, so a reader
sees all of it or nothing. The streams are derived from the serial directories alone:
recovering from a killed run is emptying ``.staging/`` and ``.trash/`` and rewriting them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import gnupg
from filelock import FileLock, Timeout

from . import records
from .definitions import ImageDefinition
from .digests import CHUNK, sha256_file
from .errors import ConfigError, FactoryError, ToolMissingError
from .records import RECORD_NAME, Record

CONTENT_ID = "org.imagefactory:certified:download"
ARCH = "amd64"
STREAMS = Path("streams") / "v1"
SUMS = "SHA256SUMS"
PRODUCT_NAME = "product.json"
SERIAL = re.compile(r"^[0-9]{8}\.[0-9]+$")
RESERVED = {"streams"}  # top-level names that are not image directories
INTERNAL = (".staging", ".trash")


@dataclass(frozen=True)
class StoreConfig:
    root: Path
    keep: int = 3  # retention: the newest N serials of each image stay
    signing_key: str = ""  # GPG fingerprint or key id; "" = unsigned
    gnupghome: str = ""  # GnuPG home holding signing_key ("" = gpg's default)

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ConfigError(f"store keep: {self.keep} (allowed: 1 or more)")


class StoreError(FactoryError):
    """The store refused or failed to publish; the published tree is as it was."""


class LocalStore:
    def __init__(self, config: StoreConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.root = config.root
        self.log = log
        # Reentrant per instance: publish takes it, then recover/prune/write_index nest.
        self._lock = FileLock(str(self.root / ".lock"))

    # --- public operations -------------------------------------------------------------

    def publish(self, record: Record, image: ImageDefinition) -> Path:
        """Copy the record's artifact into ``<image>/<serial>``, prune, rewrite the streams."""
        self._check_publishable(record, image)
        target = self.root / image.name / record.serial
        with self._locked():
            self.recover()
            if self.config.signing_key:
                self._signing_fingerprints(self._gpg())  # fail before copying anything
            if target.exists():
                self._require_same(target, record)
                # A run killed after the rename, before its caller saved the record.
                self.log(f"store: {image.name} {record.serial} already published at {target}")
            else:
                self._require_retained(image.name, record.serial)
                self._stage_and_rename(record, image, target)
                self.log(f"store: published {image.name} {record.serial} at {target}")
            self.prune(image.name)
            self.write_index()
        return target

    def prune(self, image_name: str) -> list[str]:
        """Remove all but the newest ``keep`` serials of an image; the serials removed."""
        with self._locked():
            serials = self.serials(image_name)
            old = serials[: max(0, len(serials) - self.config.keep)]
            if not old:
                return []
            # Unreference first: the streams never name a file that is being deleted.
            self._write_index(exclude={(image_name, s) for s in old})
            trash = self.root / ".trash"
            trash.mkdir(exist_ok=True)
            for serial in old:
                # Renamed out whole first: a half-deleted directory could still look complete.
                doomed = Path(tempfile.mkdtemp(prefix=f"{image_name}-{serial}-", dir=trash))
                os.rename(self.root / image_name / serial, doomed / serial)
                shutil.rmtree(doomed)
                self.log(f"store: pruned {image_name} {serial} (keep {self.config.keep})")
            return old

    def recover(self) -> list[str]:
        """Remove what a killed run left behind, then rewrite the streams from the directories."""
        with self._locked():
            cleaned = [*self._internal_leftovers(), *self._incomplete_serials()]
            for path in cleaned:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            names = [str(p.relative_to(self.root)) for p in cleaned]
            for name in names:
                self.log(f"store: removed leftover {name}")
            self._write_index()
            return names

    def serials(self, image_name: str) -> list[str]:
        """Complete serial directories of an image, oldest first."""
        directory = self.root / image_name
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if SERIAL.match(p.name) and _complete(p)]
        return sorted(found, key=records.serial_key)

    def write_index(self) -> None:
        with self._locked():
            self._write_index()

    # --- publishing ----------------------------------------------------------------------

    def _check_publishable(self, record: Record, image: ImageDefinition) -> None:
        label = f"{record.image} {record.serial}"
        if record.state != "published":
            raise StoreError(f"{label}: record state is {record.state!r}, not 'published'")
        if record.image != image.name:
            raise StoreError(f"{label}: record is of image {record.image}, not {image.name}")
        if image.name in RESERVED or image.name.startswith("."):
            raise StoreError(f"{label}: image name {image.name!r} is reserved in the store")
        if not SERIAL.match(record.serial):
            raise StoreError(f"{label}: serial {record.serial!r} is not YYYYMMDD.N")
        for what, path in (("artifact", record.artifact), ("manifest", record.manifest)):
            if not Path(path).is_file():
                raise StoreError(f"{path}: {what} file of {label} is missing")

    def _stage_and_rename(self, record: Record, image: ImageDefinition, target: Path) -> None:
        staging = self.root / ".staging"
        staging.mkdir(exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f"{image.name}-{record.serial}-", dir=staging))
        try:
            os.chmod(stage, 0o755)  # mkdtemp's 0700 would hide it from the web server
            self._fill(stage, record, image)
            _fsync_dir(stage)
            target.parent.mkdir(exist_ok=True)
            os.rename(stage, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def _fill(self, stage: Path, record: Record, image: ImageDefinition) -> None:
        name = f"{image.name}-{record.serial}"
        qcow2, manifest = stage / f"{name}.qcow2", stage / f"{name}.manifest"
        _copy(Path(record.artifact), qcow2)
        _copy(Path(record.manifest), manifest)
        sha256, md5 = _sha256_md5(qcow2)  # of the copy: what readers will download
        if sha256 != record.sha256:
            raise StoreError(
                f"{record.artifact}: its copy in the store has sha256 {sha256}, the record "
                f"says {record.sha256}; nothing was published"
            )
        items = _items(f"{image.name}/{record.serial}", qcow2, sha256, md5, manifest)
        sums = "".join(f"{item['sha256']} *{Path(item['path']).name}\n" for item in items.values())
        _write_public(stage / SUMS, sums)
        if self.config.signing_key:
            self._sign_sums(stage / SUMS)
        published = record.model_copy(
            deep=True,
            update={"artifact": items["disk1.img"]["path"], "manifest": items["manifest"]["path"]},
        )
        _write_public(stage / RECORD_NAME, published.model_dump_json(indent=2) + "\n")
        product = {"image": image.name, "release": image.release, "codename": image.codename}
        product |= {"arch": ARCH, "items": items}
        _write_public(stage / PRODUCT_NAME, json.dumps(product, indent=2) + "\n")

    def _require_same(self, target: Path, record: Record) -> None:
        try:
            published = records.load(target / RECORD_NAME).sha256
        except ConfigError as exc:
            raise StoreError(str(exc)) from None
        if published != record.sha256:
            raise StoreError(
                f"{target}: already holds a different artifact (sha256 {published}, this "
                f"record's {record.sha256}); a published serial never changes"
            )

    def _require_retained(self, image_name: str, serial: str) -> None:
        """Refuse a serial that retention would remove at once: its location would be a lie."""
        kept = sorted([*self.serials(image_name), serial], key=records.serial_key)
        if serial not in kept[-self.config.keep :]:
            raise StoreError(
                f"{self.root / image_name / serial}: older than the newest {self.config.keep} "
                f"published serials ({', '.join(kept[-self.config.keep :])}); it would be "
                "pruned at once"
            )

    # --- streams -------------------------------------------------------------------------

    def _write_index(self, exclude: set[tuple[str, str]] | None = None) -> None:
        products = self._products(exclude or set())
        streams = self.root / STREAMS
        if self._unchanged(products):
            return  # keep "updated" meaning "content last changed", as mirrors expect
        updated = format_datetime(datetime.now(UTC))
        products_doc = {
            "content_id": CONTENT_ID,
            "datatype": "image-downloads",
            "format": "products:1.0",
            "updated": updated,
            "products": products,
        }
        index_doc = {
            "format": "index:1.0",
            "updated": updated,
            "index": {
                CONTENT_ID: {
                    "datatype": "image-downloads",
                    "path": f"{STREAMS.as_posix()}/{CONTENT_ID}.json",
                    "format": "products:1.0",
                    "updated": updated,
                    "products": sorted(products),
                }
            },
        }
        # Products before index: the index never names products its file does not hold yet.
        texts = [
            (f"{CONTENT_ID}.json", _dumps(products_doc)),
            ("index.json", _dumps(index_doc)),
        ]
        signed = self._clearsign(texts) if self.config.signing_key else {}
        for name, text in texts:
            _write_public(streams / name, text)
            sjson = streams / name.replace(".json", ".sjson")
            if name in signed:
                _write_public(sjson, signed[name])
            elif sjson.exists():
                sjson.unlink()  # unsigned now: a stale signed copy would list other serials
                self.log(f"store: removed {sjson} (no signing_key)")

    def _products(self, exclude: set[tuple[str, str]]) -> dict[str, Any]:
        products: dict[str, Any] = {}
        for image_name in self._image_names():
            for serial in self.serials(image_name):
                if (image_name, serial) in exclude:
                    continue
                facts = self._product_facts(image_name, serial)
                release, codename = facts["release"], facts["codename"]
                product_id = f"org.imagefactory:strongswan:{release}:{facts['arch']}"
                product = products.setdefault(
                    product_id,
                    {
                        "arch": facts["arch"],
                        "os": "ubuntu",
                        "release": codename,
                        "version": release,
                        "aliases": f"{release},{codename}",
                        "versions": {},
                    },
                )
                if serial in product["versions"]:
                    raise StoreError(
                        f"{self.root / image_name / serial}: {product_id} {serial} is "
                        "already published by another image"
                    )
                product["versions"][serial] = {
                    "label": "release",
                    "pubname": f"imagefactory-{codename}-{release}-{facts['arch']}-{serial}",
                    "items": facts["items"],
                }
        return products

    def _product_facts(self, image_name: str, serial: str) -> dict[str, Any]:
        path = self.root / image_name / serial / PRODUCT_NAME
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: unreadable product facts ({exc})") from None
        keys = set(facts) if isinstance(facts, dict) else set()
        missing = sorted({"release", "codename", "arch", "items"} - keys)
        if missing:
            raise StoreError(f"{path}: product facts lack {', '.join(missing)}")
        return facts

    def _unchanged(self, products: dict[str, Any]) -> bool:
        streams = self.root / STREAMS
        signed = bool(self.config.signing_key)
        names = [f"{CONTENT_ID}.json", "index.json"]
        if not all((streams / n).is_file() for n in names):
            return False
        if any((streams / n.replace(".json", ".sjson")).is_file() != signed for n in names):
            return False
        try:
            current = json.loads((streams / names[0]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(current, dict) and current.get("products") == products

    def _image_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in RESERVED
        )

    # --- recovery ------------------------------------------------------------------------

    def _internal_leftovers(self) -> list[Path]:
        found = [p for name in INTERNAL for p in sorted((self.root / name).glob("*"))]
        # Temp files of an interrupted streams write (write_atomically's, or ours).
        return found + sorted((self.root / STREAMS).glob(".*"))

    def _incomplete_serials(self) -> list[Path]:
        # Only whole renames create serial directories; a partial one is not ours to keep.
        return [
            p
            for image_name in self._image_names()
            for p in sorted((self.root / image_name).iterdir())
            if p.is_dir() and SERIAL.match(p.name) and not _complete(p)
        ]

    # --- locking and signing -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            self.log(f"store: waiting for {self._lock.lock_file} (another run is publishing)")
            self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def _gpg(self) -> gnupg.GPG:
        home = self.config.gnupghome
        if home and not Path(home).is_dir():
            raise StoreError(f"signing_key {self.config.signing_key}: no GnuPG home at {home}")
        try:
            return gnupg.GPG(gnupghome=home or None)
        except (OSError, ValueError) as exc:
            raise ToolMissingError(f"gpg: cannot run it to sign the store ({exc})") from None

    def _home_label(self) -> str:
        return self.config.gnupghome or "gpg's default home"

    def _signing_fingerprints(self, gpg: gnupg.GPG) -> set[str]:
        key = self.config.signing_key
        found = gpg.list_keys(secret=True, keys=[key])
        if not found:
            raise StoreError(f"signing_key {key}: not found in {self._home_label()}")
        if len(found) > 1:
            raise StoreError(
                f"signing_key {key}: matches {len(found)} secret keys in "
                f"{self._home_label()}; give a full fingerprint"
            )
        return {found[0]["fingerprint"].upper()}

    def _sign_sums(self, sums: Path) -> None:
        gpg = self._gpg()
        pinned = self._signing_fingerprints(gpg)
        [fingerprint] = pinned
        signature = sums.with_name(f"{sums.name}.gpg")
        result = gpg.sign_file(
            str(sums), keyid=fingerprint, detach=True, clearsign=False, output=str(signature)
        )
        if not result or not signature.is_file():
            raise StoreError(
                f"{sums}: signing with {self.config.signing_key} failed ({_why(result)})"
            )
        os.chmod(signature, 0o644)
        verified = gpg.verify_file(str(signature), data_filename=str(sums))
        _require_signer(verified, pinned, signature)

    def _clearsign(self, texts: list[tuple[str, str]]) -> dict[str, str]:
        gpg = self._gpg()
        pinned = self._signing_fingerprints(gpg)
        [fingerprint] = pinned
        signed = {}
        for name, text in texts:
            result = gpg.sign(text, keyid=fingerprint, clearsign=True, detach=False)
            if not result or not result.data:
                raise StoreError(
                    f"{self.root / STREAMS / name}: clearsigning with "
                    f"{self.config.signing_key} failed ({_why(result)})"
                )
            _require_signer(gpg.verify(result.data), pinned, self.root / STREAMS / name)
            signed[name] = result.data.decode("utf-8")
        return signed


# --- helpers -----------------------------------------------------------------------------


def _complete(serial_dir: Path) -> bool:
    return (serial_dir / RECORD_NAME).is_file() and (serial_dir / PRODUCT_NAME).is_file()


def _copy(source: Path, dest: Path) -> None:
    shutil.copyfile(source, dest)
    os.chmod(dest, 0o644)
    with dest.open("rb") as fh:
        os.fsync(fh.fileno())


def _items(
    relative: str, qcow2: Path, sha256: str, md5: str, manifest: Path
) -> dict[str, dict[str, Any]]:
    """The simplestreams items of a serial, kept in product.json so indexing reads no disks."""
    return {
        "disk1.img": {
            "ftype": "disk1.img",
            "path": f"{relative}/{qcow2.name}",
            "sha256": sha256,
            "size": qcow2.stat().st_size,
            "md5": md5,
        },
        "manifest": {
            "ftype": "manifest",
            "path": f"{relative}/{manifest.name}",
            "sha256": sha256_file(manifest),
            "size": manifest.stat().st_size,
        },
    }


def _sha256_md5(path: Path) -> tuple[str, str]:
    """Both digests in one read; md5 only because simplestreams clients still list it."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest()


def _write_public(path: Path, text: str) -> None:
    """write_atomically, readable by a web server from the moment the final name appears.

    write_atomically's temp file is 0600; it is written under a hidden name, opened up,
    then renamed over ``path``.
    """
    temp = path.with_name(f".{path.name}.new")
    records.write_atomically(temp, text)
    os.chmod(temp, 0o644)
    os.replace(temp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def _why(result: Any) -> str:
    """gpg's own reason: its status, else the last line it printed."""
    if result is not None and getattr(result, "status", None):
        return str(result.status)
    lines = (getattr(result, "stderr", "") or "").strip().splitlines()
    return lines[-1] if lines else "no signature produced"


def _require_signer(verified: Any, pinned: set[str], what: Path) -> None:
    signer = (verified.pubkey_fingerprint or "").upper()
    if not verified.valid or signer not in pinned:
        raise StoreError(
            f"{what}: the signature just made does not verify ({_why(verified)}; signer "
            f"{signer or 'none'}, expected {', '.join(sorted(pinned))})"
        )
