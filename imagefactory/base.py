"""Base images for the qemu provider, cached by the digest of their inputs.

Two sources (``images/*.yaml`` ``base:``):

- ``build_base``: built here from the Ubuntu archive the way Ubuntu's cloud images are
  made: mmdebstrap (which verifies the archive's Release signatures against a keyring of
  exactly the pinned keys), one MBR partition labelled ``cloudimg-rootfs``, GRUB for BIOS,
  cloud-init with NoCloud allowed, no host keys, no passwords. Result: a compressed qcow2.
- ``fetch_cloud_image``: Ubuntu's published cloud image, accepted only when SHA256SUMS
  carries a good signature by a pinned key and the download matches it.

A cache entry is a directory holding the artifact and ``manifest.json``; the manifest is
written last, after the artifact's sha256 is known, so an entry without one is incomplete.
Entries are built in a temporary directory beside the cache and renamed into place, under
a file lock, so concurrent runs build a base once and readers never see half an entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gnupg
import requests
import yaml
from filelock import FileLock

from .definitions import CloudImageBase, ImageDefinition
from .digests import sha256_file
from .disk import (
    Cleanup,
    CleanupError,
    attach_loop,
    chroot_mounts,
    kill_chroot_processes,
    mounts_under,
    safe_rmtree,
    unmount,
)
from .errors import ConfigError, FactoryError
from .runner import require_tool, run
from .settings import REPO_ROOT, Settings
from .steps import StepLog

# Bump whenever the build below changes what ends up in the image: it invalidates the cache.
BUILDER_VERSION = 5

KEYS_DIR = REPO_ROOT / "keys"
ARCHIVE_KEYRING = KEYS_DIR / "ubuntu-archive-keyring.asc"
CLOUD_IMAGE_KEYRING = KEYS_DIR / "ubuntu-cloudimage-keyring.asc"

ROOT_LABEL = "cloudimg-rootfs"  # what Ubuntu's cloud images call their root filesystem
HOSTNAME = "ubuntu"
# The qemu provider attaches the disk as virtio (templates/qemu.pkr.hcl.j2).
GRUB_INSTALL_DEVICE = "/dev/vda"
BOOT_DRIVERS = ("virtio_blk",)
QCOW2_NAME = "base.qcow2"
MANIFEST_NAME = "manifest.json"
PACKAGES_NAME = "packages.txt"
# One bootable Linux partition from 1 MiB (room for GRUB's core image) to the end, MBR.
PARTITION_TABLE = "label: dos\nstart=2048, type=83, bootable\n"

# Packages every Ubuntu cloud image has beyond what an image definition lists: without
# locales, cloud-init's locale module runs apt-get update and installs it on first boot
# (45 s under TCG, and only with network access).
CLOUD_IMAGE_PACKAGES = ("locales",)

HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "qemu-img": "qemu-utils",
    "sfdisk": "fdisk",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "partx": "util-linux",
    "fstrim": "util-linux",
    "chroot": "coreutils",
}
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}
MMDEBSTRAP_TIMEOUT_S = 1800
STEP_TIMEOUT_S = 900
HTTP_TIMEOUT = (15, 60)  # connect, read (seconds)
CHUNK = 1 << 20


class KeyringError(ConfigError):
    """A key file does not hold exactly the keys the image definition pins."""


class MirrorError(FactoryError):
    """The archive mirror or a download URL cannot be reached."""


class MissingSuiteError(ConfigError):
    """The mirror has no such codename or pocket: the image definition names a suite that is
    not there (or the mirror setting points at the wrong archive)."""


class VerificationError(FactoryError):
    """A downloaded file failed its signature or checksum: nothing was cached."""


class BaseBuildError(FactoryError):
    """The built base is not what it must be (no kernel, no virtio_blk, hygiene check failed)."""


@dataclass(frozen=True)
class BaseImage:
    path: Path  # the qcow2 in the cache entry
    sha256: str
    cache_key: str
    # Pocket -> the archive's Release `Date:` (ISO 8601, UTC) the base was built from.
    release_dates: Mapping[str, str]
    size: int  # bytes of the qcow2 file
    kernel: str
    from_cache: bool


@dataclass(frozen=True)
class CloudImage:
    path: Path
    sha256: str
    url: str
    size: int
    signer: str  # fingerprint of the pinned key that signed SHA256SUMS
    from_cache: bool


# --- trust: keyrings of exactly the pinned keys ----------------------------------------------


def pinned_keyring(
    key_file: Path, fingerprints: Sequence[str], dest: Path, *, exact: bool = True
) -> list[str]:
    """Write to ``dest`` a binary keyring of only the pinned keys found in ``key_file``.

    With ``exact`` the file must hold the pinned keys and nothing else (the committed
    archive keys); without it, keys that are not pinned are left out and at least one
    pinned key must be present (a user-supplied cloud-image keyring).
    """
    pinned = [f.replace(" ", "").upper() for f in fingerprints]
    with tempfile.TemporaryDirectory(prefix="imagefactory-gpg-") as home:
        gpg = gnupg.GPG(gnupghome=home)
        try:
            gpg.import_keys_file(str(key_file))
        except FileNotFoundError:
            raise KeyringError(f"{key_file}: no such key file") from None
        found = [key["fingerprint"] for key in gpg.list_keys()]
        keep = [f for f in pinned if f in found]
        missing = [f for f in pinned if f not in found]
        extra = [f for f in found if f not in pinned]
        if not keep or (exact and (missing or extra)):
            raise KeyringError(
                f"{key_file}: its keys ({', '.join(found) or 'none'}) do not match the pinned "
                f"fingerprints ({', '.join(pinned)})"
                + (f"; missing {', '.join(missing)}" if missing else "")
            )
        exported = gpg.export_keys(keep, armor=False)
    dest.write_bytes(exported if isinstance(exported, bytes) else exported.encode())
    return keep


# --- inputs, cache key, cache entries --------------------------------------------------------


def mirror_for(image: ImageDefinition, settings: Settings) -> str:
    return (settings.mirror or image.base.archive.mirror).rstrip("/")


def base_packages(image: ImageDefinition) -> list[str]:
    kernel = image.base.archive.kernel_package or f"linux-image-{image.kernel_flavour}"
    return sorted(set(image.base.archive.packages) | {kernel, *CLOUD_IMAGE_PACKAGES})


def base_inputs(image: ImageDefinition, settings: Settings) -> dict[str, Any]:
    """Everything that decides what the base contains; its digest is the cache key."""
    archive = image.base.archive
    return {
        "builder_version": BUILDER_VERSION,
        "image": image.name,
        "release": image.release,
        "codename": image.codename,
        "architecture": "amd64",
        "variant": "minbase",
        "mirror": mirror_for(image, settings),
        "pockets": list(archive.pockets),
        "components": sorted(set(archive.components)),
        "packages": base_packages(image),
        "kernel_flavour": image.kernel_flavour,
        "disk_size": archive.disk_size,
        "path_exclude": list(archive.path_exclude),
        "path_include": list(archive.path_include),
        "enable_units": list(archive.enable_units),
        "keyring_fingerprints": sorted(archive.keyring_fingerprints),
    }


def cache_key(inputs: Mapping[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def cache_entry(settings: Settings, image_name: str, key: str) -> Path:
    return settings.cache_dir / "base" / f"{image_name}-{key[:16]}"


def load_cached_base(entry: Path, key: str, log: StepLog) -> BaseImage | None:
    """The complete, intact entry at ``entry``, or None (an unusable entry is removed)."""
    if not entry.exists():
        return None
    problem = _entry_problem(entry, key)
    if problem:
        log.say(f"discarding cache entry {entry}: {problem}")
        safe_rmtree(entry)
        return None
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    return _base_image(entry, manifest, from_cache=True)


def _entry_problem(entry: Path, key: str) -> str | None:
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return "no manifest (an interrupted build)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if manifest.get("cache_key") != key:
        return "manifest belongs to other inputs"
    qcow2 = entry / QCOW2_NAME
    if not qcow2.is_file():
        return f"{QCOW2_NAME} is missing"
    if sha256_file(qcow2) != manifest.get("sha256"):
        return f"{QCOW2_NAME} does not match its sha256 (corrupted)"
    return None


def _base_image(entry: Path, manifest: Mapping[str, Any], from_cache: bool) -> BaseImage:
    return BaseImage(
        path=entry / QCOW2_NAME,
        sha256=manifest["sha256"],
        cache_key=manifest["cache_key"],
        # In pocket order (the manifest's JSON keys are sorted).
        release_dates={p: manifest["release_dates"][p] for p in manifest["inputs"]["pockets"]},
        size=manifest["size"],
        kernel=manifest["kernel"],
        from_cache=from_cache,
    )


@contextlib.contextmanager
def _locked(lock_path: Path, log: StepLog) -> Iterator[None]:
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log.say(f"waiting for another run that holds {lock_path}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _replace_entry(entry: Path, new: Path, scratch: Path) -> None:
    """Put ``new`` at ``entry`` by rename; a previous entry goes to ``scratch`` first."""
    for path in (new, *new.iterdir()):
        _fsync(path)
    if entry.exists():
        entry.rename(scratch / "previous-entry")
    new.rename(entry)
    _fsync(entry.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    _fsync(path)


# --- building the base from the archive ------------------------------------------------------


def build_base(
    image: ImageDefinition,
    settings: Settings,
    log: StepLog,
    refresh: bool = False,
    key_file: Path = ARCHIVE_KEYRING,
) -> BaseImage:
    """The base qcow2 for ``image``: from the cache, or built (``refresh`` forces a build)."""
    inputs = base_inputs(image, settings)
    key = cache_key(inputs)
    entry = cache_entry(settings, image.name, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent / f"{entry.name}.lock", log):
        if not refresh:
            cached = load_cached_base(entry, key, log)
            if cached is not None:
                log.say(f"cache hit: {cached.path} (built from archive {_dates(cached)})")
                return cached
        _reap_stale(entry, log)
        with log.step(f"build base {image.name} ({key[:16]})"):
            return _build_entry(entry, inputs, key, key_file, log)


def _dates(base: BaseImage) -> str:
    return ", ".join(f"{pocket} {date}" for pocket, date in base.release_dates.items())


def _build_entry(
    entry: Path, inputs: Mapping[str, Any], key: str, key_file: Path, log: StepLog
) -> BaseImage:
    work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
    # apt downloads as the unprivileged _apt user only if it can reach the tree's lists.
    work.chmod(0o755)
    failure: BaseException | None = None
    try:
        keyring = work / "archive-keyring.gpg"
        _preflight(inputs, key_file, keyring)
        started = time.monotonic()
        result = work / "entry"
        result.mkdir()
        facts = _build_into(work, result, inputs, keyring, log)
        with log.step("record"):
            qcow2 = result / QCOW2_NAME
            manifest = {
                **facts,
                "cache_key": key,
                "inputs": dict(inputs),
                "sha256": sha256_file(qcow2),
                "size": qcow2.stat().st_size,
                "built_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "build_seconds": round(time.monotonic() - started, 1),
            }
            _write_json(result / MANIFEST_NAME, manifest)  # last: it marks the entry complete
            _replace_entry(entry, result, work)
        log.say(f"base {entry / QCOW2_NAME}: {manifest['size'] / 2**20:.0f} MiB")
        return _base_image(entry, manifest, from_cache=False)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        _remove_work(work, failure)


def _remove_work(work: Path, failure: BaseException | None) -> None:
    """Remove the build's scratch directory; a failure to do so is noted on ``failure``."""
    try:
        safe_rmtree(work)
    except CleanupError as error:
        if failure is None:
            raise
        failure.add_note(str(error))


