"""What a comparison hands to the report: rows of figures, ratios and goals."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Goal:
    """A target for a ratio, printed next to it; the bench reports, it does not assert."""

    text: str
    minimum: float | None = None
    maximum: float | None = None

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        if self.minimum is not None and ratio < self.minimum:
            return False
        return not (self.maximum is not None and ratio > self.maximum)


def at_least(x: float, of: str) -> Goal:
    return Goal(f"≥ {x:g}x {of}", minimum=x)


def at_most(x: float, of: str) -> Goal:
    return Goal(f"≤ {x:g}x {of}", maximum=x)


@dataclass
class Row:
    """One measure: tmemfs against its reference, medians over runs."""

    measure: str
    unit: str
    tmemfs: float | None
    reference: float | None
    ratio: float | None
    goal: Goal | None = None


@dataclass
class Table:
    """A detail table of preformatted cells."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """One comparison: its method, its rows, its plots, and what went wrong if anything."""

    number: int
    title: str
    reference: str
    method: str = ""
    rows: list[Row] = field(default_factory=list)
    details: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired(
    measure: str,
    unit: str,
    tmemfs: Sequence[float],
    reference: Sequence[float],
    goal: Goal | None = None,
) -> Row:
    """Medians of each side, and the median of the per-run ratios.

    Runs are interleaved, so each run's ratio compares two measurements taken moments
    apart on the same machine state; its median resists one disturbed run better than
    a ratio of medians would.
    """
    ratios = [t / r for t, r in zip(tmemfs, reference, strict=True) if r]
    return Row(measure, unit, median(tmemfs), median(reference), median(ratios), goal)
