"""O_DIRECT writes in 1 MiB requests at any offset, as a loop device or swap sends them.

bench.redis.direct_write and direct_read move a whole buffer from offset 0; the
memory and growth comparisons need to write a store in steps and look in between.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bench.redis import CHUNK


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
            with view[pos:min(pos + CHUNK, end)] as piece:
                written = os.pwrite(fd, piece, offset + pos - start)
                if written != len(piece):
                    raise OSError(f"short direct write at {offset + pos - start}: {written}")
        return time.perf_counter() - began


def read_all(path: Path | str, size: int) -> mmap.mmap:
    """The first `size` bytes of a file or device, read with O_DIRECT."""
    into = mmap.mmap(-1, size)
    with memoryview(into) as view, opened(path, os.O_RDONLY) as fd:
        for pos in range(0, size, CHUNK):
            with view[pos:min(pos + CHUNK, size)] as piece:
                if os.preadv(fd, [piece], pos) != len(piece):
                    raise OSError(f"short direct read at {pos}")
    return into
