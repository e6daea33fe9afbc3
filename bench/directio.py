"""O_DIRECT reads and writes in 1 MiB requests, as a loop device or swap sends them.

The one place the bench moves bytes to and from an image or a device with direct
I/O: whole buffers from offset 0 (`direct_write`, `direct_read`, `read_all`), or a
store written in steps with a look in between (`opened` and `write_at`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20  # one direct-I/O request: 256 pages


def aligned(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer, as O_DIRECT wants."""
    return mmap.mmap(-1, size)


@contextlib.contextmanager
def opened(path: Path | str, flags: int) -> Iterator[int]:
    fd = os.open(path, flags | os.O_DIRECT)
    try:
        yield fd
    finally:
        os.close(fd)


def write_at(fd: int, buffer: mmap.mmap, start: int, end: int, offset: int) -> float:
    """Write buffer[start:end] at file offset `offset` in 1 MiB requests; seconds taken."""
    # Views are released even when interrupted: an mmap with live views cannot close.
    with memoryview(buffer) as view:
        began = time.perf_counter()
        for pos in range(start, end, CHUNK):
            with view[pos : min(pos + CHUNK, end)] as piece:
                written = os.pwrite(fd, piece, offset + pos - start)
                if written != len(piece):
                    raise OSError(f"short direct write at {offset + pos - start}: {written}")
        return time.perf_counter() - began


def read_at(fd: int, into: mmap.mmap, start: int, end: int, offset: int) -> float:
    """Fill into[start:end] from file offset `offset` in 1 MiB requests; seconds taken."""
    with memoryview(into) as view:
        began = time.perf_counter()
        for pos in range(start, end, CHUNK):
            with view[pos : min(pos + CHUNK, end)] as piece:
                got = os.preadv(fd, [piece], offset + pos - start)
                if got != len(piece):
                    raise OSError(f"short direct read at {offset + pos - start}: {got}")
        return time.perf_counter() - began


def direct_write(path: Path | str, buffer: mmap.mmap, size: int) -> float:
    """Write the first `size` bytes of `buffer` from offset 0; seconds taken."""
    with opened(path, os.O_WRONLY) as fd:
        return write_at(fd, buffer, 0, size, 0)


def direct_read(path: Path | str, into: mmap.mmap, size: int) -> float:
    """Read the first `size` bytes into `into`; seconds taken."""
    with opened(path, os.O_RDONLY) as fd:
        return read_at(fd, into, 0, size, 0)


def read_all(path: Path | str, size: int) -> mmap.mmap:
    """The first `size` bytes of a file or device, read with O_DIRECT."""
    into = aligned(size)
    direct_read(path, into, size)
    return into


def random_reads(path: Path | str, block: int, size: int, seconds: float) -> float:
    """Random O_DIRECT reads of `block` bytes, one in flight, for `seconds`: reads/s."""
    into = aligned(block)
    rng = random.Random(1)
    blocks = size // block
    try:
        with opened(path, os.O_RDONLY) as fd:
            done = 0
            start = time.perf_counter()
            deadline = start + seconds
            while True:
                os.preadv(fd, [into], rng.randrange(blocks) * block)
                done += 1
                if done % 64 == 0 and time.perf_counter() > deadline:
                    return done / (time.perf_counter() - start)
    finally:
        into.close()
