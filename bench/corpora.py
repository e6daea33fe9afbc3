"""The data the bench stores, built by the bench itself, the same bytes every run.

- files: whole pages of the files under /usr/lib, /usr/share and /usr/bin (a third
  of the corpus from each, sorted walk), as a page cache or a file-backed cache sees.
- anon: resident pages of the writable private mappings of a Python process that
  built dicts, lists, strings and numbers (bench/anon_child.py), as swap sees.
- random: incompressible pages (seeded), zram's "huge" pages.
- zero: all-zero pages, the same-filled case.
"""

from __future__ import annotations

import itertools
import mmap
import os
import platform
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lz4.block

from bench.pagefiles import PAGE, tree_pages

FILE_ROOTS = ("/usr/lib", "/usr/share", "/usr/bin")
CHILD = Path(__file__).with_name("anon_child.py")
PRESENT = 1 << 63  # /proc/PID/pagemap: the page is in RAM
SWAPPED = 1 << 62


@dataclass
class Corpus:
    """Pages in a page-aligned buffer, ready for O_DIRECT writes."""

    name: str
    description: str
    data: mmap.mmap

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def pages(self) -> int:
        return len(self.data) // PAGE

    def page(self, i: int) -> bytes:
        return self.data[i * PAGE : (i + 1) * PAGE]

    def page_list(self, count: int) -> list[bytes]:
        return [self.page(i % self.pages) for i in range(count)]


@dataclass
class Profile:
    """What a corpus is like to a compressing store."""

    pages: int
    lz4_ratio: float  # page by page, as zram and tmemfs compress
    same_filled: int  # one repeated 8-byte word (zeros included)
    duplicates: int  # pages identical to an earlier page


def profile(corpus: Corpus) -> Profile:
    compressed = 0
    same = 0
    seen: set[bytes] = set()
    for i in range(corpus.pages):
        page = corpus.page(i)
        compressed += min(len(lz4.block.compress(page, store_size=False)), PAGE)
        same += page == page[:8] * (PAGE // 8)
        seen.add(page)
    return Profile(corpus.pages, corpus.size / max(compressed, 1), same, corpus.pages - len(seen))


def aligned_copy(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, max(len(data), PAGE))
    buffer[: len(data)] = data
    return buffer


def files(size: int) -> Corpus:
    total = size // PAGE
    share = total // len(FILE_ROOTS)
    pages: list[bytes] = []
    for k, root in enumerate(FILE_ROOTS):
        wanted = share if k < len(FILE_ROOTS) - 1 else total - len(pages)  # the rest: last
        pages.extend(itertools.islice(tree_pages(root), wanted))
    return Corpus(
        "files",
        f"about {share} whole pages (a third) of the files under each of "
        f"{', '.join(FILE_ROOTS)}, sorted walk, symlinks skipped",
        aligned_copy(b"".join(pages)),
    )


def anon(size: int) -> Corpus:
    """Resident pages of a Python process's writable private mappings, in address order."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    # setarch -R turns ASLR off, so pointers inside the data are the same every run.
    proc = subprocess.Popen(
        ["setarch", platform.machine(), "-R", sys.executable, str(CHILD), str(size + (16 << 20))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = proc.stdout.readline().decode()
        if not ready.startswith("ready"):
            raise RuntimeError(f"{CHILD.name} did not get ready: {ready!r}")
        data = resident_private_pages(proc.pid, size)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return Corpus(
        "anon",
        "resident pages of the writable private mappings (rw-p in "
        "/proc/PID/maps) of a Python process that built a table of dict records "
        "(strings, ints, floats, lists), a list of floats and a dict of ints "
        "(bench/anon_child.py), read from /proc/PID/mem in address order",
        aligned_copy(data),
    )


def resident_private_pages(pid: int, limit: int) -> bytes:
    """Up to `limit` bytes of pages in RAM (or swap) in the process's rw-p mappings."""
    chunks: list[bytes] = []
    taken = 0
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(f"/proc/{pid}/mem", "rb") as mem:
        for start, end in private_writable(pid):
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read((end - start) // PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if taken >= limit:
                    return b"".join(chunks)
                if entry & (PRESENT | SWAPPED):
                    mem.seek(start + i * PAGE)
                    chunks.append(mem.read(PAGE))
                    taken += PAGE
    return b"".join(chunks)


def private_writable(pid: int) -> Iterator[tuple[int, int]]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if fields[1] == "rw-p":
            start, end = (int(x, 16) for x in fields[0].split("-"))
            yield start, end


def random_pages(size: int) -> Corpus:
    return Corpus(
        "random",
        "pseudo-random bytes (random.Random(1).randbytes), incompressible",
        aligned_copy(random.Random(1).randbytes(size)),
    )


def zero_pages(size: int) -> Corpus:
    return Corpus("zero", "all-zero pages (same-filled)", mmap.mmap(-1, size))


def stamp_unique(base: Corpus, first: int, out: mmap.mmap) -> None:
    """Fill `out` with base pages from page `first` on, each stamped with its number.

    The 8-byte stamp makes every page distinct, so a million pages cut from a small
    corpus measure per-page cost, not deduplication.
    """
    for i in range(len(out) // PAGE):
        n = first + i
        src = (n % base.pages) * PAGE
        out[i * PAGE : (i + 1) * PAGE] = base.data[src : src + PAGE]
        struct.pack_into("<Q", out, i * PAGE, n)
