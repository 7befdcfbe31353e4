"""snapd: purged packages are gone for good, and pinned-away packages cannot come back.

The published image has no apt lists, so `apt-get install -s snapd` would fail for the wrong
reason. The pin is tested against fresh lists fetched into a temporary directory through a
private apt configuration (nothing under /var/lib/apt or /var/cache/apt changes, and apt's
update hooks are cleared). When the archive cannot be reached, the check falls back to
reading the Pin-Priority stanzas apt would read, and says so.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from pathlib import Path

from checklib import Context, Result, failed, log, passed, run, skipped

# What snapd leaves behind besides its package: seeded snaps, state, the /snap mount root.
SNAPD_DIRS = ("/snap", "/var/snap", "/var/lib/snapd", "/var/cache/snapd")
APT_UPDATE_TIMEOUT_S = 180
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


def parse_preferences(text: str) -> list[dict[str, str]]:
    """apt_preferences(5): stanzas of Field: value lines separated by blank lines."""
    stanzas, current = [], {}
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip().lower()] = value.strip()
    return stanzas


def _matches(pattern: str, package: str) -> bool:
    if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
        return re.search(pattern[1:-1], package) is not None
    return fnmatch.fnmatchcase(package, pattern)


def pin_stanza(package: str, stanzas: list[dict[str, str]]) -> dict[str, str] | None:
    """The first stanza giving the package a negative priority for every version.

    A release/origin/version pin with a wildcard covers every version; anything narrower
    (a=focal-updates) would let another pocket bring the package back.
    """
    for stanza in stanzas:
        names = stanza.get("package", "").split()
        if not any(_matches(name, package) for name in names):
            continue
        try:
            priority = int(stanza.get("pin-priority", ""))
        except ValueError:
            continue
        pin = stanza.get("pin", "")
        covers_all = re.fullmatch(r"(release|origin|version)\s+(\*|[a-z]=\*)", pin) is not None
        if priority < 0 and covers_all:
            return stanza
    return None


def preference_files(root: str = "/etc/apt") -> list[Path]:
    """Files apt reads: preferences, then preferences.d/* with no extension or .pref and
    only the characters apt accepts in a file name."""
    files = [Path(root, "preferences")]
    directory = Path(root, "preferences.d")
    if directory.is_dir():
        files += [
            p
            for p in sorted(directory.iterdir())
            if re.fullmatch(r"[A-Za-z0-9_.-]+", p.name)
            and (p.suffix in ("", ".pref") or "." not in p.name)
        ]
    return [p for p in files if p.is_file()]


def policy_candidate(policy: str) -> tuple[str | None, bool]:
    """`apt-cache policy pkg`: (candidate or None, whether apt knows any version)."""
    candidate = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.M)
    versions = re.search(r"^\s*Version table:\s*\n\s+\S", policy, re.M)
    value = candidate.group(1) if candidate else None
    return (None if value in (None, "(none)") else value), versions is not None


class PrivateApt:
    """apt with its own lists, caches and update hooks in a scratch directory; the system's
    sources, preferences and other settings (a proxy, say) still apply.

    APT_CONFIG is read first and points apt at a private copy of apt.conf.d whose last file
    clears the hooks and moves the state; -o options would be too late to clear lists.
    """

    def __init__(self, workdir: Path, etc: str = "/etc/apt") -> None:
        self.root = workdir / "apt"
        parts = self.root / "apt.conf.d"
        for sub in ("lists/partial", "cache/archives/partial", "apt.conf.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # apt downloads as the unprivileged _apt user: it must reach lists/partial (apt
        # chowns that itself). Traversable, not listable; parents are run.py's (0711).
        os.chmod(str(workdir), 0o711)
        for path in (self.root, self.root / "lists", self.root / "cache"):
            os.chmod(str(path), 0o755)
        system_parts = Path(etc, "apt.conf.d")
        if system_parts.is_dir():
            for entry in sorted(system_parts.iterdir()):
                (parts / entry.name).symlink_to(entry)
        lines = [f'Dir::State::Lists "{self.root}/lists";', f'Dir::Cache "{self.root}/cache";']
        lines += [f"#clear {name};" for name in _CLEARED]
        (parts / "zzzz-imagefactory-check").write_text("\n".join(lines) + "\n")
        (self.root / "apt.conf").write_text(f'Dir::Etc::Parts "{parts}";\n')

    def run(self, *argv: str, timeout: float = 120) -> tuple[int, str, str]:
        done = run(list(argv), timeout=timeout, env={"APT_CONFIG": str(self.root / "apt.conf")})
        return done.returncode, done.stdout, done.stderr

    def has_lists(self) -> bool:
        return any(self.root.joinpath("lists").glob("*_Packages*"))


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


def update_error(stderr: str, code: int) -> str:
    """The line of `apt-get update` output that says why the archive was not reached."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"Failed to fetch|Could not (connect|resolve)|Temporary failure", line):
            return line
    return lines[-1] if lines else f"apt-get update exited {code} without fetching lists"


def check_pins(packages: list[str], workdir: Path) -> tuple[list[str], str, dict[str, object]]:
    """(problems, what was verified and how, data)."""
    apt = PrivateApt(workdir)
    code, _, err = apt.run("apt-get", "-q", "update", timeout=APT_UPDATE_TIMEOUT_S)
    for line in err.splitlines():
        log(f"apt-get update: {line}")
    if code == 0 and apt.has_lists():
        return _pins_by_apt(apt, packages)
    reason = update_error(err, code)
    problems, data = _pins_by_preferences(packages)
    data["apt_update_error"] = reason
    return problems, f"archive unreachable ({reason}): checked the Pin-Priority only", data


def _pins_by_apt(apt: PrivateApt, packages: list[str]) -> tuple[list[str], str, dict[str, object]]:
    problems = []
    data: dict[str, object] = {"verified_with": "apt-get install -s against fresh lists"}
    for package in packages:
        _, policy, _ = apt.run("apt-cache", "policy", package)
        candidate, known = policy_candidate(policy)
        code, _, err = apt.run("apt-get", "install", "-s", "-q", package)
        if code == 0:
            problems.append(f"apt does not refuse {package} (candidate {candidate})")
        elif not known:
            problems.append(f"apt does not know {package}, so the pin cannot be verified")
        elif candidate is not None:
            problems.append(
                f"{package} has candidate {candidate}: apt failed for another reason: "
                f"{(err.strip().splitlines() or ['?'])[-1]}"
            )
        data[package] = {"candidate": candidate, "apt_install_exit": code}
    return problems, "checked with apt-get install -s against freshly fetched lists", data


def _pins_by_preferences(packages: list[str]) -> tuple[list[str], dict[str, object]]:
    stanzas = []
    for path in preference_files():
        stanzas += parse_preferences(path.read_text(errors="replace"))
    problems = []
    data: dict[str, object] = {"verified_with": "apt preferences"}
    for package in packages:
        stanza = pin_stanza(package, stanzas)
        if stanza is None:
            problems.append(f"no Pin-Priority < 0 for every version of {package} in /etc/apt")
        data[package] = stanza
    return problems, data


def check(ctx: Context) -> Result:
    packages = ctx.section("packages")
    if not packages:
        return skipped("no packages expectations (assessment of a provider's stock image)")
    purge = list(packages.get("purge") or [])
    pin_away = list(packages.get("pin_away") or [])
    problems = [p for package in purge for p in check_purged(package)]
    how, data = "", {}
    if pin_away:
        pin_problems, how, data = check_pins(pin_away, ctx.workdir)
        problems += pin_problems
        shutil.rmtree(str(ctx.workdir / "apt"), ignore_errors=True)
    data.update(purged=purge, pinned_away=pin_away)
    if problems:
        return failed("; ".join(problems) + (f" [{how}]" if how else ""), **data)
    detail = f"{', '.join(purge) or 'nothing'} purged"
    if pin_away:
        detail += f"; {', '.join(pin_away)} cannot be installed ({how})"
    return passed(detail, **data)
