"""Discard and fallocate (SPEC section 4): a punched range is frontswap's invalidate.

The loop device turns a discard into fallocate(PUNCH_HOLE|KEEP_SIZE) on the image;
tmemfs must then drop exactly the pages wholly inside the range, zero the parts of
the edge pages inside it, and leave everything else as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import conftest
import pytest
from conftest import Mount, mounted
from tmemfs_testlib import PAGE, ZERO_PAGE, pread, random_page, text_page

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MiB = 1 << 20
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
PUNCH = PUNCH_HOLE | KEEP_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(path: Path, mode: int, offset: int, length: int) -> int:
    """fallocate(2) on a file opened for writing: 0, or the errno it failed with."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, mode, offset, length) == 0:
            return 0
        return ctypes.get_errno()
    finally:
        os.close(fd)


def pages(pool: Path) -> set[int]:
    return {int(n) for n in os.listdir(pool) if not n.startswith(".")}


def filled_image(tmem: Mount, npages: int, size: int = 16 * MiB) -> tuple[Path, bytes]:
    """Image 0 of `size` bytes whose first `npages` pages hold distinct text."""
    img = tmem.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", str(size), str(img)], check=True)
    data = b"".join(text_page(i) for i in range(npages))
    fd = os.open(img, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    return img, data


@contextlib.contextmanager
def loop_device(img: Path) -> Iterator[str]:
    if shutil.which("losetup") is None or not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices on this machine")
    if shutil.which("blkdiscard") is None:
        pytest.skip("blkdiscard (util-linux) is not installed")
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "-f", "--show", str(img)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # The machine can make loop devices (checked above): a losetup refused on a tmemfs
    # image is a tmemfs failure, not a reason to skip.
    assert dev.returncode == 0, f"losetup on {img} failed: {dev.stderr.strip()}"
    device = dev.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], timeout=30, check=False)


