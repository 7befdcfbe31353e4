"""release: the image runs the expected Ubuntu release and kernel flavour."""

from __future__ import annotations

import os
import shlex

from checklib import Context, Result, failed, passed, read_text, skipped


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally shell-quoted."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            words = [value]
        values[key] = words[0] if words else ""
    return values


def judge(os_release: dict[str, str], kernel: str, expect: dict[str, object]) -> Result:
    problems = []
    wanted = {"VERSION_ID": expect.get("release"), "VERSION_CODENAME": expect.get("codename")}
    for key, value in wanted.items():
        if value is not None and os_release.get(key) != str(value):
            problems.append(f"{key} is {os_release.get(key)!r}, expected {value!r}")
    flavour = expect.get("kernel_flavour")
    if flavour and not kernel.endswith(f"-{flavour}"):
        problems.append(f"kernel {kernel} is not the {flavour} flavour (expected *-{flavour})")
    data = {
        "version_id": os_release.get("VERSION_ID"),
        "codename": os_release.get("VERSION_CODENAME"),
        "pretty_name": os_release.get("PRETTY_NAME"),
        "kernel": kernel,
    }
    if problems:
        return failed("; ".join(problems), **data)
    return passed(f"{os_release.get('PRETTY_NAME', 'release')} with kernel {kernel}", **data)


def check(ctx: Context) -> Result:
    if ctx.section("release") is None:
        return skipped("no release expected (assessment of a provider's stock image)")
    text = read_text("/etc/os-release") or read_text("/usr/lib/os-release")
    if text is None:
        return failed("neither /etc/os-release nor /usr/lib/os-release exists")
    return judge(parse_os_release(text), os.uname().release, ctx.expect)
