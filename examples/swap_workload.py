#!/usr/bin/env python3
"""Memory-hungry, self-checking workload for examples/swap-on-loop.sh.

Fills WORKING_SET bytes of anonymous memory with realistic, compressible data
(log lines, CSV rows, JSON records and prose, roughly 2-3x compressible with
lz4, never zeros and never random noise), keeps a CRC-32 of every page, then
reads everything back twice (first in order, then in a shuffled order) and
verifies every checksum.  Run inside a memory cgroup whose limit is well below
WORKING_SET, every page goes out to swap and comes back at least once.

Memory is allocated as page-aligned anonymous mmap chunks, so one "page" of the
workload is exactly one page the kernel swaps; a mismatch is reported with the
page it hit and what came back (zeros, another page, garbage).

Every page starts with a unique header line, so no two pages are identical (the
store's deduplication cannot make the experiment look better than it is).

Standard library only, so the system python3 runs it:

    python3 swap_workload.py --working-set 768M [--chunk-size 1M] [--seed 1]

Prints one PASS or FAIL line at the end; exit status 0 on PASS, 1 on FAIL,
2 on a usage error.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import re
import sys
import time
import zlib
from array import array

PAGE = mmap.PAGESIZE
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'768M', '1G', '4096', '1.5G', '512KiB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4096, 64K, 768M, 1G)")
    n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def proc_status() -> str:
    """VmRSS and VmSwap of this process: shows the kernel really swapped us."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmSwap"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return ""
    return " ".join(f"{k}={mib(v)}" for k, v in fields.items())


# --------------------------------------------------------------------------
# Realistic data: a corpus of varied text records, sliced into pages.

_WORDS_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his "
    "from at which but have an they you were her she there been one all would "
    "their we him has when who will more no if out so said what up its about into "
    "than them can only other new some could time these two may then do first any "
    "my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right "
    "used take three memory page swap kernel pool store load flush compress cache "
    "block device loop frontswap cleancache transcendent request latency budget"
)
WORDS = _WORDS_TEXT.split()
HOSTS = [f"web{i:02d}.dc{j}.example.net" for i in range(12) for j in range(3)]
PATHS = [
    "/",
    "/index.html",
    "/api/v1/items",
    "/api/v1/items/{id}",
    "/api/v1/users/{id}",
    "/static/app.js",
    "/static/style.css",
    "/login",
    "/logout",
    "/search?q={w}",
    "/img/{id}.png",
    "/api/v2/orders/{id}/lines",
    "/healthz",
    "/metrics",
]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/126.0",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "Prometheus/2.51.0",
]
ZIPF = [1.0 / (rank + 1) for rank in range(len(WORDS))]  # natural word frequencies
MESSAGES = [
    "request completed in {n} ms",
    "connection from {h} accepted",
    "connection to {h} closed after {n} requests",
    "cache miss for key user:{n}:{w}, loading from backend",
    "cache hit for key user:{n}:profile",
    "retrying upstream {h} (attempt {n} of 5)",
    "slow query on table {w}: {n} ms",
    "user {w}_{n} logged in",
    "user {w}_{n} logged out",
    "scheduled job {w}-cleanup finished, {n} rows removed",
    "health check passed for {h}",
    "queue depth is {n}, below high-water mark",
    "failed to parse header X-{w}: invalid value",
    "flushing {n} dirty pages to storage",
]
LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
CLIENTS = [f"10.{i % 7}.{i % 13}.{i}" for i in range(1, 60)]
CITIES = ["Berlin", "Lisbon", "Osaka", "Lagos", "Lima", "Oslo", "Quito", "Perth", "Austin"]


