"""What the compiled store spends per kept page beyond the payload (issue 10).

The files corpus, every page stamped with its number (corpora.stamp_unique, as the
growth comparison writes it) so that no two pages share a payload, is encoded in 1 MiB
batches and kept in one SlabStore (no zram, no mount) up to 10^4, 10^5 and 10^6 pages.
At each point, per page:

- overhead: (memory_used - payload_bytes) / pages, what the budget charges beyond the
  compressed bytes (slots' rounding, records, the dedup table's share);
- rounding: (slot_bytes - payload_bytes) / pages, the size classes' share of it;
- record: (memory_used - slot_bytes) / pages, the record's share (RECORD_OVERHEAD);
- mapped: memory_mapped() / pages and (memory_mapped - payload_bytes) / pages, the
  memory really taken (chunks with their unused tails, the tables at their capacity);
- RSS: the process's VmRSS growth since before the store, per page (the first run);
- keep: keep_all's time per page (encoding apart), the best of `--runs` runs.

    python -m bench.overhead_measure [--files MiB] [--runs N] [--points 10000,100000,...]
"""

from __future__ import annotations

import argparse
import mmap
import time
from dataclasses import dataclass

from tmemfs._pagestore import RECORD_OVERHEAD, SlabStore

from bench import corpora

MiB = 1 << 20
BATCH = MiB


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class Point:
    pages: int
    overhead: float
    rounding: float
    record: float
    mapped: float
    mapped_overhead: float
    rss: float
    keep_ns: float  # keep_all per page, pages kept since the previous point


def run(base: corpora.Corpus, points: list[int]) -> list[Point]:
    chunk = mmap.mmap(-1, BATCH)
    rss0 = rss()
    store = SlabStore(corpora.PAGE, corpora.PAGE * 7 // 8, 2)
    out: list[Point] = []
    done = 0
    for target in points:
        kept_ns = 0
        start_done = done
        while done < target:
            n = min(BATCH // corpora.PAGE, target - done)
            corpora.stamp_unique(base, done, chunk)
            batch = store.encode(memoryview(chunk)[: n * corpora.PAGE])
            start = time.perf_counter_ns()
            store.keep_all(batch)  # the handles are dropped: a list of ints is RSS too
            kept_ns += time.perf_counter_ns() - start
            done += n
        used, payload = store.memory_used(), store.payload_bytes
        mapped = store.memory_mapped()
        out.append(
            Point(
                done,
                (used - payload) / done,
                (store.slot_bytes - payload) / done,
                (used - store.slot_bytes) / done,
                mapped / done,
                (mapped - payload) / done,
                (rss() - rss0) / done,
                kept_ns / (done - start_done),
            )
        )
    assert store.payload_pages == done and store.dedup_pages == 0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=128, help="MiB of the files corpus")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--points", default="10000,100000,1000000")
    args = parser.parse_args()
    points = [int(p) for p in args.points.split(",")]
    base = corpora.files(args.files * MiB)
    print(
        f"files corpus: {base.pages} pages, stamped distinct; RECORD_OVERHEAD {RECORD_OVERHEAD} B"
    )
    runs = [run(base, points) for _ in range(args.runs)]
    print(
        f"{'pages':>8} {'overhead':>9} {'rounding':>9} {'record':>7} {'mapped':>8} "
        f"{'mapped-pl':>9} {'RSS':>8} {'keep ns':>8}   (B/page; keep: best of "
        f"{args.runs})"
    )
    for i, p in enumerate(runs[0]):
        keep = min(r[i].keep_ns for r in runs)
        print(
            f"{p.pages:>8} {p.overhead:>9.1f} {p.rounding:>9.1f} {p.record:>7.1f} "
            f"{p.mapped:>8.1f} {p.mapped_overhead:>9.1f} {p.rss:>8.1f} {keep:>8.0f}"
        )


if __name__ == "__main__":
    main()
