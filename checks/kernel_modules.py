"""kernel_modules: can this kernel provide every capability strongSwan needs?

A capability (xfrm_user, esp4, aes, gcm, ...) is available when the kernel has it built in,
has it loaded, or can load it on demand (strongSwan 5.8+ relies on the kernel's module
autoloading, which goes through aliases like ``crypto-aes`` or ``xfrm-type-2-50``). It is
blocked when modprobe.d blacklists it or replaces its loading with an ``install`` command
that does not load it, when the kernel command line blacklists it, or when
kernel.modules_disabled is set. Nothing is loaded here: modprobe runs with --show-depends.

strongSwan's documented module list is stale for kernels >= 5.2: the xfrm*_mode_* modules
were folded into XFRM itself and "tunnel" means tunnel4. Those names must not fail a check.

The logic is split into pure functions over the texts the kernel and kmod provide
(modules.builtin, modules.builtin.modinfo, modules.alias, modules.dep, modprobe.d files,
/proc/modules, modprobe output) so the host can test it against recorded kernels.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from checklib import Context, Result, failed, kernel_release, passed, read_text, run

BUILT_IN = "built-in"
LOADED = "loaded"
LOADABLE = "loadable"
MISSING = "missing"
_RANK = {BUILT_IN: 0, LOADED: 1, LOADABLE: 2, MISSING: 3}

# Folded into XFRM in Linux 5.2 ("xfrm: remove modular xfrm mode infrastructure").
_XFRM_MODES = {
    f"xfrm{family}_mode_{mode}" for family in (4, 6) for mode in ("tunnel", "transport", "beet")
}
# Names people use for a capability whose module is called differently.
_RENAMED = {"tunnel": "tunnel4", "vti": "ip_vti", "vti6": "ip6_vti"}
# Implementations that only work with a CPU feature (AES-NI, SSSE3, PCLMULQDQ, ...): they
# cannot stand in for the generic algorithm on a CPU that lacks the feature.
_CPU_SPECIFIC = re.compile(r"(^aesni|_(intel|ssse3|avx\d*|x86_64|ni|ce|ce_blk|neon|arm64|vmx))$")

MODPROBE_DIRS = (
    "/etc/modprobe.d",
    "/run/modprobe.d",
    "/usr/local/lib/modprobe.d",
    "/lib/modprobe.d",
    "/usr/lib/modprobe.d",
)


def normalize(name: str) -> str:
    """kmod treats - and _ alike in module names and aliases (not inside [...] patterns)."""
    if "[" not in name:
        return name.replace("-", "_")
    out, depth = [], 0
    for char in name:
        depth += char == "["
        depth -= char == "]" and depth > 0
        out.append("_" if char == "-" and depth == 0 else char)
    return "".join(out)


def module_name(path: str) -> str:
    """``kernel/arch/x86/crypto/aesni-intel.ko.zst`` -> ``aesni_intel``."""
    base = path.strip().rsplit("/", 1)[-1]
    return normalize(re.sub(r"\.ko(\.[a-z0-9]+)?$", "", base))


def kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# ---------------------------------------------------------------------------------------
# Parsers: text in, plain data out.


def parse_builtin(text: str) -> set[str]:
    """modules.builtin: one path per line of everything compiled into the kernel."""
    return {module_name(line) for line in text.splitlines() if line.strip()}


def parse_builtin_aliases(text: str) -> dict[str, set[str]]:
    """modules.builtin.modinfo (kernels >= 5.2): NUL-separated ``module.key=value`` entries.

    Only the aliases matter: they say e.g. that the built-in aes_generic answers ``aes``.
    """
    aliases: dict[str, set[str]] = {}
    for entry in re.split(r"[\0\n]", text):
        module, _, rest = entry.partition(".")
        key, sep, value = rest.partition("=")
        if sep and key == "alias" and value:
            aliases.setdefault(normalize(value), set()).add(normalize(module))
    return aliases


class AliasIndex:
    """modules.alias patterns, indexed: a kernel has ~20,000 of them (pci:, usb:, acpi*: ...)
    and matching each one against every capability takes many seconds under TCG. Matches
    come back in file order, as kmod reports them."""

    def __init__(self, pairs: list[tuple[str, str]] | None = None) -> None:
        self.exact: dict[str, list[tuple[int, str]]] = {}
        # Wildcard patterns keyed by the first (up to) 3 characters before the wildcard.
        self.wild: dict[str, list[tuple[int, str, str]]] = {}
        self.count = 0
        for pattern, module in pairs or []:
            self.add(pattern, module)

    def add(self, pattern: str, module: str) -> None:
        literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
        if literal == pattern:
            self.exact.setdefault(pattern, []).append((self.count, module))
        else:
            self.wild.setdefault(literal[:3], []).append((self.count, pattern, module))
        self.count += 1

    def modules_for(self, name: str) -> list[str]:
        found = list(self.exact.get(name, ()))
        for key in {name[:k] for k in range(4)}:
            found += [(n, m) for n, p, m in self.wild.get(key, ()) if fnmatch.fnmatchcase(name, p)]
        return [module for _, module in sorted(found)]


def parse_modules_alias(text: str) -> AliasIndex:
    """modules.alias: ``alias <pattern> <module>`` lines, patterns with shell wildcards."""
    index = AliasIndex()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "alias":
            index.add(normalize(fields[1]), normalize(fields[2]))
    return index


def parse_modules_dep(text: str) -> set[str]:
    """modules.dep: ``path: deps``; the names of every loadable module of the kernel."""
    return {module_name(line.split(":", 1)[0]) for line in text.splitlines() if ":" in line}


def parse_proc_modules(text: str) -> set[str]:
    return {normalize(line.split()[0]) for line in text.splitlines() if line.strip()}


def parse_cmdline_blacklist(cmdline: str) -> dict[str, str]:
    """Modules the kernel command line blocks, with the parameter that blocks them.

    module_blacklist= makes the kernel refuse the module outright; modprobe.blacklist= is
    read by modprobe like a modprobe.d blacklist.
    """
    blocked: dict[str, str] = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key in ("module_blacklist", "modprobe.blacklist"):
            for name in value.split(","):
                if name:
                    blocked[normalize(name)] = key
    return blocked


@dataclass
class ModprobeConfig:
    """The parts of modprobe.d that decide whether a module can be loaded."""

    blacklist: dict[str, str] = field(default_factory=dict)  # module -> file
    install: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (cmd, file)
    aliases: list[tuple[str, str]] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """modprobe.d lines with comments dropped and backslash continuations joined."""
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def parse_modprobe_config(files: list[tuple[str, str]]) -> ModprobeConfig:
    """Read modprobe.d files given as (path, text) in the order kmod reads them.

    For ``install`` the first definition wins, as in kmod; blacklists add up.
    """
    config = ModprobeConfig()
    for path, text in files:
        for line in _logical_lines(text):
            keyword, _, rest = line.partition(" ")
            args = rest.split()
            if keyword == "blacklist" and args:
                config.blacklist.setdefault(normalize(args[0]), path)
            elif keyword == "install" and len(args) >= 2:
                command = rest.strip()[len(args[0]) :].strip()
                config.install.setdefault(normalize(args[0]), (command, path))
            elif keyword == "alias" and len(args) >= 2:
                config.aliases.append((normalize(args[0]), normalize(args[1])))
    return config


def effective_config_files(dirs: tuple[str, ...] = MODPROBE_DIRS) -> list[tuple[str, str]]:
    """modprobe.d files as kmod sees them: *.conf, a name in an earlier directory hides the
    same name in a later one, then everything in file-name order."""
    chosen: dict[str, Path] = {}
    for directory in dirs:
        path = Path(directory)
        if not path.is_dir():
            continue
        for entry in sorted(path.iterdir()):
            if entry.name.endswith(".conf") and not entry.name.startswith("."):
                chosen.setdefault(entry.name, entry)
    return [(str(chosen[name]), read_text(chosen[name], "") or "") for name in sorted(chosen)]


def parse_show_depends(text: str) -> list[tuple[str, str]]:
    """``modprobe --show-depends``: ``insmod <path> [opts]``, ``builtin <name>`` or
    ``install <command>`` lines, dependencies first and the module itself last."""
    steps = []
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind == "insmod" and rest:
            steps.append(("insmod", module_name(rest.split()[0])))
        elif kind == "builtin" and rest:
            steps.append(("builtin", normalize(rest.strip())))
        elif kind == "install" and rest:
            steps.append(("install", rest.strip()))
    return steps


def install_loads(command: str, module: str) -> bool:
    """Whether an ``install`` command still loads the module (e.g. ``modprobe
    --ignore-install m && ...`` or ``insmod .../m.ko``) rather than replacing it
    (``/bin/false``, ``/bin/true``, ``echo blocked``)."""
    try:
        words = shlex.split(command.replace("&&", " ; ").replace("||", " ; "))
    except ValueError:
        words = command.split()
    names = {module_name(word) for word in words}
    programs = {word.rsplit("/", 1)[-1] for word in words}
    if "insmod" in programs and module in names:
        return True
    ignores = "--ignore-install" in words or "-i" in words
    return "modprobe" in programs and ignores and module in names


# ---------------------------------------------------------------------------------------
# Decisions.


@dataclass
class KernelFacts:
    """Everything the decision reads about one kernel and its configuration."""

    release: str
    builtin: set[str]
    builtin_aliases: dict[str, set[str]]
    aliases: AliasIndex
    modules: set[str]
    config: ModprobeConfig
    loaded: set[str] = field(default_factory=set)
    cmdline_blacklist: dict[str, str] = field(default_factory=dict)
    modules_disabled: bool = False


if TYPE_CHECKING:  # Python 3.8 cannot subscript collections.abc.Callable at run time
    from collections.abc import Callable

    # modprobe --show-depends for one module name: (exit status, stdout, stderr).
    Probe = Callable[[str], tuple[int, str, str]]


@dataclass
class Verdict:
    """One capability (or one module that could provide it) and why it is or is not usable."""

    name: str
    status: str
    ok: bool
    module: str = ""
    reasons: list[str] = field(default_factory=list)

    def as_data(self) -> dict[str, object]:
        data: dict[str, object] = {"status": self.status, "module": self.module}
        if self.reasons:
            data["reasons"] = self.reasons
        return data

    def describe(self) -> str:
        reasons = f" ({'; '.join(self.reasons)})" if self.reasons else ""
        via = f" via {self.module}" if self.module and self.module != self.name else ""
        return f"{self.name}: {self.status}{via}{reasons}"


def candidates(capability: str, facts: KernelFacts) -> list[str]:
    """The modules that could provide a capability: itself when it is a module name, else
    whatever its alias (or the crypto API's ``crypto-<name>``) resolves to."""
    name = _RENAMED.get(normalize(capability), normalize(capability))
    if name in facts.modules or name in facts.builtin:
        return [name]
    wanted = {name, f"crypto_{name}"}
    found: list[str] = []
    for pattern, module in facts.config.aliases:
        if any(fnmatch.fnmatchcase(w, pattern) for w in wanted) and module not in found:
            found.append(module)
    for alias in sorted(wanted):
        found.extend(m for m in sorted(facts.builtin_aliases.get(alias, ())) if m not in found)
    for alias in sorted(wanted):
        found.extend(m for m in facts.aliases.modules_for(alias) if m not in found)
    return found or [name]


def _blocks(module: str, facts: KernelFacts) -> list[str]:
    """What in the configuration stops a module from being loaded (on demand or at boot)."""
    reasons = []
    if module in facts.config.blacklist:
        reasons.append(f"blacklisted in {facts.config.blacklist[module]}")
    if module in facts.cmdline_blacklist:
        reasons.append(
            f"blacklisted on the kernel command line ({facts.cmdline_blacklist[module]}=)"
        )
    if module in facts.config.install:
        command, path = facts.config.install[module]
        if not install_loads(command, module):
            reasons.append(f"`install {module} {command}` in {path} does not load it")
    return reasons


def _same(command: str, other: str) -> bool:
    return command.split() == other.split()


def _dependency_blocks(module: str, steps: list[tuple[str, str]], facts: KernelFacts) -> list[str]:
    """``install`` lines in modprobe's plan whose command does not load the module it stands
    for. modprobe prints the command, not the module, so find the owner in the config."""
    reasons = []
    for kind, command in steps:
        if kind != "install":
            continue
        owners = [m for m, (cmd, _) in facts.config.install.items() if _same(cmd, command)]
        blocking = [m for m in owners if m != module and not install_loads(command, m)]
        if blocking:
            reasons.append(f"dependency {', '.join(blocking)} replaced by `install … {command}`")
        elif not owners and not install_loads(command, module):
            reasons.append(f"modprobe would run `{command}` instead of loading it")
    return reasons


def judge_module(module: str, facts: KernelFacts, probe: Probe) -> Verdict:
    """Built in, loaded, loadable or missing, and what blocks it. A blocked module counts
    as missing, or as loaded-but-not-ok when it happens to be loaded already (it would not
    load again after a reboot)."""
    if module in facts.builtin:
        return Verdict(module, BUILT_IN, True, module)
    reasons = _blocks(module, facts)
    loaded = module in facts.loaded
    if facts.modules_disabled and not loaded:
        reasons.append("module loading is disabled (kernel.modules_disabled=1)")
    code, out, err = probe(module)
    if code != 0 and not loaded:
        tail = (err.strip().splitlines() or ["not found"])[-1]
        return Verdict(module, MISSING, False, module, [f"modprobe: {tail}", *reasons])
    steps = parse_show_depends(out) if code == 0 else []
    if ("builtin", module) in steps:
        return Verdict(module, BUILT_IN, True, module)
    reasons.extend(r for r in _dependency_blocks(module, steps, facts) if r not in reasons)
    loads_itself = ("insmod", module) in steps or module in facts.config.install
    if code == 0 and not loads_itself and not reasons:
        # Nothing to load and no install command: kmod filtered it out, e.g. a blacklist.
        reasons.append("modprobe resolves it to nothing")
    if loaded:
        if reasons:
            reasons.append("loaded now, but would not load again after a reboot")
        return Verdict(module, LOADED, not reasons, module, reasons)
    return Verdict(module, MISSING if reasons else LOADABLE, not reasons, module, reasons)


def judge_capability(capability: str, facts: KernelFacts, probe: Probe) -> Verdict:
    """The best of the modules that could provide the capability."""
    name = normalize(capability)
    if name in _XFRM_MODES and kernel_version(facts.release) >= (5, 2):
        note = "part of XFRM itself since Linux 5.2 (a stale name in strongSwan's list)"
        return Verdict(capability, BUILT_IN, True, "xfrm", [note])
    modules = candidates(capability, facts)
    verdicts = [judge_module(m, facts, probe) for m in modules]
    # Asked for by its own module name (aesni_intel), a CPU-specific module is the point;
    # asked for an algorithm (aes), it must not be the only provider unless it is loaded
    # (then this CPU has the feature).
    direct = len(modules) == 1 and modules[0] == _RENAMED.get(name, name)
    usable = [
        v
        for v in verdicts
        if v.ok and (direct or v.status == LOADED or not _CPU_SPECIFIC.search(v.module))
    ]
    if usable:
        best = min(usable, key=lambda v: _RANK[v.status])
        return Verdict(capability, best.status, True, best.module)
    if len(verdicts) == 1:
        only = verdicts[0]
        return Verdict(capability, only.status, False, only.module, only.reasons)
    reasons = [
        f"{v.module} {v.status}" + (f": {'; '.join(v.reasons)}" if v.reasons else "")
        for v in verdicts
    ]
    if any(v.ok for v in verdicts):
        reasons.insert(0, "only CPU-specific implementations, which need the CPU feature")
    loaded = [v for v in verdicts if v.status == LOADED]
    status = LOADED if loaded else MISSING
    module = loaded[0].module if loaded else ",".join(modules)
    return Verdict(capability, status, False, module, reasons)


@dataclass
class Assessment:
    ok: bool
    detail: str
    data: dict[str, object]


def assess(
    required: list[str], optional: list[str], facts: KernelFacts, probe: Probe
) -> Assessment:
    """The check's verdict: every required capability usable and module loading enabled;
    optional capabilities are reported, never failed."""
    req = [judge_capability(c, facts, probe) for c in required]
    opt = [judge_capability(c, facts, probe) for c in optional]
    bad = [v for v in req if not v.ok]
    counts = {s: sum(v.status == s for v in req if v.ok) for s in (BUILT_IN, LOADED, LOADABLE)}
    data: dict[str, object] = {
        "kernel": facts.release,
        "modules_disabled": int(facts.modules_disabled),
        "required": {v.name: v.as_data() for v in req},
        "optional": {v.name: v.as_data() for v in opt},
        "optional_missing": [v.name for v in opt if not v.ok],
    }
    problems = [v.describe() for v in bad]
    if facts.modules_disabled:
        problems.insert(0, "kernel.modules_disabled=1: no module can be loaded until reboot")
    missing_opt = ", ".join(v.name for v in opt if not v.ok) or "none"
    if problems:
        return Assessment(False, f"{'; '.join(problems)} [optional missing: {missing_opt}]", data)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    detail = f"all {len(req)} required capabilities available ({summary})"
    return Assessment(True, f"{detail}; optional missing: {missing_opt}", data)


# ---------------------------------------------------------------------------------------
# The guest side: read the running kernel's files and ask modprobe.


def gather_facts(release: str, root: str = "/lib/modules") -> KernelFacts:
    base = Path(root) / release
    cmdline = read_text("/proc/cmdline", "") or ""
    disabled = (read_text("/proc/sys/kernel/modules_disabled", "0") or "0").strip()
    return KernelFacts(
        release=release,
        builtin=parse_builtin(read_text(base / "modules.builtin", "") or ""),
        builtin_aliases=parse_builtin_aliases(
            read_text(base / "modules.builtin.modinfo", "") or ""
        ),
        aliases=parse_modules_alias(read_text(base / "modules.alias", "") or ""),
        modules=parse_modules_dep(read_text(base / "modules.dep", "") or ""),
        config=parse_modprobe_config(effective_config_files()),
        loaded=parse_proc_modules(read_text("/proc/modules", "") or ""),
        cmdline_blacklist=parse_cmdline_blacklist(cmdline),
        modules_disabled=disabled == "1",
    )


def modprobe_probe(basedir: str | None = None, release: str | None = None) -> Probe:
    """modprobe --show-depends (a dry run that ignores what is loaded), optionally against
    another module tree (-d/-S, used to record fixtures for other kernels)."""

    def probe(module: str) -> tuple[int, str, str]:
        argv = ["modprobe"]
        if basedir:
            argv += ["-d", basedir]
        if release:
            argv += ["-S", release]
        done = run([*argv, "--show-depends", module], timeout=30)
        return done.returncode, done.stdout, done.stderr

    return probe


def prefetched(probe: Probe, modules: list[str], workers: int = 4) -> Probe:
    """Run the probes for every module concurrently up front (each modprobe costs ~0.3 s
    under TCG) and answer from those results; anything else is probed on demand."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = dict(pool.map(lambda m: (m, probe(m)), modules))

    def lookup(module: str) -> tuple[int, str, str]:
        if module not in answers:
            answers[module] = probe(module)
        return answers[module]

    return lookup


def check(ctx: Context) -> Result:
    spec = ctx.section("kernel_modules") or {}
    release = kernel_release()
    if not Path("/lib/modules", release).is_dir():
        return failed(f"/lib/modules/{release} does not exist: this kernel cannot load modules")
    facts = gather_facts(release)
    wanted = [*(spec.get("required") or []), *(spec.get("optional") or [])]
    modules = sorted({m for c in wanted for m in candidates(c, facts) if m not in facts.builtin})
    outcome = assess(
        list(spec.get("required") or []),
        list(spec.get("optional") or []),
        facts,
        prefetched(modprobe_probe(), modules),
    )
    return (passed if outcome.ok else failed)(outcome.detail, **outcome.data)
