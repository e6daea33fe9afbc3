"""Helpers shared by the mount tests: page contents, file-level tmem operations, tools.

Everything here goes through the mount like a user would: open/write/close is a store,
open/read is a load, unlink is an invalidate. Nothing imports tmemfs.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

PAGE = 4096
ZERO_PAGE = bytes(PAGE)

# tmemfs(5), STATISTICS: every counter that `stats` and `.stats` must show. Written out
# here rather than taken from tmemfs.engine.stats, so the mount is checked against the
# documented list, not against itself.
SPEC_COUNTERS = (
    "stored_pages",
    "orig_data_size",
    "compr_data_size",
    "pool_total_size",
    "same_filled_pages",
    "dedup_pages",
    "duplicate_entry",
    "reject_compress_poor",
    "reject_alloc_fail",
    "pool_limit_hit",
    "written_back_pages",
    "evicted_pages",
    "loads",
    "load_misses",
    "stores",
    "invalidates",
)


def random_page(seed: int | None = None) -> bytes:
    """An incompressible page; the same seed gives the same page (for dedup)."""
    if seed is None:
        return os.urandom(PAGE)
    return random.Random(seed).randbytes(PAGE)


def text_page(seed: int) -> bytes:
    """A page that compresses well but is unique to its seed."""
    lines = b"".join(
        f"{seed:08d}:{i:05d} the quick brown fox jumps over the lazy dog\n".encode()
        for i in range(PAGE // 40)
    )
    return lines[:PAGE]


def same_filled_page(word: int) -> bytes:
    """A page of one repeated 8-byte word."""
    return word.to_bytes(8, "little") * (PAGE // 8)


def padded(data: bytes) -> bytes:
    """What a page holds after `data` was written at offset 0 of a new or truncated page."""
    assert len(data) <= PAGE
    return data + bytes(PAGE - len(data))


def patched(base: bytes, offset: int, data: bytes) -> bytes:
    """`base` with `data` written over it at `offset` (a read-modify-write)."""
    return base[:offset] + data + base[offset + len(data) :]


def try_store(
    path: Path, data: bytes, *, offset: int = 0, truncate: bool = True, create: bool = True
) -> int:
    """Write `data` at `offset` and close; 0, or the errno of write() or close().

    A refused store may fail at write() or at close() (SPEC section 2), so both count.
    """
    flags = os.O_WRONLY | (os.O_CREAT if create else 0) | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags, 0o644)
    err = 0
    try:
        written = os.pwrite(fd, data, offset)
        assert written == len(data), f"short write to {path}: {written} of {len(data)}"
    except OSError as exc:
        err = exc.errno or -1
    try:
        os.close(fd)
    except OSError as exc:
        err = err or exc.errno or -1
    return err


def store(path: Path, data: bytes, *, offset: int = 0, truncate: bool = True) -> None:
    """Write a page (or part of one) and close it; raise OSError if refused."""
    err = try_store(path, data, offset=offset, truncate=truncate)
    if err:
        raise OSError(err, os.strerror(err), str(path))


def pread(path: Path, off: int, size: int) -> bytes:
    """`size` bytes at `off` of a file (an image), read with pread(2)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, off)
    finally:
        os.close(fd)


def load(path: Path) -> bytes:
    """Read a page file to its end, unbuffered."""
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def errno_of(action: Callable[[], object]) -> int:
    """The errno that `action` fails with, or 0 when it succeeds."""
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; stdout and stderr captured as bytes."""
    return subprocess.run([str(a) for a in args], capture_output=True, check=check, timeout=60)


def sh(command: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a shell pipeline, as a user would type it."""
    return subprocess.run(["bash", "-c", command], capture_output=True, check=check, timeout=60)


def page_names(directory: Path) -> set[str]:
    """What `ls` (without -a) shows: the directory's names that are not dot-files."""
    return {name for name in os.listdir(directory) if not name.startswith(".")}
