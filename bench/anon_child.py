"""Builds ordinary Python data until its resident memory reaches a target, then waits.

    python bench/anon_child.py TARGET_BYTES

The bench reads this process's writable private mappings through /proc/PID/mem as
its corpus of real anonymous memory: what a Python service's heap looks like to
swap. Seeded, and started with ASLR off and PYTHONHASHSEED=0, so the same bytes
come out every time on the same interpreter. Prints "ready" when built and exits
when its stdin closes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "an", "el", "or", "us", "ph", "th"]
CITIES = ["Berlin", "Lisbon", "Osaka", "Lagos", "Lima", "Oslo", "Quito", "Perth", "Austin"]
BATCH = 5000


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def word(rng: random.Random) -> str:
    return "".join(rng.choices(SYLLABLES, k=rng.randrange(2, 5)))


def record(rng: random.Random, i: int, vocabulary: list[str]) -> dict[str, Any]:
    """One row of a typical in-memory table: strings, ints, floats, nested lists."""
    name = f"{rng.choice(vocabulary).title()} {rng.choice(vocabulary).title()}"
    return {
        "id": i,
        "name": name,
        "email": f"{name.replace(' ', '.').lower()}@example.org",
        "city": rng.choice(CITIES),
        "score": rng.random() * 100,
        "balance": rng.randrange(-10_000, 1_000_000) / 100,
        "tags": rng.sample(vocabulary, rng.randrange(1, 6)),
        "visits": [rng.randrange(1_600_000_000, 1_700_000_000) for _ in range(rng.randrange(8))],
        "bio": " ".join(rng.choices(vocabulary, k=rng.randrange(4, 24))),
    }


def build(target: int) -> list[Any]:
    rng = random.Random(1)
    vocabulary = [word(rng) for _ in range(3000)]
    table: dict[str, dict[str, Any]] = {}
    series: list[float] = []
    counters: dict[int, int] = {}
    i = 0
    while rss() < target:
        for _ in range(BATCH):
            table[f"user:{i}"] = record(rng, i, vocabulary)
            series.append(rng.gauss(0, 1))
            counters[rng.randrange(1 << 20)] = i
            i += 1
    return [vocabulary, table, series, counters]


def main() -> int:
    data = build(int(sys.argv[1]))
    print("ready", len(data[1]), flush=True)
    sys.stdin.read()  # hold the data until the bench has read it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
