"""Importing checks/ (the guest side) into host tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def guest_module(name: str):
    """Import a module of checks/ without leaving __pycache__ in checks/ (copied to guests)."""
    sys.path.insert(0, str(ROOT / "checks"))
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        return importlib.import_module(name)
    finally:
        sys.dont_write_bytecode = saved
