"""Timed, nested steps: users of a long pipeline see where they are and where the time went."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class StepLog:
    out: TextIO = sys.stderr
    timings: dict[str, float] = field(default_factory=dict)
    _depth: int = 0
    prefix: str = ""  # names whose line it is when several runs share the output

    def say(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        # One write per line: lines of runs in parallel interleave, never mix.
        self.out.write(f"{stamp} {self.prefix}{'  ' * self._depth}{message}\n")
        self.out.flush()

    def child(self, prefix: str = "") -> StepLog:
        """A log of its own timings (one pair's), at this depth, to the same output."""
        return StepLog(out=self.out, _depth=self._depth, prefix=self.prefix + prefix)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.say(f"==> {name}")
        self._depth += 1
        started = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            elapsed = time.monotonic() - started
            self._depth -= 1
            self.timings[name] = round(elapsed, 3)
            self.say(f"<== {name}: {'done' if ok else 'FAILED'} in {elapsed:.1f} s")