def _preflight(inputs: Mapping[str, Any], key_file: Path, keyring: Path) -> None:
    """Refuse early, with one line, what would otherwise fail minutes into the build."""
    pinned_keyring(key_file, inputs["keyring_fingerprints"], keyring, exact=True)
    check_mirror(inputs["mirror"], inputs["codename"], inputs["pockets"])
    for tool, package in HOST_TOOLS.items():
        require_tool(tool, package)
    if os.geteuid() != 0:
        raise ConfigError("building a base image needs root (loop devices, mounts, chroot)")


def check_mirror(mirror: str, codename: str, pockets: Sequence[str] = ()) -> None:
    """Every pocket must be on the mirror (its signed InRelease answers) before anything is
    built or cached: a 404 is the definition's fault (exit 2), no answer the network's."""
    for pocket in pockets or [codename]:
        url = f"{mirror}/dists/{pocket}/InRelease"
        status = _status(mirror, url)
        if status != 200:
            raise MissingSuiteError(
                f"archive mirror {mirror} has no pocket {pocket} of {codename} "
                f"({url}: {'not found' if status == 404 else f'HTTP {status}'}); "
                "nothing was built or cached"
            )


def _status(mirror: str, url: str) -> int:
    if urlsplit(mirror).scheme == "file":
        return 200 if Path(urlsplit(url).path).is_file() else 404
    try:
        with requests.get(url, timeout=HTTP_TIMEOUT, stream=True) as response:
            return response.status_code
    except requests.RequestException as exc:
        raise MirrorError(
            f"archive mirror {mirror} is unreachable ({type(exc).__name__})"
        ) from None


