"""Counter names, as zswap's debugfs and zram's mm_stat name them where they can."""

from __future__ import annotations

# Event counters: they only grow, and count pages, never requests.
EVENT_COUNTERS = (
    "stores",
    "loads",
    "load_misses",
    "invalidates",
    "duplicate_entry",
    "reject_compress_poor",
    "reject_alloc_fail",
    "pool_limit_hit",
    "written_back_pages",
    "evicted_pages",
)

# Gauges: what is held now.
GAUGES = (
    "stored_pages",
    "orig_data_size",
    "compr_data_size",
    "pool_total_size",
    "same_filled_pages",
    "dedup_pages",
    "recompressed_pages",
    "recompress_saved_bytes",
)

# The order in which `stats` and `.stats` print them.
ALL_COUNTERS = GAUGES + EVENT_COUNTERS


def new_counters() -> dict[str, int]:
    """A fresh set of event counters, all zero."""
    return dict.fromkeys(EVENT_COUNTERS, 0)


def render(values: dict[str, int | str]) -> bytes:
    """The text of a stats file: one "name value" per line."""
    return "".join(f"{name} {value}\n" for name, value in values.items()).encode()


def parse(text: str) -> dict[str, str]:
    """Read back what `render` wrote: the one parser of stats, .stats and .daemon."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name:
            values[name] = value
    return values


def counters(text: str) -> dict[str, int]:
    """The numeric lines of a stats file, as integers (for `tmemfs stat`, tests, bench)."""
    return {name: int(value) for name, value in parse(text).items() if value.lstrip("-").isdigit()}
