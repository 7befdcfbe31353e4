"""Disk images on the host: loop devices, mounts, chroots, and releasing all of them.

Used to build the base image and to look inside built images (tests, fault injection).
Every acquisition registers its undo step on a ``Cleanup`` right away.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from .errors import FactoryError
from .runner import CommandError, run


class DiskError(FactoryError):
    """A loop device or partition did not behave."""


class CleanupError(FactoryError):
    """Mounts, loop devices or processes could not all be released."""


def attach_loop(raw: Path, cleanup: Cleanup, say: Callable[[str], None]) -> str:
    loop = run(["losetup", "--find", "--show", "--partscan", raw], capture=True, log=say)
    device = loop.stdout.strip()
    cleanup.push(f"detach {device}", partial(run, ["losetup", "--detach", device], log=say))
    # No udev here: ask the kernel for the partitions; devtmpfs then makes the nodes.
    run(["partx", "--add", device], check=False, capture=True, log=say)
    partition = Path(f"{device}p1")
    deadline = time.monotonic() + 10
    while not partition.is_block_device():
        if time.monotonic() > deadline:
            raise DiskError(f"{partition} did not appear after partx --add {device}")
        time.sleep(0.2)
    return device


def chroot_mounts(root: Path, cleanup: Cleanup, say: Callable[[str], None]) -> None:
    for args, target in (
        (["--bind", "/dev"], "dev"),
        (["-t", "proc", "proc"], "proc"),
        (["-t", "sysfs", "sysfs"], "sys"),
    ):
        path = root / target
        path.mkdir(exist_ok=True)
        run(["mount", *args, path], log=say)
        cleanup.push(f"unmount {path}", partial(unmount, path, say))
    # Runs first on the way out: nothing started in the chroot may keep a mount busy.
    cleanup.push(f"stop processes in {root}", partial(kill_chroot_processes, root))


class Cleanup:
    """Undo steps, registered right after each acquisition and run in reverse order.

    Every step runs even when one fails; their errors are reported together. On the way
    out of a failure they are added to the original error instead of replacing it.
    """

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, undo: Callable[[], object]) -> None:
        self._undo.append((what, undo))

    def __enter__(self) -> Cleanup:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        errors: list[str] = []
        interrupted = False
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except KeyboardInterrupt:
                interrupted = True
                errors.append(f"{what}: interrupted")
            except Exception as error:
                errors.append(f"{what}: {error}")
        for error in errors:
            self.say(f"cleanup failed: {error}")
        if exc is not None:
            for error in errors:
                exc.add_note(f"cleanup failed: {error}")
            return False
        if interrupted:
            raise KeyboardInterrupt
        if errors:
            raise CleanupError("could not release everything: " + "; ".join(errors))
        return False


def unmount(path: Path, say: Callable[[str], None]) -> None:
    try:
        run(["umount", path], capture=True, log=say)
    except CommandError:
        # Detach it anyway so nothing below it can be deleted through it; still an error.
        run(["umount", "--lazy", path], check=False, capture=True, log=say)
        raise


def kill_chroot_processes(root: Path) -> None:
    """SIGKILL processes whose root directory is ``root`` (daemons a maintscript started)."""
    target = os.path.realpath(root)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            proc_root = os.readlink(proc / "root")
        except OSError:
            continue
        if proc_root == target or proc_root.startswith(target + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    top = os.path.realpath(path)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = unescape_mountinfo(line.split()[4])
        if point == top or point.startswith(top + "/"):
            found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def safe_rmtree(path: Path) -> None:
    """rmtree that refuses to descend into mounts (a bind-mounted /dev, for one)."""
    if not path.exists():
        return
    left = mounts_under(path)
    if left:
        raise CleanupError(
            f"{path} still has mounts ({', '.join(map(str, left))}); "
            "unmount them and remove it by hand"
        )
    shutil.rmtree(path)


@contextlib.contextmanager
def mounted_image(qcow2: Path, say: Callable[[str], None]) -> Iterator[Path]:
    """The root filesystem of ``qcow2``, mounted read-only from a sparse raw copy."""
    with tempfile.TemporaryDirectory(prefix="imagefactory-disk-") as scratch:
        raw, mnt = Path(scratch) / "disk.raw", Path(scratch) / "root"
        run(["qemu-img", "convert", "-O", "raw", qcow2, raw], log=say)
        with Cleanup(say) as cleanup:
            loop = attach_loop(raw, cleanup, say)
            mnt.mkdir()
            # noload: a read-only look must not even replay the journal.
            run(["mount", "-o", "ro,noload", f"{loop}p1", mnt], log=say)
            cleanup.push(f"unmount {mnt}", partial(unmount, mnt, say))
            yield mnt


def modified_copy(
    source: Path, destination: Path, change: Callable[[Path], None], say: Callable[[str], None]
) -> Path:
    """A standalone qcow2 copy of ``source`` with ``change(root)`` applied to its root
    filesystem (for fault injection); ``source`` is never touched."""
    with tempfile.TemporaryDirectory(prefix="imagefactory-disk-", dir=destination.parent) as tmp:
        raw, mnt = Path(tmp) / "disk.raw", Path(tmp) / "root"
        run(["qemu-img", "convert", "-O", "raw", source, raw], log=say)
        with Cleanup(say) as cleanup:
            loop = attach_loop(raw, cleanup, say)
            mnt.mkdir()
            run(["mount", f"{loop}p1", mnt], log=say)
            cleanup.push(f"unmount {mnt}", partial(unmount, mnt, say))
            change(mnt)
        run(["qemu-img", "convert", "-O", "qcow2", raw, destination], log=say)
    return destination
