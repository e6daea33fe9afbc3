"""Sizes on the command line: bytes with K/M/G/T suffixes, or a percentage of RAM."""

from __future__ import annotations

import os
import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> int:
    """'8M' -> 8388608, '20%' -> a fifth of RAM. ValueError with a readable message."""
    text = text.strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"bad size {text!r}") from None
        if not 0 < percent <= 100:
            raise ValueError(f"bad size {text!r}: a percentage must be in (0, 100]")
        return int(total_ram() * percent / 100)
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"bad size {text!r} (use bytes, K/M/G/T, or N%)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def format_size(n: float) -> str:
    """Human-readable, as zramctl prints sizes."""
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def parse_limit(text: str, whole: int) -> int | None:
    """A limit as `.max` and --max-pool-per-user take it: 'max' (no limit, None), bytes
    with K/M/G/T, or 'N%' of `whole` (the budget, --max-pool). ValueError otherwise."""
    text = text.strip()
    if text == "max":
        return None
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            raise ValueError(f"bad size {text!r}") from None
        if not 0 <= percent <= 100:
            raise ValueError(f"bad size {text!r}: a percentage must be in [0, 100]")
        return int(whole * percent / 100)
    return parse_size(text)


def format_limit(limit: int | None) -> str:
    """What `cat .max` shows: bytes, or 'max' for no limit (as cgroup files show it)."""
    return "max" if limit is None else str(limit)
