"""What the compiled page index (tmemfs/_pagetable.pyx) costs: bytes and time per page.

In process, no mount, no zram. For 10^4, 10^5 and 10^6 pages put into one
`PageTable`, consecutive and sparse (every 7th index), the bytes its `IndexMemory`
counts per page; then, over 10^6 consecutive pages in runs of 32 (an image request of
128 KiB), the time per page of put_run, run_handles and pop_run (best of 3).

    python -m bench.index_measure [--repeat N]
"""

from __future__ import annotations

import argparse
import time

from tmemfs._pagetable import PAGE_BYTES, IndexMemory, PageTable

SIZES = (10**4, 10**5, 10**6)
RUN = 32
SPARSE_STEP = 7


def bytes_per_page(count: int, step: int) -> float:
    """IndexMemory's bytes per page after putting `count` pages, `step` apart."""
    meter = IndexMemory()
    table = PageTable(meter)
    if step == 1:
        table.put_run(0, list(range(count)), 1)
    else:
        for n in range(count):
            table.put(n * step, n, 1)
    assert meter.pages == count
    return meter.nbytes / count


def ns_per_page(count: int, repeat: int) -> dict[str, float]:
    """The best of `repeat` times per page of put_run, run_handles and pop_run, over
    `count` consecutive pages taken in runs of RUN pages."""
    handles = [list(range(first, first + RUN)) for first in range(0, count, RUN)]
    best = {"put_run": float("inf"), "run_handles": float("inf"), "pop_run": float("inf")}
    for _ in range(repeat):
        table = PageTable()
        start = time.perf_counter_ns()
        for n, run in enumerate(handles):
            table.put_run(n * RUN, run, n + 1)
        mid = time.perf_counter_ns()
        for n in range(len(handles)):
            table.run_handles(n * RUN, RUN)
        later = time.perf_counter_ns()
        for n in range(len(handles)):
            table.pop_run(n * RUN, RUN)
        end = time.perf_counter_ns()
        assert len(table) == 0
        best["put_run"] = min(best["put_run"], (mid - start) / count)
        best["run_handles"] = min(best["run_handles"], (later - mid) / count)
        best["pop_run"] = min(best["pop_run"], (end - later) / count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timing runs; the best counts")
    args = parser.parse_args()
    print(f"PAGE_BYTES (what the budget charges a page): {PAGE_BYTES}")
    print(f"{'pages':>9} {'consecutive B/page':>19} {'every 7th B/page':>17}")
    for count in SIZES:
        dense = bytes_per_page(count, 1)
        sparse = bytes_per_page(count, SPARSE_STEP)
        print(f"{count:>9} {dense:>19.2f} {sparse:>17.2f}")
    times = ns_per_page(SIZES[-1], args.repeat)
    print(
        f"ns/page over {SIZES[-1]} pages in runs of {RUN}, best of {args.repeat}: "
        + ", ".join(f"{name} {ns:.1f}" for name, ns in times.items())
    )


if __name__ == "__main__":
    main()
