"""checks/run.py's protocol, run with python3 as the guest runs it, against fake checks."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from imagefactory.definitions import Checks

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "checks"
PROTOCOL_KEYS = ["name", "status", "required", "detail", "duration", "data"]

FAKES = """
import time
from checklib import Result, failed, passed, skipped

def good(ctx):
    return passed("all fine", answer=42)

def bad(ctx):
    return failed("broken\\n  on two lines")

def skip(ctx):
    return skipped("not applicable")

def crash(ctx):
    raise RuntimeError("boom")

def noisy(ctx):
    print("this must not reach stdout")
    return passed("printed something")

def hang(ctx):
    time.sleep(60)

def scratch(ctx):
    (ctx.workdir / "left-behind").write_text("x")
    return passed(str(ctx.workdir))

def wrong_type(ctx):
    return "pass"

def wrong_status(ctx):
    return Result("maybe", "unsure", {})
"""
NAMES = ["good", "bad", "skip", "crash", "noisy", "hang", "scratch", "wrong_type", "wrong_status"]
WRAPPER = f"""
import sys
sys.path[:0] = [{str(CHECKS)!r}, sys.argv.pop(1)]
import fakes, run
registry = {{name: getattr(fakes, name) for name in {NAMES!r}}}
sys.exit(run.main(sys.argv[1:], registry=registry, require_root=False, check_timeout=2))
"""


@pytest.fixture
def guest(tmp_path: Path):
    """Run run.py's main() in a fresh python3 with the fake checks; returns a runner."""
    (tmp_path / "fakes.py").write_text(FAKES)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)

    def go(checks: list[str], *args: str, expect: dict | None = None):
        path = tmp_path / "expect.json"
        path.write_text(json.dumps(expect or {"profile": "full", "checks": checks}))
        argv = [sys.executable, str(wrapper), str(tmp_path), "--expect", str(path), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        return done.returncode, lines, done.stderr

    return go


def test_one_json_line_per_check_in_expectation_order(guest) -> None:
    code, lines, _ = guest(["skip", "good"])

    assert code == 0
    assert [r["name"] for r in lines] == ["skip", "good"]
    assert all(list(r) == PROTOCOL_KEYS for r in lines)
    assert lines[1]["status"] == "pass" and lines[1]["data"] == {"answer": 42}
    assert lines[0]["status"] == "skip" and lines[0]["required"] is True
    assert isinstance(lines[1]["duration"], float)


def test_a_failing_check_makes_exit_1_and_detail_is_one_line(guest) -> None:
    code, lines, _ = guest(["good", "bad"])

    assert code == 1
    assert lines[1] == {**lines[1], "status": "fail", "detail": "broken on two lines"}


def test_a_crashing_check_becomes_a_fail_and_the_run_goes_on(guest) -> None:
    code, lines, stderr = guest(["crash", "good"])

    assert code == 1
    assert lines[0]["status"] == "fail"
    assert lines[0]["detail"] == "check crashed: RuntimeError: boom"
    assert lines[1]["status"] == "pass"
    assert "Traceback" in stderr  # the traceback goes to the log, not the protocol


def test_a_hanging_check_times_out_as_a_fail(guest) -> None:
    code, lines, _ = guest(["hang", "good"])

    assert code == 1
    assert lines[0]["status"] == "fail"
    assert "timed out after 2 s" in lines[0]["detail"]
    assert lines[1]["status"] == "pass"


def test_wrong_results_become_fails(guest) -> None:
    code, lines, _ = guest(["wrong_type", "wrong_status"])

    assert code == 1
    assert "not a Result" in lines[0]["detail"]
    assert "status 'maybe'" in lines[1]["detail"]


def test_stdout_carries_only_the_protocol(guest) -> None:
    code, lines, stderr = guest(["noisy"])

    assert code == 0
    assert len(lines) == 1
    assert "this must not reach stdout" in stderr


def test_only_runs_a_subset_in_expectation_order(guest) -> None:
    code, lines, _ = guest(["good", "bad", "skip"], "--only", "skip,good")

    assert code == 0
    assert [r["name"] for r in lines] == ["good", "skip"]


def test_scratch_directories_are_removed(guest, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    code, lines, _ = guest(["scratch"], "--workdir", str(workdir))

    assert code == 0
    assert Path(lines[0]["detail"]).parent == workdir
    assert workdir.is_dir() and not any(workdir.iterdir())


@pytest.mark.parametrize(
    ("checks", "args", "expect"),
    [
        (["nonexistent"], (), None),
        (["good", "good"], (), None),
        (["good"], ("--only", "bad"), None),
        (["good"], (), {"checks": "good"}),
        (["good"], (), {"checks": ["good"], "profile": "cheap"}),
        (["good"], (), {"checks": ["good"], "service": ["strongswan-starter"]}),
        (["good"], ("--bogus",), None),
    ],
)
def test_bad_usage_or_expectations_exit_2_with_nothing_on_stdout(
    guest, checks, args, expect
) -> None:
    code, lines, stderr = guest(checks, *args, expect=expect)

    assert code == 2
    assert lines == []
    assert stderr


def test_unreadable_expectations_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, str(CHECKS / "run.py"), "--expect", "/nonexistent/expect.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "cannot read expectations" in done.stderr


def test_the_real_registry_imports_on_this_python() -> None:
    """Every registered check module imports and has check(); run in a fresh interpreter
    (the modules' names are short and generic) without writing __pycache__ into checks/."""
    code = textwrap.dedent(f"""
        import sys
        sys.dont_write_bytecode = True
        sys.path.insert(0, {str(CHECKS)!r})
        import importlib, run
        for name, module in run.REGISTRY.items():
            assert callable(importlib.import_module(module).check), name
        print(sorted(run.REGISTRY))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    # Every check the image schema knows is registered in the guest, and nothing else.
    expected = sorted(Checks.model_fields)
    assert done.stdout.strip() == str(expected)


@pytest.mark.parametrize("path", sorted(CHECKS.glob("*.py")), ids=lambda p: p.name)
def test_guest_code_parses_as_python_3_8(path: Path) -> None:
    """focal's python3 is 3.8: no syntax newer than that in anything the guest runs."""
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


@pytest.mark.parametrize("path", sorted(CHECKS.glob("*.py")), ids=lambda p: p.name)
def test_guest_code_uses_only_the_standard_library(path: Path) -> None:
    local = {p.stem for p in CHECKS.glob("*.py")}
    tree = ast.parse(path.read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and not node.level
    }
    assert imported - local <= set(sys.stdlib_module_names)
