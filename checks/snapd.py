"""snapd: purged packages are gone for good, and pinned-away packages cannot come back.

The pin is tested with apt itself, offline and in a second: a private apt (its own sources,
lists and caches in the check's scratch directory; the system's preferences and dpkg status)
is offered a stand-in of each pinned-away package, at a version above any real one, in every
pocket of the release (release, -updates, -security, -backports, -proposed), each with the
Release fields of Ubuntu's own pocket (Origin, Label, Suite, Codename, Version, Components)
that apt's pins match on. `apt-get install -s` must refuse it: then apt refuses the archive's
package too, whatever its version and pocket. (Fetching the archive's real lists proved the
same in 40-50 s under TCG, and only where the archive was reachable.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from checklib import Context, Result, failed, passed, read_text, run, skipped

# What snapd leaves behind besides its package: seeded snaps, state, the /snap mount root.
SNAPD_DIRS = ("/snap", "/var/snap", "/var/lib/snapd", "/var/cache/snapd")
POCKETS = ("", "-updates", "-security", "-backports", "-proposed")
# Above any real version; a different one in each pocket, as the archive has (a pin that
# refuses one pocket's version leaves another's installable).
STAND_IN_VERSION = "99999:{n}-imagefactory"
# Hooks apt runs around `update` (command-not-found, update-notifier, stamps): they would
# write to the real system, so the private configuration clears them.
_CLEARED = (
    "APT::Update::Pre-Invoke",
    "APT::Update::Post-Invoke",
    "APT::Update::Post-Invoke-Success",
    "APT::Update::Post-Invoke-Stats",
)


def package_state(status: str | None) -> str:
    """dpkg-query's ${Status} ("install ok installed") -> installed | config-files | absent."""
    if not status:
        return "absent"
    words = status.split()
    state = words[-1] if words else ""
    if state == "not-installed":
        return "absent"
    return "config-files" if state == "config-files" else "installed"


def policy_candidate(policy: str) -> tuple[str | None, bool]:
    """`apt-cache policy pkg`: (candidate or None, whether apt knows any version)."""
    candidate = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.M)
    versions = re.search(r"^\s*Version table:\s*\n\s+\S", policy, re.M)
    value = candidate.group(1) if candidate else None
    return (None if value in (None, "(none)") else value), versions is not None


