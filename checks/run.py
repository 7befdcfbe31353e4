#!/usr/bin/env python3
"""Certify a booted image from inside: run the checks, one JSON line per check on stdout.

    python3 checks/run.py --expect /path/expectations.json [--only a,b] [--workdir DIR]

Runs as root, on Python 3.8 or later, with the standard library only. Each check is a module
next to this file with ``check(ctx) -> Result``. stdout carries exactly one JSON object per
check, in the order of the expectations' "checks" list:

    {"name", "status": "pass"|"fail"|"skip", "required", "detail", "duration", "data"}

Exit status: 0 when no required check failed (a skip does not fail), 1 otherwise, 2 for bad
usage or a bad expectations file. A check that crashes or hangs becomes a "fail" result; the
run goes on with the next check.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The checks leave nothing behind in the guest, not even __pycache__ next to themselves.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checklib import FAIL, PASS, SKIP, Context, Result, log  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    CheckFunc = Callable[[Context], Result]

# Check name -> module next to this file providing check(ctx).
REGISTRY: dict[str, str] = {
    "environment": "environment",
    "release": "release",
    "kernel_modules": "kernel_modules",
    "xfrm": "xfrm",
    "ikev2_tunnel": "ikev2_tunnel",
    "snapd": "snapd",
    "strongswan_service": "strongswan_service",
    "boot": "boot",
    "apparmor": "apparmor",
    "updates": "updates",
    "parity": "parity",
    "hygiene": "hygiene",
}
PROFILES = ("full", "assessment")
# A check that takes longer has hung; its own cleanup still runs when the alarm fires.
CHECK_TIMEOUT_S = 600


class UsageError(Exception):
    """Bad arguments or expectations: exit status 2."""


class CheckTimeout(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM/SIGHUP (the host gave up, or its SSH session died): unwind so every
    check's cleanup runs, then stop."""


def load_expectations(path: str, known: dict[str, Any]) -> dict[str, Any]:
    try:
        expect = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read expectations {path}: {exc}") from exc
    if not isinstance(expect, dict):
        raise UsageError("expectations must be a JSON object")
    checks = expect.get("checks")
    if not isinstance(checks, list) or not all(isinstance(c, str) for c in checks):
        raise UsageError('expectations need "checks": a list of check names')
    unknown = [c for c in checks if c not in known]
    if unknown:
        raise UsageError(f"unknown checks {unknown}; known: {sorted(known)}")
    if len(set(checks)) != len(checks):
        raise UsageError(f"duplicate check names in {checks}")
    profile = expect.get("profile", "full")
    if profile not in PROFILES:
        raise UsageError(f"profile must be one of {PROFILES}, not {profile!r}")
    for section in ("service", "packages", "kernel_modules", "apparmor", "updates", "parity"):
        if expect.get(section) is not None and not isinstance(expect[section], dict):
            raise UsageError(f'"{section}" must be an object or null')
    return expect


def select(checks: list[str], only: str | None) -> list[str]:
    """The checks to run, in the expectations' order; --only picks a subset of them."""
    if not only:
        return list(checks)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    strangers = [name for name in wanted if name not in checks]
    if strangers:
        raise UsageError(f"--only {strangers}: not among the expected checks {checks}")
    return [name for name in checks if name in wanted]


def resolve(name: str, registry: dict[str, Any]) -> CheckFunc:
    """The check function: registry entries are module names (imported here, so that a
    broken module fails only its own check) or, for tests, callables."""
    entry = registry[name]
    if callable(entry):
        return entry
    return importlib.import_module(entry).check  # type: ignore[no-any-return]


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise CheckTimeout(f"timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_one(
    name: str,
    registry: dict[str, Any],
    expect: dict[str, Any],
    workdir: Path,
    timeout: int = CHECK_TIMEOUT_S,
) -> tuple[dict[str, Any], Terminated | None]:
    """Run one check in its own scratch directory. Never raises: a crash or a hang becomes a
    fail result; a termination signal is returned (after the check's cleanup ran) so the
    caller can report this check and stop."""
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=str(workdir)))
    log(f"--- {name}")
    stop = None
    try:
        with redirect_stdout(sys.stderr), alarm(timeout):
            result = resolve(name, registry)(Context(expect, scratch))
        if not isinstance(result, Result):
            raise TypeError(f"check returned {type(result).__name__}, not a Result")
    except Exception as exc:
        log(traceback.format_exc())
        result = Result(FAIL, f"check crashed: {type(exc).__name__}: {exc}", {})
    except Terminated as exc:
        stop = exc
        result = Result(FAIL, f"interrupted by {exc}; the check's cleanup ran", {})
    finally:
        shutil.rmtree(str(scratch), ignore_errors=True)
    if result.status not in (PASS, FAIL, SKIP):
        result = Result(FAIL, f"check returned status {result.status!r}: {result.detail}", {})
    duration = round(time.monotonic() - started, 3)
    log(f"--- {name}: {result.status} in {duration} s: {one_line(result.detail)}")
    record = {
        "name": name,
        "status": result.status,
        "required": True,  # every listed check is; optional parts live inside a check's data
        "detail": one_line(result.detail),
        "duration": duration,
        "data": result.data,
    }
    return record, stop


def emit(record: dict[str, Any], out: Any) -> None:
    out.write(json.dumps(record, sort_keys=False, default=str) + "\n")
    out.flush()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", required=True, help="expectations.json written by the host")
    parser.add_argument("--only", help="comma-separated subset of the expected checks")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary one)")
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            raise
        raise UsageError("bad arguments") from exc


def _terminate(signum: int, frame: object) -> None:
    # One unwinding is enough: a second signal must not interrupt the cleanup it started.
    for other in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(other, signal.SIG_IGN)
    raise Terminated(f"signal {signum}")


def main(
    argv: list[str] | None = None,
    registry: dict[str, Any] | None = None,
    require_root: bool = True,
    check_timeout: int = CHECK_TIMEOUT_S,
) -> int:
    """The command line; registry, require_root and check_timeout are for tests."""
    registry = REGISTRY if registry is None else registry
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        expect = load_expectations(args.expect, registry)
        names = select(expect["checks"], args.only)
        if require_root and os.geteuid() != 0:
            raise UsageError("the checks must run as root")
    except UsageError as exc:
        log(f"usage: {exc}")
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imagefactory-checks-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if own_workdir:
        # Traversable, not listable: unprivileged helpers (apt's _apt downloads) can reach a
        # check's files when that check opens them up.
        workdir.chmod(0o711)
    failed = False
    try:
        for name in names:
            record, stop = run_one(name, registry, expect, workdir, check_timeout)
            failed |= record["required"] and record["status"] == FAIL
            emit(record, sys.stdout)
            if stop is not None:
                raise stop
    except Terminated as exc:
        log(f"stopped by {exc}")
        return 1
    finally:
        if own_workdir:
            shutil.rmtree(str(workdir), ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
