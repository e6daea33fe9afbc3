"""A progress bar per phase, on stderr.

On a terminal the bar redraws in place; elsewhere (a log, a test capturing output)
each phase prints one line when it starts and one when it ends, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

WIDTH = 30


class Progress:
    """`with Progress("phase", total) as bar: ... bar.step("what now")`."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase = phase
        self.total = max(total, 1)
        self.done = 0
        self.what = ""
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> Progress:
        if not self.tty:
            self._line(f"{self.phase}: started ({self.total} steps)")
        self._draw()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        elapsed = time.monotonic() - self.start
        outcome = "done" if kind is None else f"stopped ({kind.__name__})"
        if self.tty:
            sys.stderr.write("\r\033[K")
        self._line(f"{self.phase}: {outcome} in {elapsed:.1f} s")

    def note(self, what: str) -> None:
        """Say what the current step is doing."""
        self.what = what
        self._draw()

    def step(self, what: str = "") -> None:
        """One step done; `what` names the next."""
        self.done = min(self.done + 1, self.total)
        self.what = what
        self._draw()

    def _draw(self) -> None:
        if not self.tty:
            return
        filled = WIDTH * self.done // self.total
        bar = "#" * filled + "-" * (WIDTH - filled)
        elapsed = time.monotonic() - self.start
        sys.stderr.write(
            f"\r\033[K{self.phase:<10} [{bar}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s {self.what}"[:200]
        )
        sys.stderr.flush()

    @staticmethod
    def _line(text: str) -> None:
        sys.stderr.write(f"bench: {text}\n")
        sys.stderr.flush()