class StandInArchive:
    """A private apt that knows only a local stand-in of Ubuntu's archive for one release."""

    def __init__(self, workdir: Path, codename: str, version: str, arch: str,
                 etc: str = "/etc/apt") -> None:  # fmt: skip
        self.root = workdir / "apt"
        self.codename, self.version, self.arch = codename, version, arch
        parts = self.root / "apt.conf.d"
        for sub in ("lists/partial", "cache/archives/partial", "apt.conf.d", "sources.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # apt reads the repository as the unprivileged _apt user: traversable, not listable.
        os.chmod(str(workdir), 0o711)
        for path in (self.root, self.root / "lists", self.root / "cache"):
            os.chmod(str(path), 0o755)
        system_parts = Path(etc, "apt.conf.d")
        if system_parts.is_dir():
            for entry in sorted(system_parts.iterdir()):
                (parts / entry.name).symlink_to(entry)
        lines = [
            f'Dir::State::Lists "{self.root}/lists";',
            f'Dir::Cache "{self.root}/cache";',
            f'Dir::Etc::SourceList "{self.root}/sources.list";',
            f'Dir::Etc::SourceParts "{self.root}/sources.d";',
            f'Dir::Etc::Preferences "{etc}/preferences";',
            f'Dir::Etc::PreferencesParts "{etc}/preferences.d";',
        ]
        lines += [f"#clear {name};" for name in _CLEARED]
        (parts / "zzzz-imagefactory-check").write_text("\n".join(lines) + "\n")
        (self.root / "apt.conf").write_text(f'Dir::Etc::Parts "{parts}";\n')

    def offer(self, packages: list[str]) -> None:
        """Every pocket offers each package, in a version no real one reaches."""
        repo = self.root / "repo"
        sources = []
        for n, suffix in enumerate(POCKETS):
            suite = f"{self.codename}{suffix}"
            binary = repo / "dists" / suite / "main" / f"binary-{self.arch}"
            binary.mkdir(parents=True, exist_ok=True)
            (binary / "Packages").write_text("\n".join(self._stanza(p, n) for p in packages))
            (repo / "dists" / suite / "Release").write_text(self._release(suite))
            sources.append(f"deb [trusted=yes] file:{repo} {suite} main")
        (self.root / "sources.list").write_text("\n".join(sources) + "\n")
        for path in [repo, *repo.rglob("*")]:
            os.chmod(str(path), 0o755 if path.is_dir() else 0o644)

    def _stanza(self, package: str, n: int) -> str:
        version = STAND_IN_VERSION.format(n=n)
        return (
            f"Package: {package}\nVersion: {version}\nArchitecture: {self.arch}\n"
            f"Priority: optional\nSection: misc\nMaintainer: imagefactory <root@localhost>\n"
            f"Filename: pool/{package}_{self.arch}.deb\nSize: 1\nSHA256: {'0' * 64}\n"
            f"Description: stand-in for the archive's {package}\n"
        )

    def _release(self, suite: str) -> str:
        return (
            f"Origin: Ubuntu\nLabel: Ubuntu\nSuite: {suite}\nVersion: {self.version}\n"
            f"Codename: {self.codename}\nArchitectures: {self.arch}\nComponents: main\n"
            f"Description: imagefactory's stand-in for Ubuntu {self.version} {suite}\n"
        )

    def run(self, *argv: str, timeout: float = 120) -> tuple[int, str, str]:
        done = run(list(argv), timeout=timeout, env={"APT_CONFIG": str(self.root / "apt.conf")})
        return done.returncode, done.stdout, done.stderr


def check_purged(package: str) -> list[str]:
    done = run(["dpkg-query", "-W", "-f=${Status}", package])
    state = package_state(done.stdout if done.ok else None)
    problems = []
    if state == "installed":
        problems.append(f"{package} is installed")
    elif state == "config-files":
        problems.append(f"{package} was removed but not purged (config files remain)")
    if package == "snapd":
        left = [d for d in SNAPD_DIRS if Path(d).exists()]
        if left:
            problems.append(f"snapd leftovers: {', '.join(left)}")
    return problems


def check_pins(packages: list[str], apt: StandInArchive) -> tuple[list[str], dict[str, object]]:
    """Problems with apt's verdict on each stand-in, and what apt said."""
    apt.offer(packages)
    code, _, err = apt.run("apt-get", "-q", "update")
    if code != 0:
        return [
            f"apt cannot read the stand-in archive: {(err.strip().splitlines() or ['?'])[-1]}"
        ], {}
    problems = []
    data: dict[str, object] = {}
    for package in packages:
        _, policy, _ = apt.run("apt-cache", "policy", package)
        candidate, known = policy_candidate(policy)
        code, _, err = apt.run("apt-get", "install", "-s", "-q", package)
        if code == 0:
            problems.append(f"apt does not refuse {package} (it would install {candidate})")
        elif not known:
            problems.append(f"apt does not see the stand-in {package}, so the pin is unproven")
        elif candidate is not None:
            problems.append(
                f"{package} has candidate {candidate}: apt failed for another reason: "
                f"{(err.strip().splitlines() or ['?'])[-1]}"
            )
        data[package] = {"candidate": candidate, "apt_install_exit": code}
    return problems, data


def os_release() -> dict[str, str]:
    fields = {}
    for line in (read_text("/etc/os-release", "") or "").splitlines():
        key, _, value = line.partition("=")
        fields[key] = value.strip().strip('"')
    return fields


def check(ctx: Context) -> Result:
    packages = ctx.section("packages")
    if not packages:
        return skipped("no packages expectations (assessment of a provider's stock image)")
    purge = list(packages.get("purge") or [])
    pin_away = list(packages.get("pin_away") or [])
    problems = [p for package in purge for p in check_purged(package)]
    data: dict[str, object] = {}
    release = os_release()
    codename = str(ctx.section("codename") or release.get("VERSION_CODENAME", ""))
    if pin_away:
        arch = run(["dpkg", "--print-architecture"]).stdout.strip() or "amd64"
        apt = StandInArchive(ctx.workdir, codename, release.get("VERSION_ID", ""), arch)
        pin_problems, data = check_pins(pin_away, apt)
        problems += pin_problems
    data.update(purged=purge, pinned_away=pin_away)
    if problems:
        return failed("; ".join(problems), **data)
    detail = f"{', '.join(purge) or 'nothing'} purged"
    if pin_away:
        detail += (
            f"; apt refuses {', '.join(pin_away)} from any {codename} pocket, at any version "
            "(offered a stand-in with Ubuntu's release fields)"
        )
    return passed(detail, **data)
