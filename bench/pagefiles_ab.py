"""Page files on tmemfs against the bare pyfuse3 dict filesystem, interleaved.

    python -m bench.pagefiles_ab [--pages 2000] [--rounds 5] [--count] [-- TMEMFS OPTIONS]

Mounts a fresh tmemfs and bench/barefs.py side by side (root needed), then runs
`bench.pagefiles.store_and_load` on each in turn, --rounds times (a new pool each
round), and prints pages/s of every round and the median ratios: the page-file goal
of section 7 (>= 1.5x bare pyfuse3) without the rest of the bench, and without zram.
With --count it first counts the FUSE requests one store and one load send to each
filesystem, from the kernel's fuse:fuse_request_send tracepoint (perf, system-wide,
filtered to each mount's connection).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import devices
from bench.compare.ceiling import barefs
from bench.pagefiles import store_and_load, usr_lib_pages

# One line of `perf script` for the tracepoint: "... connection 58 req 12 opcode 1 (FUSE_LOOKUP)".
REQUEST = re.compile(r"connection (\d+) req \d+ opcode \d+ \((\w+)\)")


def connection(mount: Path) -> int:
    """The kernel's dev_t of a FUSE mount, as the tracepoint prints it (MKDEV)."""
    dev = os.stat(mount).st_dev
    return (os.major(dev) << 20) | os.minor(dev)


def count_requests(mount: Path, work: callable) -> collections.Counter[str]:  # type: ignore[valid-type]
    """The FUSE requests `work()` makes the kernel send to `mount`."""
    conn = connection(mount)
    with tempfile.NamedTemporaryFile(suffix=".perf") as data:
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-a", "-e", "fuse:fuse_request_send", "-o", data.name],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # perf needs a moment before it records
        try:
            work()
            time.sleep(0.5)  # asynchronous releases
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=30)
        script = subprocess.run(
            ["perf", "script", "-i", data.name], capture_output=True, text=True, check=True
        ).stdout
    counts: collections.Counter[str] = collections.Counter()
    for match in REQUEST.finditer(script):
        if int(match.group(1)) == conn:
            counts[match.group(2).removeprefix("FUSE_")] += 1
    return counts


def per_operation(counts: collections.Counter[str], n: int) -> str:
    total = sum(counts.values()) / n
    parts = " ".join(f"{op} {c / n:g}" for op, c in sorted(counts.items(), key=lambda x: -x[1]))
    return f"{total:.2f} requests: {parts}"


def count(name: str, pool: Path, mount: Path, pages: list[bytes]) -> None:
    pool.mkdir(parents=True)
    n = len(pages)

    def store() -> None:
        for i, page in enumerate(pages):
            with open(pool / str(i), "wb", buffering=0) as f:
                f.write(page)

    def load() -> None:
        for i, page in enumerate(pages):
            with open(pool / str(i), "rb", buffering=0) as f:
                if f.read() != page:
                    raise SystemExit(f"page {i} came back different")

    print(f"  {name:6} store  {per_operation(count_requests(mount, store), n)}")
    print(f"  {name:6} load   {per_operation(count_requests(mount, load), n)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", action="store_true", help="count FUSE requests first")
    parser.add_argument("tmemfs_options", nargs="*", help="after --: options of tmemfs mount")
    args = parser.parse_args()
    pages = list(itertools.islice(usr_lib_pages(1 << 40), args.pages))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmem = stack.enter_context(devices.tmemfs(Path(tmp, "tmem"), *args.tmemfs_options))
        bare = stack.enter_context(barefs(Path(tmp, "bare"), 64 << 20))
        pools = {"tmemfs": tmem.path / "frontswap", "bare": bare}
        mounts = {"tmemfs": tmem.path, "bare": bare}
        if args.count:
            print(f"FUSE requests per operation ({len(pages)} page files, fuse:fuse_request_send):")
            for name in pools:
                count(name, pools[name] / "900", mounts[name], pages[:200])
        rates: dict[str, dict[str, list[float]]] = {n: {"store": [], "load": []} for n in pools}
        print(f"{len(pages)} page files per round, pages/s:")
        for rnd in range(args.rounds):
            line = [f"  round {rnd}"]
            for name, root in pools.items():
                store, load = store_and_load(root / str(rnd), pages)
                rates[name]["store"].append(store)
                rates[name]["load"].append(load)
                line.append(f"{name} store {store:7.0f} load {load:7.0f}")
            print("   ".join(line))
        for op in ("store", "load"):
            t = statistics.median(rates["tmemfs"][op])
            b = statistics.median(rates["bare"][op])
            print(f"median {op:5}  tmemfs {t:7.0f}  bare {b:7.0f}  ratio {t / b:.2f}x  (goal 1.5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