def _record(rng: random.Random, t: float, seq: int) -> str:
    kind = rng.random()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    if kind < 0.45:  # web access log
        path = rng.choice(PATHS).format(id=rng.randrange(1, 2000), w=rng.choice(WORDS))
        return (
            f"{rng.choice(CLIENTS)} - - [{ts}Z] "
            f'"{rng.choice(["GET", "GET", "GET", "POST", "PUT"])} {path} '
            f'HTTP/1.1" {rng.choice([200, 200, 200, 200, 304, 404, 500])} '
            f'{rng.choice([512, 1024, 4096, 8731, 15872, rng.randrange(50000)])} "-" '
            f'"{rng.choice(AGENTS)}"\n'
        )
    if kind < 0.7:  # application log
        msg = rng.choice(MESSAGES).format(
            n=rng.randrange(1, 500), w=rng.choice(WORDS), h=rng.choice(HOSTS)
        )
        return (
            f"{ts}.{rng.randrange(1000):03d} {rng.choice(LEVELS):5} "
            f"[{rng.choice(HOSTS)}] worker-{rng.randrange(32)}: {msg}\n"
        )
    if kind < 0.85:  # CSV row
        return (
            f"{100000 + seq},{ts},{rng.choice(CITIES)},"
            f"{rng.uniform(-10, 35):.1f},{rng.randrange(20, 100)},"
            f"{rng.randrange(950, 1050)},{rng.choice(WORDS)}\n"
        )
    if kind < 0.95:  # JSON record
        return (
            f'{{"id": {seq}, "user": "{rng.choice(WORDS)}_'
            f'{rng.randrange(100)}", "city": "{rng.choice(CITIES)}", '
            f'"score": {rng.random():.2f}, "tags": ["{rng.choice(WORDS)}", '
            f'"{rng.choice(WORDS)}"], "active": {rng.choice(["true", "false"])}}}\n'
        )
    # prose
    n = rng.randrange(8, 30)
    sentence = " ".join(rng.choices(WORDS, weights=ZIPF, k=n))
    return sentence[0].upper() + sentence[1:] + ".\n"


def make_corpus(rng: random.Random, size: int) -> bytes:
    t = 1_700_000_000.0
    parts, total = [], 0
    while total < size:
        t += rng.expovariate(20.0)
        line = _record(rng, t, len(parts)).encode()
        parts.append(line)
        total += len(line)
    return b"".join(parts)


def page_header(seed: int, chunk: int, page: int) -> bytes:
    return b"# tmemfs swap workload seed=%d chunk=%07d page=%04d\n" % (seed, chunk, page)


# --------------------------------------------------------------------------


def describe_page(got: bytes, seed: int, chunk: int, page: int, pages_per_chunk: int) -> str:
    """Say what came back in place of a page, to help find the bug."""
    if got.count(0) == len(got):
        return "came back as zeros (a page that was never stored, or a lost store)"
    if got[:30] == page_header(seed, 0, 0)[:30]:
        try:
            fields = dict(kv.split(b"=") for kv in got.split(b"\n", 1)[0].split()[4:])
            c, p = int(fields[b"chunk"]), int(fields[b"page"])
        except (ValueError, KeyError):
            return "header is damaged"
        if (c, p) != (chunk, page):
            return f"holds another page (chunk {c} page {p}, global page {c * pages_per_chunk + p})"
        return "has the right header but wrong contents further in"
    return f"holds unrelated data, starting {got[:24]!r}"


