"""parity: the image carries what Ubuntu's own cloud image of the release carries, except what
the image definition leaves out on purpose (parity.left_out, each with its reason).

The reference is Ubuntu's seeds as the archive listed them when the image was built: the
Depends and Recommends of its metapackages (ubuntu-minimal, ubuntu-standard, ubuntu-server).
A group "a|b" is met by either, also through a package that Provides it. A deployment tool
such as Algo's playbooks looks for a stock-like Ubuntu server: anything Ubuntu's image has that
this one lacks must be a decision someone wrote down, not an accident of the base builder.
"""

from __future__ import annotations

from checklib import Context, Result, failed, passed, run, skipped

QUERY = "${Package}\t${Status}\t${Provides}\n"


def installed_names(dpkg_output: str) -> set[str]:
    """Package names and what they provide, from dpkg-query -W -f QUERY (installed only)."""
    names = set()
    for line in dpkg_output.splitlines():
        package, _, rest = line.partition("\t")
        status, _, provides = rest.partition("\t")
        if not package or not status.endswith("ok installed"):
            continue
        names.add(package.split(":")[0])
        for item in provides.split(","):
            name = item.strip().split(" ")[0]
            if name:
                names.add(name)
    return names


def judge(
    groups: list[str], installed: set[str], left_out: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """(groups neither installed nor left out, left-out group -> its reason)."""
    unexplained = []
    explained = {}
    for group in groups:
        alternatives = group.split("|")
        if any(alt in installed for alt in alternatives):
            continue
        reason = next((left_out[alt] for alt in alternatives if alt in left_out), None)
        if reason is None:
            unexplained.append(group)
        else:
            explained[group] = reason
    return unexplained, explained


def check(ctx: Context) -> Result:
    expect = ctx.section("parity")
    if not expect:
        return skipped("no reference recorded for this image (its build lists Ubuntu's seeds)")
    done = run(["dpkg-query", "-W", "-f", QUERY])
    if not done.ok:
        return failed(f"cannot list the installed packages: {done.why()}")
    installed = installed_names(done.stdout)
    groups = list(expect.get("reference") or [])
    left_out = dict(expect.get("left_out") or {})
    unexplained, explained = judge(groups, installed, left_out)
    # Listed as left out yet present: true of Ubuntu's own cloud images, which the clouds boot.
    present = sorted(name for name in left_out if name in installed)
    data = {
        "metapackages": expect.get("metapackages") or [],
        "reference": len(groups),
        "carried": len(groups) - len(unexplained) - len(explained),
        "left_out": len(explained),
        "unexplained": unexplained,
        "left_out_but_present": present,
    }
    if unexplained:
        return failed(
            f"Ubuntu's image of this release has {', '.join(unexplained)}, which this image "
            "neither carries nor leaves out on purpose (image definition: parity.left_out)",
            **data,
        )
    return passed(
        f"{data['carried']} of Ubuntu's {len(groups)} seed packages carried, "
        f"{len(explained)} left out on purpose ({', '.join(data['metapackages'])})",
        **data,
    )
