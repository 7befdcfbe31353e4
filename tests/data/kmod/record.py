"""Record what checks/kernel_modules.py reads about a kernel, for the host's unit tests.

Run inside a focal guest (it needs that kernel's kmod), as root:

    python3 record.py --checks /path/to/checks --out DIR CAPABILITY...
    python3 record.py --checks ... --out DIR --basedir /tmp/kvm --release 5.4.0-1133-kvm CAP...

The second form records another kernel flavour from its unpacked linux-modules package after
`depmod -b /tmp/kvm 5.4.0-1133-kvm`. The files are trimmed to what the logic reads: every
built-in module, the alias entries of built-in modules, the alias lines and module names of
the networking and crypto trees, and modprobe --show-depends for every candidate module.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

KEEP_TREES = re.compile(
    r"^kernel/(net/(ipv4|ipv6|xfrm|key)/|net/netfilter/(x_tables|xt_policy)\.ko"
    r"|crypto/|arch/x86/crypto/|lib/crypto/)"
)
KEEP_ALIAS = re.compile(r"^alias (crypto-|xfrm|net-pf-|rfc)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--basedir")
    parser.add_argument("--release")
    parser.add_argument("capabilities", nargs="+")
    args = parser.parse_args()
    sys.path.insert(0, args.checks)
    import kernel_modules as km

    release = args.release or km.kernel_release()
    base = Path(args.basedir or "/", "lib/modules", release)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "release").write_text(release + "\n")
    (out / "modules.builtin").write_text((base / "modules.builtin").read_text())
    modinfo = (base / "modules.builtin.modinfo").read_bytes().split(b"\0")
    aliases = [entry for entry in modinfo if b".alias=" in entry]
    (out / "modules.builtin.modinfo").write_bytes(b"\0".join(aliases) + b"\0")
    alias_lines = (base / "modules.alias").read_text().splitlines()
    kept = [line for line in alias_lines if KEEP_ALIAS.match(line)]
    (out / "modules.alias").write_text("\n".join(kept) + "\n")
    dep_lines = (base / "modules.dep").read_text().splitlines()
    (out / "modules.dep").write_text("\n".join(x for x in dep_lines if KEEP_TREES.match(x)) + "\n")
    if not args.basedir:
        (out / "proc_modules").write_text(Path("/proc/modules").read_text())

    facts = km.KernelFacts(
        release=release,
        builtin=km.parse_builtin((out / "modules.builtin").read_text()),
        builtin_aliases=km.parse_builtin_aliases((out / "modules.builtin.modinfo").read_text()),
        aliases=km.parse_modules_alias((out / "modules.alias").read_text()),
        modules=km.parse_modules_dep((out / "modules.dep").read_text()),
        config=km.ModprobeConfig(),
    )
    probe = km.modprobe_probe(args.basedir, args.release)
    recorded = {}
    for capability in args.capabilities:
        for module in km.candidates(capability, facts):
            if module not in facts.builtin and module not in recorded:
                recorded[module] = list(probe(module))
    (out / "show-depends.json").write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(recorded)} modules for {release} into {out}")


if __name__ == "__main__":
    main()