def punched(data: bytes, off: int, end: int) -> bytes:
    """What `data` reads as once [off, end) is punched: zeros there, the rest as it was."""
    end = min(end, len(data))
    return data[:off] + bytes(max(end - off, 0)) + data[end:]


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (8 * PAGE, 16 * PAGE),  # page-aligned: 16 whole pages
        (3 * PAGE + 1536, 10 * PAGE + 1024),  # neither: two partial edges, 9 whole pages
        (5 * PAGE + 512, 2048),  # inside one page: no whole page at all
        (20 * PAGE, 3 * PAGE + 512),  # aligned start, partial end
    ],
)
def test_blkdiscard_removes_exactly_the_range(tmem: Mount, offset: int, length: int) -> None:
    npages = 64
    img, data = filled_image(tmem, npages)
    pool = tmem.path / "frontswap" / "0"
    before = tmem.stats("frontswap/0")
    with loop_device(img) as device:
        queue = Path("/sys/block") / Path(device).name / "queue"
        assert int((queue / "discard_max_bytes").read_text()) > 0, "discard is off"
        assert int((queue / "discard_granularity").read_text()) == PAGE
        subprocess.run(
            ["blkdiscard", "-o", str(offset), "-l", str(length), device],
            check=True,
            timeout=60,
            capture_output=True,
        )
    end = offset + length
    whole = set(range(-(-offset // PAGE), end // PAGE))
    assert pages(pool) == set(range(npages)) - whole
    assert pread(img, 0, len(data)) == punched(data, offset, end)
    edges = {offset // PAGE, (end - 1) // PAGE} - whole
    for index in edges:
        start = index * PAGE
        lo, hi = max(offset, start) - start, min(end, start + PAGE) - start
        page = (pool / str(index)).read_bytes()
        assert page[:lo] == text_page(index)[:lo]
        assert page[lo:hi] == bytes(hi - lo)
        assert page[hi:] == text_page(index)[hi:]
    after = tmem.stats("frontswap/0")
    assert after["stored_pages"] == before["stored_pages"] - len(whole)
    # Each whole page is one invalidate; each edge page is stored anew, which counts
    # as a duplicate entry (and the invalidate of its old copy), as in zswap.
    assert after["duplicate_entry"] == before["duplicate_entry"] + len(edges)
    assert after["invalidates"] == before["invalidates"] + len(whole) + len(edges)
    assert tmem.stats()["stored_pages"] == npages - len(whole)


def test_punch_hole_over_a_large_sparse_image(tmem: Mount) -> None:
    """A discard of a whole 1 GiB image (as swapon --discard does) drops every page."""
    img, _ = filled_image(tmem, 8, size=1 << 30)
    (tmem.path / "frontswap" / "0" / "200000").write_bytes(random_page(1))
    assert fallocate(img, PUNCH, 0, 1 << 30) == 0
    assert pages(tmem.path / "frontswap" / "0") == set()
    stats = tmem.stats("frontswap/0")
    assert (stats["stored_pages"], stats["invalidates"]) == (0, 9)
    assert img.stat().st_size == 1 << 30
    assert tmem.stats()["pool_total_size"] < 64 * 1024


def test_fallocate_modes_on_the_image(tmem: Mount) -> None:
    img, data = filled_image(tmem, 16, size=16 * PAGE)
    pool = tmem.path / "frontswap" / "0"
    stats = lambda: tmem.stats("frontswap/0")  # noqa: E731

    # Punching past the end changes nothing past it, nor the size.
    assert fallocate(img, PUNCH, 14 * PAGE, 10 * PAGE) == 0
    assert pages(pool) == set(range(14))
    assert img.stat().st_size == 16 * PAGE
    assert pread(img, 13 * PAGE, 3 * PAGE) == text_page(13) + bytes(2 * PAGE)

    # ZERO_RANGE stores zero pages: the pages exist, read as zeros, cost nothing.
    same = stats()["same_filled_pages"]
    assert fallocate(img, ZERO_RANGE, 2 * PAGE + 100, 3 * PAGE) == 0
    assert pages(pool) == set(range(14))
    expect = punched(data[: 14 * PAGE], 2 * PAGE + 100, 5 * PAGE + 100) + bytes(2 * PAGE)
    assert pread(img, 0, 16 * PAGE) == expect
    assert (pool / "3").read_bytes() == ZERO_PAGE
    assert stats()["same_filled_pages"] == same + 2

    # ZERO_RANGE|KEEP_SIZE past the end keeps the size; without KEEP_SIZE it grows.
    assert fallocate(img, ZERO_RANGE | KEEP_SIZE, 15 * PAGE, 4 * PAGE) == 0
    assert img.stat().st_size == 16 * PAGE
    assert fallocate(img, ZERO_RANGE, 15 * PAGE, 4 * PAGE) == 0
    assert img.stat().st_size == 19 * PAGE
    assert pread(img, 15 * PAGE, 4 * PAGE) == bytes(4 * PAGE)

    # Mode 0 inside the size stores nothing; past it, it grows the image like truncate.
    stored = stats()["stored_pages"]
    assert fallocate(img, 0, 0, 4 * PAGE) == 0
    assert fallocate(img, KEEP_SIZE, 0, 64 * PAGE) == 0
    assert img.stat().st_size == 19 * PAGE
    assert fallocate(img, 0, 30 * PAGE, PAGE) == 0
    assert img.stat().st_size == 31 * PAGE
    assert stats()["stored_pages"] == stored
    assert pread(img, 0, 4 * PAGE) == expect[: 4 * PAGE]

    # Anything else is EOPNOTSUPP (PUNCH_HOLE without KEEP_SIZE the kernel refuses
    # itself), and nothing changes.
    for mode in (PUNCH_HOLE, COLLAPSE_RANGE, INSERT_RANGE, ZERO_RANGE | PUNCH_HOLE):
        assert fallocate(img, mode, 0, PAGE) in (errno.EOPNOTSUPP, errno.EINVAL), mode
    for mode in (COLLAPSE_RANGE, INSERT_RANGE):
        assert fallocate(img, mode, 0, PAGE) == errno.EOPNOTSUPP
    assert stats()["stored_pages"] == stored
    assert pread(img, 0, 4 * PAGE) == expect[: 4 * PAGE]

    # util-linux's fallocate(1) says the same.
    result = subprocess.run(
        ["fallocate", "--punch-hole", "-o", "0", "-l", str(PAGE), str(img)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert 0 not in pages(pool)


def test_fallocate_on_page_files(tmem: Mount) -> None:
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir()
    for i in range(4):
        (pool / str(i)).write_bytes(random_page(i))
    before = tmem.stats("frontswap/0")

    # Punching the whole page invalidates it: the file is gone.
    assert fallocate(pool / "0", PUNCH, 0, PAGE) == 0
    assert pages(pool) == {1, 2, 3}
    after = tmem.stats("frontswap/0")
    assert after["invalidates"] == before["invalidates"] + 1
    assert after["stored_pages"] == before["stored_pages"] - 1

    # Punching part of it zeroes that part, as a hole in a file reads.
    assert fallocate(pool / "1", PUNCH, 1000, 2000) == 0
    assert (pool / "1").read_bytes() == punched(random_page(1), 1000, 3000)

    # ZERO_RANGE stores zeros; mode 0 stores nothing.
    assert fallocate(pool / "2", ZERO_RANGE, 0, PAGE) == 0
    assert (pool / "2").read_bytes() == ZERO_PAGE
    assert fallocate(pool / "3", 0, 0, PAGE) == 0
    assert (pool / "3").read_bytes() == random_page(3)

    # A range past the page is EFBIG, in every mode, and changes nothing.
    for mode in (PUNCH, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE, 0):
        assert fallocate(pool / "3", mode, PAGE - 1, 2) == errno.EFBIG, mode
    assert fallocate(pool / "3", COLLAPSE_RANGE, 0, PAGE) == errno.EOPNOTSUPP
    assert (pool / "3").read_bytes() == random_page(3)

    # A cleancache page works the same way.
    obj = tmem.path / "cleancache" / "fs" / "7"
    obj.mkdir(parents=True)
    (obj / "0").write_bytes(random_page(9))
    assert fallocate(obj / "0", PUNCH, 0, PAGE) == 0
    assert not (obj / "0").exists()


def test_partial_write_then_punch_on_one_open_file(tmem: Mount) -> None:
    """What an open file has assembled is stored before a punch applies to it."""
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir()
    page = pool / "5"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT)
    try:
        os.pwrite(fd, b"x" * 3000, 0)
        assert _libc.fallocate(fd, PUNCH, 0, 1000) == 0
    finally:
        os.close(fd)
    assert page.read_bytes() == bytes(1000) + b"x" * 2000 + bytes(PAGE - 3000)


UNPATCHED = """
import errno, sys
import pyfuse3

# pyfuse3 3.5.0 as released: no Operations.fallocate, and the kernel hears ENOSYS.
del pyfuse3.Operations.fallocate
from tmemfs import fs


async def enosys(self, *args):
    raise pyfuse3.FUSEError(errno.ENOSYS)


fs.TmemOperations.fallocate = enosys
from tmemfs.cli import main

sys.exit(main())
"""


def test_unpatched_pyfuse3_mounts_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "unpatched_tmemfs.py"
    script.write_text(UNPATCHED)
    monkeypatch.setattr(conftest, "TMEMFS", [sys.executable, str(script)])
    version = subprocess.run(
        [sys.executable, str(script), "--version"], capture_output=True, text=True, timeout=60
    )
    assert "discard: off" in version.stdout
    with mounted(tmp_path / "mnt") as tmem:
        assert "discard off" in (tmem.path / ".daemon").read_text().splitlines()
        img, data = filled_image(tmem, 8)
        assert fallocate(img, PUNCH, 0, 4 * PAGE) == errno.EOPNOTSUPP
        assert fallocate(img, PUNCH, 0, 4 * PAGE) == errno.EOPNOTSUPP
        assert pread(img, 0, len(data)) == data
        assert pages(tmem.path / "frontswap" / "0") == set(range(8))
        (tmem.path / "frontswap" / "0" / "9").write_bytes(random_page(9))
        assert (tmem.path / "frontswap" / "0" / "9").read_bytes() == random_page(9)
        assert tmem.log_text().count("discard: off") == 1