def _build_into(
    work: Path, result: Path, inputs: Mapping[str, Any], keyring: Path, log: StepLog
) -> dict[str, Any]:
    say = log.say
    tree = work / "tree"
    with log.step("mmdebstrap"):
        run(mmdebstrap_command(inputs, keyring, tree), timeout=MMDEBSTRAP_TIMEOUT_S, log=say)
        dates = release_dates(tree / "var/lib/apt/lists", inputs["pockets"])
        say("archive: " + ", ".join(f"{p} {d}" for p, d in dates.items()))
        kernel = _kernel_version(tree)
    with log.step("configure"):
        configure_tree(tree, inputs)
        enable_units(tree, inputs["enable_units"], say)
        packages = run(
            ["chroot", tree, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n"],
            capture=True,
            env=CHROOT_ENV,
            log=say,
        ).stdout
        (result / PACKAGES_NAME).write_text(packages)
    raw = work / "disk.raw"
    with log.step("disk"), Cleanup(say) as cleanup:
        _write_disk(tree, raw, inputs["disk_size"], work / "mnt", kernel, cleanup, say)
    safe_rmtree(tree)
    with log.step("convert to qcow2"):
        qcow2 = result / QCOW2_NAME
        run(["qemu-img", "convert", "-O", "qcow2", "-c", raw, qcow2], log=say)
        run(["qemu-img", "check", qcow2], capture=True, log=say)
        raw.unlink()
    return {"release_dates": dates, "kernel": kernel}


MAN_SECTIONS = " ".join(f'"$1/usr/share/man/man{n}"' for n in range(1, 9))


def mmdebstrap_command(inputs: Mapping[str, Any], keyring: Path, target: Path) -> list[str]:
    """mmdebstrap with apt trusting only ``keyring`` (it verifies every Release file)."""
    components = " ".join(inputs["components"])
    sources = [f"deb {inputs['mirror']} {pocket} {components}" for pocket in inputs["pockets"]]
    return [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        f"--variant={inputs['variant']}",
        f"--architectures={inputs['architecture']}",
        f"--keyring={keyring}",
        f"--include={','.join(inputs['packages'])}",
        # Kept until we have read each pocket's Release date; removed in configure_tree.
        "--skip=cleanup/apt/lists",
        '--aptopt=Acquire::Retries "3"',
        # Documentation a server never reads, left out like Ubuntu's minimal images do; kept
        # for every later install too (mmdebstrap writes these into /etc/dpkg/dpkg.cfg.d).
        *(f"--dpkgopt=path-exclude={path}" for path in inputs["path_exclude"]),
        *(f"--dpkgopt=path-include={path}" for path in inputs["path_include"]),
        # update-alternatives (dash's postinst, among others) links into man sections even
        # when the pages themselves are excluded: the directories must exist beforehand.
        f"--setup-hook=mkdir -p {MAN_SECTIONS}",
        inputs["codename"],
        str(target),
        *sources,
    ]


def release_dates(lists_dir: Path, pockets: Sequence[str]) -> dict[str, str]:
    """Pocket -> `Date:` of the (apt-verified) Release file mmdebstrap used, as ISO UTC."""
    found: dict[str, str] = {}
    for path in sorted(lists_dir.glob("*Release")):
        text = path.read_text(errors="replace")
        suite = re.search(r"^Suite: *(\S+)", text, re.MULTILINE)
        date = re.search(r"^Date: *(.+)$", text, re.MULTILINE)
        if suite and date:
            when = parsedate_to_datetime(date.group(1).strip()).astimezone(UTC)
            found[suite.group(1)] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    missing = [p for p in pockets if p not in found]
    if missing:
        raise BaseBuildError(f"no Release file for {', '.join(missing)} in {lists_dir}")
    return {pocket: found[pocket] for pocket in pockets}


def _kernel_version(tree: Path) -> str:
    versions = sorted(p.name for p in (tree / "lib/modules").iterdir())
    if len(versions) != 1:
        raise BaseBuildError(f"expected one kernel in the base, found {versions or 'none'}")
    return versions[0]


# --- what the base holds besides packages -----------------------------------------------------


def configure_tree(root: Path, inputs: Mapping[str, Any]) -> None:
    """Cloud-image configuration and hygiene, written into the unpacked tree."""
    mirror, pockets = inputs["mirror"], inputs["pockets"]
    components = " ".join(inputs["components"])
    files = {
        "etc/hostname": f"{HOSTNAME}\n",
        "etc/hosts": HOSTS,
        "etc/fstab": f"LABEL={ROOT_LABEL}\t/\text4\tdiscard,errors=remount-ro\t0 1\n",
        "etc/apt/sources.list": "".join(f"deb {mirror} {p} {components}\n" for p in pockets),
        "etc/default/grub.d/50-imagefactory.cfg": GRUB_DEFAULTS,
        # No swap to resume from: don't let the initramfs look for one.
        "etc/initramfs-tools/conf.d/resume": "RESUME=none\n",
        "etc/cloud/cloud.cfg.d/95_imagefactory.cfg": cloud_config(mirror),
        "etc/machine-id": "",  # empty: systemd makes a new one on first boot
        # mmdebstrap leaves it out; without it `apt-get install` fails in dpkg --set-selections.
        "var/lib/dpkg/available": "",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # Unique per machine: cloud-init/openssh make them on first boot.
    for path in [
        *root.glob("etc/ssh/ssh_host_*"),
        root / "var/lib/dbus/machine-id",
        *root.glob("var/lib/cloud/*"),
    ]:
        _remove(path)
    _resolver(root)
    _clean_apt(root)


RESOLVED_STUB = "../run/systemd/resolve/stub-resolv.conf"


def _resolver(root: Path) -> None:
    """Like Ubuntu's images: /etc/resolv.conf is systemd-resolved's stub. mmdebstrap leaves the
    build host's own copy when no package replaced it (noble's base without systemd-resolved)."""
    resolv = root / "etc/resolv.conf"
    has_resolved = any((root / d / "systemd/systemd-resolved").exists() for d in ("usr/lib", "lib"))
    if has_resolved and not resolv.is_symlink():
        resolv.unlink(missing_ok=True)
        resolv.symlink_to(RESOLVED_STUB)


def enable_units(root: Path, units: Sequence[str], say: Callable[[str], None]) -> None:
    """Enable units the release's packages leave off but its cloud images run (offline:
    systemctl only writes the [Install] symlinks into the tree)."""
    for unit in units:
        _chroot(root, ["systemctl", "enable", unit], say)


def cloud_config(mirror: str) -> str:
    config = {
        # The qemu provider seeds cloud-init with a NoCloud ISO (label cidata).
        "datasource_list": ["NoCloud", "ConfigDrive", "None"],
        # cloud-init rewrites sources.list on first boot: keep it on our mirror.
        "apt": {
            "primary": [{"arches": ["default"], "uri": mirror}],
            "security": [{"arches": ["default"], "uri": mirror}],
        },
    }
    header = "# Written by imagefactory's base builder.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


HOSTS = """\
127.0.0.1 localhost

# The following lines are desirable for IPv6 capable hosts
::1 ip6-localhost ip6-loopback
fe00::0 ip6-localnet
ff00::0 ip6-mcastprefix
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
"""

# Like Ubuntu's cloud images: the serial console last, so /dev/console (systemd's and
# cloud-init's output) is ttyS0, which is what QEMU and the clouds log.
GRUB_DEFAULTS = """\
# Written by imagefactory's base builder.
GRUB_CMDLINE_LINUX_DEFAULT="console=tty1 console=ttyS0"
GRUB_TERMINAL=console
GRUB_TIMEOUT_STYLE=hidden
GRUB_TIMEOUT=0
GRUB_RECORDFAIL_TIMEOUT=0
GRUB_DISABLE_OS_PROBER=true
"""


def _clean_apt(root: Path) -> None:
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb"):
        for path in root.glob(pattern):
            if path.name not in ("lock", "partial"):
                _remove(path)
    for path in root.glob("var/lib/apt/lists/partial/*"):
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def hygiene_problems(root: Path) -> list[str]:
    """What must not be (or must be) in a base image; empty when all is well."""
    problems = []
    if list(root.glob("etc/ssh/ssh_host_*")):
        problems.append("SSH host keys are present")
    machine_id = root / "etc/machine-id"
    if not machine_id.is_file() or machine_id.read_text().strip():
        problems.append("/etc/machine-id is not empty")
    for line in (root / "etc/shadow").read_text().splitlines():
        user, secret = line.split(":")[:2]
        if not secret.startswith(("*", "!")):
            problems.append(f"user {user} has a usable (or empty) password")
    if [p for p in root.glob("var/lib/apt/lists/*") if p.name not in ("lock", "partial")]:
        problems.append("apt lists were not cleaned")
    resolv = root / "etc/resolv.conf"
    if resolv.is_file() and not resolv.is_symlink() and _is_hosts_resolv(resolv):
        problems.append("/etc/resolv.conf is the build host's")
    if not (root / "usr/bin/lsb_release").exists():
        problems.append("lsb-release is missing (cloud-init would break sources.list)")
    problems += _boot_problems(root)
    return problems


def _is_hosts_resolv(resolv: Path) -> bool:
    try:
        return resolv.read_bytes() == Path("/etc/resolv.conf").read_bytes()
    except OSError:
        return False


def _boot_problems(root: Path) -> list[str]:
    grub_cfg = root / "boot/grub/grub.cfg"
    if not grub_cfg.is_file():
        return ["boot/grub/grub.cfg is missing"]
    text = grub_cfg.read_text()
    problems = []
    if "/dev/loop" in text:
        problems.append("grub.cfg refers to a loop device")
    if f"root=LABEL={ROOT_LABEL}" not in text:
        problems.append(f"grub.cfg does not boot root=LABEL={ROOT_LABEL}")
    if "console=ttyS0" not in text:
        problems.append("grub.cfg has no serial console")
    return problems


# --- disk, filesystem, bootloader -------------------------------------------------------------


def _write_disk(
    tree: Path,
    raw: Path,
    disk_size: str,
    mnt: Path,
    kernel: str,
    cleanup: Cleanup,
    say: Callable[[str], None],
) -> None:
    with raw.open("wb") as f:
        f.truncate(parse_size(disk_size))
    run(["sfdisk", "--quiet", raw], input=PARTITION_TABLE, log=say)
    loop = attach_loop(raw, cleanup, say)
    partition = f"{loop}p1"
    # The tree's own mke2fs: a newer host one may enable features its e2fsck and GRUB lack.
    with Cleanup(say) as tree_mounts:
        chroot_mounts(tree, tree_mounts, say)
        _chroot(tree, ["mkfs.ext4", "-q", "-L", ROOT_LABEL, partition], say)
    mnt.mkdir()
    run(["mount", partition, mnt], log=say)
    cleanup.push(f"unmount {mnt}", partial(unmount, mnt, say))
    run(["cp", "-a", f"{tree}/.", f"{mnt}/"], log=say)
    with Cleanup(say) as mounts:
        chroot_mounts(mnt, mounts, say)
        _install_boot(mnt, loop, kernel, say)
    problems = hygiene_problems(mnt)
    if problems:
        raise BaseBuildError("the base fails its hygiene checks: " + "; ".join(problems))
    run(["fstrim", mnt], log=say)  # freed blocks become holes: a smaller qcow2


def _install_boot(root: Path, loop: str, kernel: str, say: Callable[[str], None]) -> None:
    selections = f"grub-pc grub-pc/install_devices multiselect {GRUB_INSTALL_DEVICE}\n"
    _chroot(root, ["debconf-set-selections"], say, input=selections)
    _chroot(root, ["update-initramfs", "-u", "-k", kernel], say)
    # Without the disk's driver there is no root: it must be built in or in the initramfs.
    listing = _chroot(root, ["lsinitramfs", f"/boot/initrd.img-{kernel}"], say, capture=True)
    builtin = (root / "lib/modules" / kernel / "modules.builtin").read_text()
    missing = drivers_missing_at_boot(listing, builtin, BOOT_DRIVERS)
    if missing:
        raise BaseBuildError(f"the initramfs of {kernel} lacks {', '.join(missing)}")
    _chroot(root, ["grub-install", "--target=i386-pc", "--boot-directory=/boot", loop], say)
    _chroot(root, ["update-grub"], say)
    # Without udev grub-mkconfig sees no /dev/disk/by-uuid and writes root=/dev/loopNpM.
    grub_cfg = root / "boot/grub/grub.cfg"
    text = re.sub(r"root=/dev/loop\d+p\d+", f"root=LABEL={ROOT_LABEL}", grub_cfg.read_text())
    grub_cfg.write_text(text)


def module_names(paths: str) -> set[str]:
    """Module names in a listing of paths (``.../virtio_blk.ko.zst`` -> ``virtio_blk``):
    uncompressed (focal, jammy) or compressed (noble on: zstd), ``-`` read as ``_``."""
    found = re.findall(r"([^/\s]+)\.ko(?:\.(?:zst|xz|gz))?$", paths, re.MULTILINE)
    return {name.replace("-", "_") for name in found}


def drivers_missing_at_boot(initramfs_listing: str, modules_builtin: str,
                            drivers: Sequence[str]) -> list[str]:  # fmt: skip
    """The drivers neither built into the kernel (modules.builtin) nor in the initramfs."""
    present = module_names(initramfs_listing) | module_names(modules_builtin)
    return [d for d in drivers if d.replace("-", "_") not in present]


def _chroot(
    root: Path,
    argv: list[str],
    say: Callable[[str], None],
    *,
    input: str | None = None,
    capture: bool = False,
) -> str:
    done = run(
        ["chroot", root, *argv],
        env=CHROOT_ENV,
        input=input,
        capture=capture,
        timeout=STEP_TIMEOUT_S,
        log=say,
    )
    return done.stdout or ""


def parse_size(text: str) -> int:
    match = re.fullmatch(r"([1-9][0-9]*)([MG])", text)
    if not match:
        raise ConfigError(f"{text!r} is not a size like 4G or 3500M")
    return int(match.group(1)) * {"M": 2**20, "G": 2**30}[match.group(2)]


# --- releasing what was acquired -------------------------------------------------------------


def _reap_stale(entry: Path, log: StepLog) -> None:
    """Release what an interrupted build of this entry left (we hold its lock)."""
    for stale in sorted(entry.parent.glob(f".{entry.name}.tmp-*")):
        log.say(f"removing what an interrupted build left: {stale}")
        kill_chroot_processes(stale)
        with Cleanup(log.say) as cleanup:
            for raw in stale.glob("*.raw"):
                _detach_loops_of(raw, cleanup, log.say)
            for point in reversed(mounts_under(stale)):  # pushed shallow first: undone deepest
                cleanup.push(f"unmount {point}", partial(unmount, point, log.say))
        safe_rmtree(stale)


def _detach_loops_of(raw: Path, cleanup: Cleanup, say: Callable[[str], None]) -> None:
    listed = run(["losetup", "--associated", raw, "--noheadings", "--output", "NAME"],
                 capture=True, log=say)  # fmt: skip
    for device in listed.stdout.split():
        cleanup.push(f"detach {device}", partial(run, ["losetup", "--detach", device], log=say))


# --- Ubuntu's published cloud image ----------------------------------------------------------


def fetch_cloud_image(
    cloud: CloudImageBase,
    settings: Settings,
    log: StepLog,
    key_file: Path = CLOUD_IMAGE_KEYRING,
) -> CloudImage:
    """The cloud image at ``cloud.url``, verified against signed SHA256SUMS, then cached."""
    cloud_dir = settings.cache_dir / "cloud"
    cloud_dir.mkdir(parents=True, exist_ok=True)
    name = Path(urlsplit(cloud.url).path).name
    with log.step(f"verify SHA256SUMS for {name}"):
        sums = _download_bytes(cloud.sha256sums_url)
        signature = _download_bytes(cloud.signature_url)
        signer = verify_signature(sums, signature, key_file, cloud.keyring_fingerprints)
        expected = checksum_for(sums.decode(errors="replace"), name, cloud.sha256sums_url)
        log.say(f"SHA256SUMS signed by {signer}; {name} must have sha256 {expected}")
    entry = cloud_dir / f"{name}-{expected[:16]}"
    with _locked(cloud_dir / f"{entry.name}.lock", log):
        cached = _cached_cloud_image(entry, expected, log)
        if cached is not None:
            log.say(f"cache hit: {cached.path}")
            return cached
        with log.step(f"download {cloud.url}"):
            return _download_entry(cloud.url, name, expected, signer, entry)


def _download_entry(url: str, name: str, expected: str, signer: str, entry: Path) -> CloudImage:
    work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp-"))
    try:
        result = work / "entry"
        result.mkdir()
        target = result / name
        actual, size = _download_file(url, target)
        if actual != expected:
            raise VerificationError(
                f"{url}: sha256 {actual} does not match the signed SHA256SUMS ({expected}); "
                "nothing was cached"
            )
        manifest = {"url": url, "sha256": actual, "size": size, "signer": signer, "file": name}
        _write_json(result / MANIFEST_NAME, manifest)
        _replace_entry(entry, result, work)
        return CloudImage(entry / name, actual, url, size, signer, from_cache=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached_cloud_image(entry: Path, expected: str, log: StepLog) -> CloudImage | None:
    if not entry.exists():
        return None
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text())
        path = entry / manifest["file"]
        if manifest["sha256"] == expected and sha256_file(path) == expected:
            return CloudImage(
                path, expected, manifest["url"], manifest["size"], manifest["signer"], True
            )
    except (OSError, ValueError, KeyError):
        pass
    log.say(f"discarding incomplete or corrupted cache entry {entry}")
    shutil.rmtree(entry)
    return None


def verify_signature(
    data: bytes, signature: bytes, key_file: Path, fingerprints: Sequence[str]
) -> str:
    """The fingerprint of the pinned key whose good signature ``signature`` is."""
    with tempfile.TemporaryDirectory(prefix="imagefactory-gpg-") as home:
        keyring = Path(home) / "pinned.gpg"
        pinned = pinned_keyring(key_file, fingerprints, keyring, exact=False)
        verify_home = Path(home) / "home"
        verify_home.mkdir(mode=0o700)
        gpg = gnupg.GPG(gnupghome=str(verify_home))
        gpg.import_keys_file(str(keyring))
        sig_path = Path(home) / "data.sig"
        sig_path.write_bytes(signature)
        verified = gpg.verify_data(str(sig_path), data)
    signer = (verified.pubkey_fingerprint or "").upper()
    if not verified.valid or signer not in pinned:
        reason = verified.status or "no valid signature"
        raise VerificationError(
            f"SHA256SUMS: signature not made by a pinned key ({reason}; pinned: "
            f"{', '.join(pinned)}); nothing was cached"
        )
    return signer


def checksum_for(sums: str, name: str, sums_url: str) -> str:
    found = set()
    for line in sums.splitlines():
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.strip())
        if match and match.group(2) == name:
            found.add(match.group(1).lower())
    if len(found) != 1:
        problem = "no entry" if not found else "conflicting entries"
        raise VerificationError(f"{sums_url} has {problem} for {name}; nothing was cached")
    return found.pop()


def _download_bytes(url: str) -> bytes:
    try:
        response = requests.get(url, timeout=HTTP_TIMEOUT)
        response.raise_for_status()
    except requests.RequestException as exc:
        raise MirrorError(f"cannot download {url} ({_reason(exc)})") from None
    return response.content


def _download_file(url: str, target: Path) -> tuple[str, int]:
    """Stream ``url`` to ``target``; its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        with requests.get(url, stream=True, timeout=HTTP_TIMEOUT) as response:
            response.raise_for_status()
            with target.open("wb") as out:
                for chunk in response.iter_content(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
    except requests.RequestException as exc:
        raise MirrorError(f"cannot download {url} ({_reason(exc)})") from None
    return digest.hexdigest(), size


def _reason(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__
