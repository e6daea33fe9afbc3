#!/usr/bin/env python3
"""block_cache.py - a cleancache pool as a cache of decompressed blocks, in plain file I/O.

Reading a compressed file (.gz, .xz, .bz2) at random offsets is slow: each block
costs a decompression from wherever the decompressor stands, often from the start
of the file. This script reads random page-sized blocks of such a file and keeps
every block it decompressed in tmemfs, exactly as the kernel's cleancache keeps
clean file pages:

    MOUNT/cleancache/POOL/            the pool (mkdir = cleancache init_fs)
    MOUNT/cleancache/POOL/OBJECT/     the file: ino<inode>-<size>-<mtime>, so a
                                      changed file is a new object (its old pages
                                      are never returned for it)
    MOUNT/cleancache/POOL/OBJECT/N    block N of the decompressed file, one page

A read first opens MOUNT/.../N: a hit returns the page; ENOENT is a miss (never put,
or evicted since: cleancache pages may vanish at any time). On a miss the block is
decompressed and put with a plain write; a put that the budget refuses (ENOSPC) is
simply not cached. The pool stays after the run, so the next run starts warm;
--drop flushes the object at the end (rmdir = invalidate_inode).

Without FILE it makes a sample: a gzip file of log-like text, in a temporary
directory that it removes again (with its object in the pool: --drop). Reads
follow an 80/20 pattern (--hot), so a cache helps, as it does for real workloads.

    examples/block_cache.py /mnt/tmem                   # the sample, 4000 reads
    examples/block_cache.py /mnt/tmem /var/log/syslog.2.gz --reads 20000
    examples/block_cache.py /mnt/tmem big.xz --verify --json

Exit status: 0 done, 1 an error (not a tmemfs, a wrong page with --verify), 2 usage.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import errno
import gzip
import json
import lzma
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

# The stats format and sizes as tmemfs itself reads them; run this with tmemfs's
# python (.venv/bin/python). Everything else here is plain file I/O.
from tmemfs.engine import stats as statsfmt
from tmemfs.sizes import parse_size

OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}


@dataclass
class Result:
    """What one run saw; printed as a summary, or as JSON with --json."""

    file: str
    cache: str
    size: int = 0
    blocks: int = 0
    block_size: int = 0
    reads: int = 0
    hits: int = 0
    misses: int = 0
    evicted: int = 0
    refused: int = 0
    verified: int = 0
    miss_seconds: float = 0.0
    hit_seconds: float = 0.0
    # A run without misses (all warm) times a few decompressions apart, not counted.
    miss_estimate: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.reads if self.reads else 0.0

    @property
    def miss_cost(self) -> float:
        """Seconds to decompress (and put) one block."""
        if self.misses:
            return self.miss_seconds / self.misses
        return self.miss_estimate or 0.0

    @property
    def hit_cost(self) -> float:
        """Seconds to read one block back from tmemfs."""
        return self.hit_seconds / self.hits if self.hits else 0.0

    @property
    def saved_seconds(self) -> float:
        """What the hits would have cost as misses, less what they cost."""
        return self.hits * max(self.miss_cost - self.hit_cost, 0.0)

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {
            "hit_rate": round(self.hit_rate, 4),
            "miss_cost": self.miss_cost,
            "hit_cost": self.hit_cost,
            "saved_seconds": self.saved_seconds,
        }


class CompressedFile:
    """Random reads of a compressed file, by decompressing (seek restarts when backwards)."""

    def __init__(self, path: Path) -> None:
        opener = OPENERS.get(path.suffix)
        if opener is None:
            raise ValueError(f"{path}: not .gz, .xz, .lzma or .bz2")
        self.path = path
        self.stream: BinaryIO = opener(path, "rb")  # type: ignore[operator]
        self.size = self._uncompressed_size()

    def _uncompressed_size(self) -> int:
        if self.path.suffix == ".gz":
            # ISIZE, the size mod 2**32 at the end of a gzip member: right for one
            # member under 4 GiB, which is what gzip(1) writes.
            with open(self.path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                size = struct.unpack("<I", f.read(4))[0]
            if size and self.path.stat().st_size < (1 << 32):
                return size
        # Otherwise: decompress once, to the end (setup, not counted as a miss).
        return self.stream.seek(0, os.SEEK_END)

    def read(self, offset: int, length: int) -> bytes:
        self.stream.seek(offset)
        return self.stream.read(length)

    def close(self) -> None:
        self.stream.close()


class BlockCache:
    """Blocks of one file in a cleancache pool: get (a hit or None) and put."""

    def __init__(self, mount: Path, pool: str, source: Path) -> None:
        st = source.stat()
        key = f"ino{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"  # as cleancache keys by inode
        self.directory = mount / "cleancache" / pool / key
        self.directory.mkdir(parents=True, exist_ok=True)  # init_fs, then the object
        self.put_blocks: set[int] = set()

    def get(self, block: int) -> bytes | None:
        try:
            with open(self.directory / str(block), "rb", buffering=0) as f:
                return f.readall()
        except FileNotFoundError:
            return None

    def put(self, block: int, data: bytes) -> bool:
        """Store a block; False when tmemfs refused it (ENOSPC: the budget is full)."""
        try:
            with open(self.directory / str(block), "wb", buffering=0) as f:
                f.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                return False
            raise
        self.put_blocks.add(block)
        return True

    def drop(self) -> None:
        """invalidate_inode: rmdir of the object flushes all its pages."""
        with contextlib.suppress(FileNotFoundError):
            self.directory.rmdir()


def page_size(mount: Path) -> int:
    try:
        text = (mount / "stats").read_text()
    except OSError as exc:
        raise SystemExit(f"block_cache: {mount} is not a mounted tmemfs ({exc.strerror})") from None
    size = statsfmt.counters(text).get("page_size")
    if size is not None:
        return size
    raise SystemExit(f"block_cache: {mount}/stats has no page_size: is it a tmemfs?")


def access_pattern(blocks: int, reads: int, hot: float, seed: int) -> Iterator[int]:
    """80% of reads go to a random `hot` fraction of the blocks, the rest anywhere."""
    rng = random.Random(seed)
    order = list(range(blocks))
    rng.shuffle(order)
    hot_blocks = order[: max(1, int(blocks * hot))]
    for _ in range(reads):
        yield rng.choice(hot_blocks) if rng.random() < 0.8 else rng.randrange(blocks)


def run(args: argparse.Namespace, source: Path) -> Result:
    page = page_size(args.mount)
    data = CompressedFile(source)
    cache = BlockCache(args.mount, args.pool, source)
    result = Result(
        file=str(source),
        cache=str(cache.directory.relative_to(args.mount)),
        size=data.size,
        block_size=page,
        blocks=-(-data.size // page),
    )
    if result.blocks == 0:
        raise SystemExit(f"block_cache: {source} is empty")
    # --verify compares hits with the whole file, decompressed once up front.
    reference = data.read(0, data.size) if args.verify else b""
    try:
        for block in access_pattern(result.blocks, args.reads, args.hot, args.seed):
            length = min(page, data.size - block * page)
            start = time.perf_counter()
            cached = cache.get(block)
            if cached is not None:
                result.hit_seconds += time.perf_counter() - start
                result.hits += 1
                block_data = cached[:length]  # a page is zero-padded past the file's end
                if args.verify:
                    if block_data != reference[block * page : block * page + length]:
                        raise SystemExit(f"block_cache: block {block} from tmemfs is wrong")
                    result.verified += 1
            else:
                if block in cache.put_blocks:
                    result.evicted += 1  # put by this run, gone now: evicted
                    cache.put_blocks.discard(block)
                block_data = data.read(block * page, length)
                if not cache.put(block, block_data):
                    result.refused += 1
                result.miss_seconds += time.perf_counter() - start
                result.misses += 1
            result.reads += 1
        if not result.misses:
            result.miss_estimate = estimate_miss_cost(data, result, args.seed)
    finally:
        data.close()
        if args.drop:
            cache.drop()
    return result


def estimate_miss_cost(data: CompressedFile, result: Result, seed: int) -> float:
    """What a miss would have cost: the time to decompress a few random blocks."""
    rng = random.Random(seed)
    samples = 8
    start = time.perf_counter()
    for _ in range(samples):
        data.read(rng.randrange(result.blocks) * result.block_size, result.block_size)
    return (time.perf_counter() - start) / samples


def make_sample(directory: Path, size: int) -> Path:
    """A gzip file of `size` bytes of log-like text (compresses about 4:1)."""
    rng = random.Random(4711)
    words = (
        "GET",
        "PUT",
        "/index.html",
        "/api/v1/pages",
        "200",
        "404",
        "cache",
        "miss",
        "hit",
        "tmemfs",
        "frontswap",
        "cleancache",
        "store",
        "load",
        "invalidate",
    )
    path = directory / "sample.log.gz"
    written = 0
    with gzip.open(path, "wb", compresslevel=6) as f:
        while written < size:
            line = (
                f"2025-11-25T{rng.randrange(24):02d}:{rng.randrange(60):02d}:"
                f"{rng.randrange(60):02d} host{rng.randrange(100)} "
                + " ".join(rng.choice(words) for _ in range(8))
                + f" {rng.getrandbits(32):08x}\n"
            ).encode()[: size - written]
            f.write(line)
            written += len(line)
    return path


def report(result: Result) -> str:
    return "\n".join(
        [
            f"file        {result.file}: {result.size} bytes, {result.blocks} blocks of "
            f"{result.block_size}",
            f"cache       cleancache pool and object {result.cache}",
            f"reads       {result.reads}",
            f"hits        {result.hits} ({result.hit_rate:.1%})",
            f"misses      {result.misses} (evicted since put: {result.evicted})",
            f"refused     {result.refused} puts (ENOSPC: the budget was full)",
            f"miss cost   {result.miss_cost * 1e3:.3f} ms per block "
            + ("(decompress and put)" if result.misses else "(estimated: no misses this run)"),
            f"hit cost    {result.hit_cost * 1e3:.3f} ms per block (read from tmemfs)",
            f"time saved  {result.saved_seconds:.3f} s (hits x (miss cost - hit cost))",
            *(
                [f"verified    {result.verified} hits against the file: all equal"]
                if result.verified
                else []
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="block_cache.py",
        description="Cache decompressed blocks of a compressed file in a tmemfs cleancache pool.",
    )
    parser.add_argument("mount", type=Path, help="a mounted tmemfs")
    parser.add_argument(
        "file",
        type=Path,
        nargs="?",
        help="a .gz, .xz or .bz2 file (default: a sample made for the run)",
    )
    parser.add_argument("--pool", default="blockcache", help="cleancache pool (default blockcache)")
    parser.add_argument("--reads", type=int, default=4000, help="random block reads (default 4000)")
    parser.add_argument(
        "--hot",
        type=float,
        default=0.2,
        help="fraction of blocks that get 80%% of the reads (default 0.2)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the access pattern")
    parser.add_argument(
        "--sample-size",
        default="8M",
        help="uncompressed size of the sample, without FILE (default 8M)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check every hit against the file (decompressed once, in memory)",
    )
    parser.add_argument(
        "--drop", action="store_true", help="flush the file's object from the pool at the end"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.reads < 1 or not 0 < args.hot <= 1:
        parser.error("--reads must be positive and --hot in (0, 1]")

    workdir = None
    try:
        if args.file is None:
            workdir = Path(tempfile.mkdtemp(prefix="block_cache."))
            source = make_sample(workdir, parse_size(args.sample_size))
            args.drop = True  # a new sample is a new object: nothing to keep it for
        else:
            source = args.file
        result = run(args, source)
    except (OSError, ValueError) as exc:
        print(f"block_cache: {exc}", file=sys.stderr)
        return 1
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result.as_dict(), indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
