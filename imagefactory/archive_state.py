"""Which package versions the archive would install today, asked of apt itself.

A scheduled rebuild skips an image whose inputs are unchanged and whose packages the archive
still offers at the versions it was built with. apt answers that question (pockets, pin
priorities, version ordering are its business) in a private state directory per image:

- its own configuration (``APT_CONFIG``), read *instead of* the host's ``/etc/apt`` (whose
  ``apt.conf.d`` may switch off checks such as ``Check-Valid-Until``, run hooks or fetch extra
  indices) and an empty dpkg status (the host's installed packages must not count);
- a keyring of exactly the pinned archive keys, bound to the sources with ``signed-by``: apt
  verifies every Release file against those keys and the indices against the Release hashes;
- lists kept between runs under ``<cache_dir>/archive-state/<image>``: while the archive does
  not move, a warm run fetches no more than each pocket's InRelease (apt asks
  If-Modified-Since; a server that sends no Last-Modified gets the file again).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from . import base
from .definitions import PACKAGE_NAME, ImageDefinition
from .errors import ConfigError, FactoryError
from .runner import CommandError, require_tool, run
from .settings import Settings

STATE_DIR = "archive-state"
KEYRING_NAME = "archive-keyring.gpg"  # apt wants .gpg for a binary keyring in signed-by
ARCHITECTURE = "amd64"
# apt-cache policy names per call: ~500 manifest names fit one command line easily, but a
# bound keeps argv far below ARG_MAX whatever the manifest holds.
BATCH = 200
UPDATE_TIMEOUT_S = 900
POLICY_TIMEOUT_S = 300
RETRIES = 3  # per download, with apt's backoff (1, 2, 4 s): a mirror hiccup is no failure
# apt translates its output; we parse "Candidate:" and "E:" lines.
APT_ENV = {"LC_ALL": "C"}

_HEADER = re.compile(r"^([a-z0-9][a-z0-9+.-]*)(?::[a-z0-9-]+)?:$")
_CANDIDATE = re.compile(r"^\s+Candidate:\s*(\S+)\s*$")
_UNSAFE_PATH = re.compile(r'[\s"\\;\[\]]')


class ArchiveStateError(FactoryError):
    """apt could not fetch or verify the archive's indices (or could not read them)."""


def candidate_versions(
    image: ImageDefinition,
    settings: Settings,
    packages: Iterable[str],
    log: Callable[[str], None] = print,
) -> dict[str, str]:
    """For each package name, the version apt would install from the image's archive (mirror,
    pockets, components) now; packages the archive does not know are absent from the result.

    Names may carry an architecture qualifier (``libc6:amd64``); the result is keyed by the
    bare name.
    """
    names = package_names(packages)
    if not names:
        return {}
    for tool in ("apt-get", "apt-cache"):
        require_tool(tool, "apt")
    root = state_dir(settings, image)
    root.parent.mkdir(parents=True, exist_ok=True)
    mirror = base.mirror_for(image, settings)
    with _locked(root.parent / f"{root.name}.lock", log):
        config = prepare(root, image, mirror)
        env = APT_ENV | {"APT_CONFIG": str(config)}
        update(env, mirror, log)
        return policy(env, names, log)


def changed_packages(
    manifest: Mapping[str, str], candidates: Mapping[str, str]
) -> dict[str, tuple[str, str]]:
    """name -> (installed, candidate) for every manifest package whose candidate differs.

    A package the archive no longer offers (absent from ``candidates``) is not a change: the
    image cannot be rebuilt with a newer one.
    """
    moved = {}
    for name, installed in manifest.items():
        candidate = candidates.get(bare_name(name))
        if candidate is not None and candidate != installed:
            moved[name] = (installed, candidate)
    return moved


# --- names ------------------------------------------------------------------------------------


def bare_name(name: str) -> str:
    """``libc6:amd64`` -> ``libc6`` (Debian package names never hold a colon)."""
    return name.partition(":")[0]


def package_names(packages: Iterable[str]) -> list[str]:
    """Sorted, unique bare names; a name that is not a package name never reaches argv."""
    names = sorted({bare_name(p) for p in packages})
    bad = [n for n in names if not PACKAGE_NAME.match(n)]
    if bad:
        raise ArchiveStateError(f"not Debian package names: {', '.join(map(repr, bad[:5]))}")
    return names


# --- the private apt state --------------------------------------------------------------------


def state_dir(settings: Settings, image: ImageDefinition) -> Path:
    return settings.cache_dir / STATE_DIR / image.name


@contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log(f"waiting for another run that holds {path}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def prepare(root: Path, image: ImageDefinition, mirror: str) -> Path:
    """Write the keyring, sources and configuration under ``root``; the configuration file."""
    if _UNSAFE_PATH.search(str(root)):
        # The paths go into apt.conf and sources.list, which have no quoting for these.
        raise ConfigError(f"{root}: the cache directory for apt may not hold blanks or quotes")
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "state/status").touch()  # empty: nothing installed, so nothing is held back
    keyring = root / KEYRING_NAME
    # Rewritten every run: a change of pinned fingerprints takes effect at once.
    base.pinned_keyring(base.ARCHIVE_KEYRING, image.base.archive.keyring_fingerprints, keyring)
    sources = root / "sources.list"
    sources.write_text(sources_list(image, mirror, keyring))
    config = root / "apt.conf"
    config.write_text(apt_config(root, sources))
    return config


def sources_list(image: ImageDefinition, mirror: str, keyring: Path) -> str:
    components = " ".join(image.base.archive.components)
    return "".join(
        f"deb [signed-by={keyring}] {mirror} {pocket} {components}\n"
        for pocket in image.base.archive.pockets
    )