def verify(
    chunks: list[mmap.mmap],
    crcs: array,
    page_crcs: array,
    order: list[int],
    seed: int,
    pages_per_chunk: int,
    max_report: int = 10,
) -> int:
    bad_pages = 0
    for i in order:
        m = chunks[i]
        if zlib.crc32(m) == crcs[i]:
            continue
        # Chunk is damaged: find the pages.
        for p in range(pages_per_chunk):
            got = m[p * PAGE : (p + 1) * PAGE]
            if zlib.crc32(got) != page_crcs[i * pages_per_chunk + p]:
                bad_pages += 1
                if bad_pages <= max_report:
                    print(
                        f"  MISMATCH chunk {i} page {p} (global page {i * pages_per_chunk + p}): "
                        + describe_page(got, seed, i, p, pages_per_chunk),
                        flush=True,
                    )
    if bad_pages > max_report:
        print(f"  ... and {bad_pages - max_report} more bad pages", flush=True)
    return bad_pages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Fill memory with checksummed realistic data, read it back twice, verify."
    )
    ap.add_argument(
        "--working-set",
        "-s",
        type=parse_size,
        default=parse_size("768M"),
        help="bytes of memory to fill (K/M/G suffixes; default 768M)",
    )
    ap.add_argument(
        "--chunk-size",
        type=parse_size,
        default=parse_size("1M"),
        help="allocation unit, a multiple of the page size (default 1M)",
    )
    ap.add_argument("--passes", type=int, default=2, help="read-back passes (default 2)")
    ap.add_argument("--seed", type=int, default=1, help="PRNG seed (default 1)")
    ap.add_argument(
        "--corpus-size",
        type=parse_size,
        default=parse_size("4M"),
        help="size of the text corpus pages are cut from (default 4M)",
    )
    args = ap.parse_args(argv)

    if args.chunk_size % PAGE:
        ap.error(f"--chunk-size must be a multiple of the page size ({PAGE})")
    if args.passes < 1:
        ap.error("--passes must be at least 1")
    if args.corpus_size < 16 * PAGE:
        ap.error(f"--corpus-size must be at least {16 * PAGE}")
    if args.working_set < args.chunk_size:  # a small working set: one chunk, no more
        args.chunk_size = -(-args.working_set // PAGE) * PAGE
    nchunks = max(1, -(-args.working_set // args.chunk_size))
    ppc = args.chunk_size // PAGE
    total = nchunks * args.chunk_size
    seed = args.seed
    rng = random.Random(seed)

    corpus = make_corpus(rng, args.corpus_size)
    cview = memoryview(corpus)
    span = len(corpus) - PAGE

    print(
        f"workload: pid {os.getpid()}, filling {mib(total)} "
        f"({nchunks} chunks x {mib(args.chunk_size)}, {nchunks * ppc} pages of {PAGE} B), "
        f"seed {seed}",
        flush=True,
    )
    crcs = array("I", bytes(4 * nchunks))
    page_crcs = array("I", bytes(4 * nchunks * ppc))
    chunks: list[mmap.mmap] = []
    t0 = time.monotonic()
    next_report = t0 + 5
    try:
        for c in range(nchunks):
            m = mmap.mmap(-1, args.chunk_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for p in range(ppc):
                hdr = page_header(seed, c, p)
                off = rng.randrange(span)
                page = hdr + cview[off : off + PAGE - len(hdr)]
                m[p * PAGE : (p + 1) * PAGE] = page
                page_crcs[c * ppc + p] = zlib.crc32(page)
            crcs[c] = zlib.crc32(m)
            chunks.append(m)
            now = time.monotonic()
            if now >= next_report:
                next_report = now + 5
                print(
                    f"workload: filled {mib((c + 1) * args.chunk_size)} of {mib(total)}  "
                    f"{proc_status()}",
                    flush=True,
                )
    except (MemoryError, OSError) as e:
        print(f"workload: FAIL: could not allocate the working set: {e}", flush=True)
        return 1
    dt = time.monotonic() - t0
    rate = mib(total / max(dt, 1e-6))
    print(f"workload: fill done in {dt:.1f} s ({rate}/s)  {proc_status()}", flush=True)

    bad = 0
    for n in range(1, args.passes + 1):
        order = list(range(nchunks))
        if n > 1:
            rng.shuffle(order)
        t0 = time.monotonic()
        b = verify(chunks, crcs, page_crcs, order, seed, ppc)
        dt = time.monotonic() - t0
        bad += b
        print(
            f"workload: pass {n}/{args.passes} ({'in order' if n == 1 else 'shuffled'}) "
            f"read {mib(total)} in {dt:.1f} s ({mib(total / max(dt, 1e-6))}/s), "
            f"{b} bad pages  {proc_status()}",
            flush=True,
        )

    if bad:
        print(
            f"workload: FAIL: {bad} page mismatches in {args.passes} passes over "
            f"{nchunks * ppc} pages",
            flush=True,
        )
        return 1
    print(
        f"workload: PASS: {nchunks * ppc} pages ({mib(total)}) verified {args.passes} times",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
