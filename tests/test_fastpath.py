"""pyfuse3's synchronous fast path (patches/pyfuse3-3.5.0-fastpath.patch), through a mount.

With the patched pyfuse3, the reads and whole-page writes of an image or a page file
that the engine does without waiting are answered by `read_now`/`write_now`, with no
coroutine; `.daemon` counts them as fastpath_requests. The same patch's noflush spares
the FLUSH of every close but a page-file writer's. Whatever the fast path declines (a partial-page
write, a write past the image's end, any request with a writeback tier below) takes
the async path as before, and every request reads back the same bytes either way.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from conftest import Mount
from tmemfs_testlib import PAGE, pread, random_page, text_page

from tmemfs.engine import stats as statsfmt
from tmemfs.fs import fast_path_supported, noflush_supported

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MountFactory = Callable[..., Mount]
MiB = 1 << 20


def image(mount: Mount, size: int = 4 * MiB) -> Path:
    path = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    return path


def answered_now(mount: Mount) -> int:
    return statsfmt.counters((mount.path / ".daemon").read_text())["fastpath_requests"]


def fast_path_counters(mount: Mount) -> dict[str, int]:
    counters = statsfmt.counters((mount.path / ".daemon").read_text())
    return {name: value for name, value in counters.items() if name.startswith("fastpath_")}


# A --debug daemon logs each request's handler: `lookup_now(...)` on the fast path,
# `lookup(...)` when the async handler answers it.
_ASYNC_METADATA = re.compile(r"\b(lookup|getattr|open|create)\(")


def pwrite(path: Path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def test_daemon_says_the_fast_path_is_on(tmem: Mount) -> None:
    # examples/setup.sh builds pyfuse3 with the patch, and fails if it did not take:
    # a suite run without it is a broken setup, not a machine that lacks something.
    assert fast_path_supported(), "pyfuse3 lacks the fastpath patch: run examples/setup.sh"
    info = statsfmt.parse((tmem.path / ".daemon").read_text())
    assert info["fastpath"] == "on"
    assert answered_now(tmem) == 0


def test_image_requests_are_answered_now_and_partial_writes_are_not(tmem: Mount) -> None:
    img = image(tmem)
    data = b"".join(text_page(i) if i % 2 else random_page(i) for i in range(32))
    pwrite(img, 0, data)  # 128 KiB, whole pages: one request
    assert answered_now(tmem) == 1
    assert pread(img, 0, len(data)) == data
    assert answered_now(tmem) == 2
    stats = tmem.stats("frontswap/0")
    assert (stats["stores"], stats["loads"]) == (32, 32)

    # A partial-page write is a read-modify-write: the async path does it.
    pwrite(img, 5 * PAGE + 100, b"x" * 300)
    assert answered_now(tmem) == 2
    expected = bytearray(data)
    expected[5 * PAGE + 100 : 5 * PAGE + 400] = b"x" * 300
    # Reads need not be aligned: they are still answered now.
    assert pread(img, 5 * PAGE + 50, 400) == bytes(expected[5 * PAGE + 50 : 5 * PAGE + 450])
    assert answered_now(tmem) == 3
    assert pread(img, 0, len(data)) == bytes(expected)

    # A whole-page write past the end grows the image, answered now too.
    pwrite(img, 4 * MiB, random_page(99))
    assert answered_now(tmem) == 5
    assert img.stat().st_size == 4 * MiB + PAGE
    assert pread(img, 4 * MiB, PAGE) == random_page(99)
    # Holes read as zeros, answered now.
    assert pread(img, 2 * MiB, 2 * PAGE) == bytes(2 * PAGE)
    assert tmem.stats()["stores"] == 32 + 1 + 1


def test_dd_over_the_image_is_answered_now(tmem: Mount) -> None:
    """dd opens with O_TRUNC, so each of its writes grows the image from nothing."""
    img = image(tmem)
    pwrite(img, 0, random_page(1))
    source = tmem.path.parent / "dd-source"
    data = b"".join(text_page(i) if i % 3 else random_page(i) for i in range(3 * 256))
    source.write_bytes(data)
    subprocess.run(
        ["dd", f"if={source}", f"of={img}", "bs=1M", "oflag=direct", "status=none"],
        check=True,
        timeout=60,
    )
    assert img.stat().st_size == len(data)
    # Three 1 MiB writes; the truncate and the page written before are gone.
    assert answered_now(tmem) == 1 + 3
    assert pread(img, 0, len(data)) == data
    assert tmem.stats("frontswap/0")["stored_pages"] == 3 * 256


def test_pages_in_the_writeback_tier_take_the_async_path(
    tmp_path: Path, mount_factory: MountFactory
) -> None:
    """With a tier below, pages may be anywhere: nothing is answered now, nothing is lost."""
    mount = mount_factory("--max-pool", "2M", "--writeback", str(tmp_path / "tier"))
    img = image(mount, 16 * MiB)
    data = os.urandom(8 * MiB)
    for off in range(0, len(data), MiB):
        pwrite(img, off, data[off : off + MiB])
    assert mount.stats()["written_back_pages"] > 0
    assert pread(img, 0, len(data)) == data
    assert answered_now(mount) == 0


def flushes(mount: Mount) -> int:
    """The FLUSH requests a --debug daemon has logged (each first meets flush_now)."""
    return mount.log_text().count("flush_now(")


def test_page_files_are_answered_now_and_only_writers_flush(mount_factory: MountFactory) -> None:
    assert noflush_supported(), "pyfuse3 lacks the fastpath patch: run examples/setup.sh"
    mount = mount_factory("--debug")
    pool = mount.path / "frontswap" / "0"
    pool.mkdir()
    with open(pool / "1", "wb", buffering=0) as f:
        f.write(random_page(1))
    # The writer's close is a FLUSH: a store at close says ENOSPC there.
    assert flushes(mount) == 1
    assert answered_now(mount) == 1
    with open(pool / "1", "rb", buffering=0) as f:
        assert f.read() == random_page(1)
    # The page and the empty read that ends it, answered now; the close sends no FLUSH.
    assert answered_now(mount) == 3
    assert flushes(mount) == 1
    # A partial write is assembled and stored at close: on the fast path too when it fits.
    with open(pool / "1", "r+b", buffering=0) as f:
        f.write(b"x" * 100)
    assert flushes(mount) == 2
    assert (pool / "1").read_bytes() == b"x" * 100 + random_page(1)[100:]
    assert mount.stats("frontswap/0")["stores"] == 2


def test_page_file_lookups_getattrs_opens_and_creates_are_answered_now(
    mount_factory: MountFactory,
) -> None:
    """A page file's store and load send no request to an async handler at all."""
    assert hasattr(pyfuse3.Operations, "create_now"), "an older fastpath patch: run setup.sh"
    mount = mount_factory("--debug")
    pool = mount.path / "frontswap" / "0"
    pool.mkdir()
    before = fast_path_counters(mount)
    pages = 20
    for i in range(pages):
        with open(pool / str(i), "wb", buffering=0) as f:
            f.write(random_page(i))
    for i in range(pages):
        with open(pool / str(i), "rb", buffering=0) as f:
            assert f.read() == random_page(i)
    assert (pool / "3").stat().st_size == PAGE
    after = fast_path_counters(mount)
    log = mount.log_text()
    assert _ASYNC_METADATA.findall(log) == []
    # Each store's LOOKUP (ENOENT) went the fast way too: an errno is a reply.
    assert log.count("lookup_now(") >= pages
    assert after["fastpath_creates"] - before["fastpath_creates"] == pages
    # Every open of a page, and the open of .daemon that read `before`.
    assert after["fastpath_opens"] - before["fastpath_opens"] == pages + 1
    assert after["fastpath_getattrs"] - before["fastpath_getattrs"] >= pages
    assert after["fastpath_requests"] - before["fastpath_requests"] == pages + 2 * pages

    # An image is made by waiting on the engine: its CREATE takes the async handler.
    image(mount)
    assert _ASYNC_METADATA.findall(mount.log_text()) == ["create"]