def apt_config(root: Path, sources: Path) -> str:
    settings = {
        # Read first (APT_CONFIG), these keep the host's apt.conf and apt.conf.d out entirely.
        "Dir::Etc::main": "/dev/null",
        "Dir::Etc::parts": "/dev/null",
        "Dir::Etc::SourceList": str(sources),
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::Etc::Preferences": "/dev/null",
        "Dir::Etc::PreferencesParts": "/dev/null",
        # No global keys at all: each source trusts only its signed-by keyring.
        "Dir::Etc::Trusted": "/dev/null",
        "Dir::Etc::TrustedParts": "/dev/null",
        "Dir::State": str(root / "state"),
        "Dir::State::status": str(root / "state/status"),
        "Dir::Cache": str(root / "cache"),
        # Measured on focal (main, universe; 3 pockets): 83 MB instead of 194 MB on disk, and
        # no slower. The source cache only speeds up a changing dpkg status; ours is empty.
        "Acquire::GzipIndexes": "true",
        "Dir::Cache::srcpkgcache": "",
        "APT::Architecture": ARCHITECTURE,
        "Acquire::Languages": "none",
        # The Ubuntu archive publishes no pdiffs (focal-updates' InRelease lists none); a
        # mirror that does is usually near, where one full index beats a chain of patches.
        "Acquire::PDiffs": "false",
        "Acquire::Retries": str(RETRIES),
        # Phasing would hold back an upgrade by this host's machine-id; focal's apt (2.0) does
        # not phase at all, so the image's full-upgrade installs the newest version.
        "APT::Get::Always-Include-Phased-Updates": "true",
        # Our FileLock serialises every use of the directory, apt-cache included.
        "Debug::NoLocking": "true",
        # As root apt downloads as _apt, which cannot enter a cache under a 0700 home.
        "APT::Sandbox::User": "root",
    }
    lines = [f'{key} "{value}";' for key, value in settings.items()]
    lines.append(f'APT::Architectures {{ "{ARCHITECTURE}"; }};')
    return "\n".join(lines) + "\n"


# --- asking apt -------------------------------------------------------------------------------


def update(env: Mapping[str, str], mirror: str, log: Callable[[str], None]) -> None:
    try:
        done = run(
            ["apt-get", "-q", "update"],
            env=env,
            capture=True,
            check=False,
            timeout=UPDATE_TIMEOUT_S,
            log=log,
        )
    except CommandError:  # check=False: only a timeout gets here
        raise ArchiveStateError(
            f"apt-get update from {mirror} failed: no answer within {UPDATE_TIMEOUT_S} s"
        ) from None
    problem = update_problem(done.returncode, done.stderr)
    if problem:
        raise ArchiveStateError(f"apt-get update from {mirror} failed: {problem}")
    log(f"archive indices: {fetch_summary(done.stdout)}")


def update_problem(returncode: int, stderr: str) -> str | None:
    """The line that says best why an update failed, or None if it did not.

    apt-get update exits 0 when a fetch fails ("W: Failed to fetch"), so its messages decide;
    a signature problem says more than the "is not signed" error that follows it.
    """
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    for prefix in ("W: GPG error", "E: ", "W: Failed to fetch", "W: Some index files failed"):
        found = next((line for line in lines if line.startswith(prefix)), None)
        if found:
            return found[3:]
    if returncode != 0:
        return f"exit {returncode}" + (f": {lines[-1]}" if lines else "")
    return None


def fetch_summary(stdout: str) -> str:
    lines = stdout.splitlines()
    fetched = sum(line.startswith("Get:") for line in lines)
    unchanged = sum(line.startswith("Hit:") for line in lines)
    total = next((line for line in lines if line.startswith("Fetched ")), "")
    return f"{fetched} fetched, {unchanged} unchanged" + (f" ({total})" if total else "")


def policy(env: Mapping[str, str], names: list[str], log: Callable[[str], None]) -> dict[str, str]:
    candidates: dict[str, str] = {}
    for start in range(0, len(names), BATCH):
        batch = names[start : start + BATCH]
        done = run(
            ["apt-cache", "policy", *batch],
            env=env,
            capture=True,
            check=False,
            timeout=POLICY_TIMEOUT_S,
            log=_shortening(log, len(batch)),
        )
        errors = [line for line in done.stderr.splitlines() if line.startswith("E: ")]
        if done.returncode != 0 or errors:
            reason = errors[0][3:] if errors else f"exit {done.returncode}"
            raise ArchiveStateError(f"apt-cache policy failed: {reason}")
        candidates |= parse_policy(done.stdout)
    log(f"archive candidates: {len(candidates)} of {len(names)} packages known")
    return candidates


def _shortening(log: Callable[[str], None], count: int) -> Callable[[str], None]:
    """``log`` for a command line of ``count`` package names: its start is enough."""

    def say(line: str) -> None:
        log(line if len(line) <= 160 else f"{line[:140]} … ({count} packages)")

    return say


def parse_policy(text: str) -> dict[str, str]:
    """Package -> candidate version from ``apt-cache policy`` output; ``(none)`` is left out.

    A package's block starts with ``name:`` at column 0 (``name:amd64:`` when apt qualifies
    it); its ``  Candidate:`` line follows before the version table.
    """
    found: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            continue
        candidate = _CANDIDATE.match(line)
        if candidate and current is not None:
            if candidate.group(1) != "(none)":
                found[current] = candidate.group(1)
            current = None  # the version table that follows never holds another candidate
    return found
