"""Save and restore a pool with the tools people already use: tar, cp -a, rsync -a.

Xen tmem could save and restore pools; here that is plain file I/O (issue 12,
item 7). Each tool copies a frontswap pool and a cleancache pool out, the pool is
flushed and made anew, the tool copies it back: exit status 0, no complaint on
stderr, every page intact. What makes it work, and is checked on its own too:
- `.stats` is not listed (not even by `ls -a`), so no archiver copies a control
  file whose text changes as it is read, yet `cat POOL/.stats` works;
- chown and chmod of a page to what it already is succeed (anything else is EPERM);
- rsync's temporary `.N.XXXXXX`, renamed onto N, stores page N.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from tmemfs_testlib import (
    PAGE,
    ZERO_PAGE,
    errno_of,
    load,
    random_page,
    run,
    same_filled_page,
    store,
    text_page,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

# Every kind of page: incompressible, text, zero, same-filled, a duplicate.
PAGES = {
    0: random_page(1),
    1: text_page(2),
    7: ZERO_PAGE,
    42: same_filled_page(0xAB),
    4711: random_page(1),
}


def fill(directory: Path) -> None:
    for index, data in PAGES.items():
        store(directory / str(index), data)


def check(directory: Path) -> None:
    assert {n for n in os.listdir(directory)} == {str(i) for i in PAGES}
    for index, data in PAGES.items():
        assert load(directory / str(index)) == data, f"{directory}/{index}"


# (save, restore): shell commands over SRC (the pool) and COPY (outside the mount).
TOOLS: dict[str, tuple[str, str]] = {
    "tar": ("tar -C {src} -cf {copy}.tar .", "tar -C {src} -xf {copy}.tar"),
    "cp": ("cp -a {src}/. {copy}", "cp -a {copy}/. {src}"),
    "rsync": ("rsync -a {src}/ {copy}/", "rsync -a {copy}/ {src}/"),
}


def round_trip(tool: str, src: Path, copy: Path, remake: Callable[[], None]) -> None:
    save, restore = TOOLS[tool]
    result = run("bash", "-c", save.format(src=src, copy=copy), check=False)
    assert (result.returncode, result.stderr) == (0, b""), f"{tool} save: {result.stderr!r}"
    remake()
    result = run("bash", "-c", restore.format(src=src, copy=copy), check=False)
    assert (result.returncode, result.stderr) == (0, b""), f"{tool} restore: {result.stderr!r}"


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_frontswap_pool_round_trip(tmem: Mount, tmp_path: Path, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (examples/setup.sh installs it)")
    pool = tmem.path / "frontswap" / "2"
    pool.mkdir()
    fill(pool)

    def remake() -> None:
        os.rmdir(pool)
        os.mkdir(pool)
        assert os.listdir(pool) == []

    round_trip(tool, pool, tmp_path / "pool2", remake)
    check(pool)
    assert tmem.stats("frontswap/2")["stored_pages"] == len(PAGES)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_cleancache_pool_round_trip(tmem: Mount, tmp_path: Path, tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (examples/setup.sh installs it)")
    pool = tmem.path / "cleancache" / "fs1"
    pool.mkdir()
    for obj in ("inode-12", "13"):
        (pool / obj).mkdir()
        fill(pool / obj)

    def remake() -> None:
        os.rmdir(pool)
        os.mkdir(pool)

    round_trip(tool, pool, tmp_path / "fs1", remake)
    assert sorted(os.listdir(pool)) == ["13", "inode-12"]
    for obj in ("inode-12", "13"):
        check(pool / obj)


def test_stats_unlisted_but_readable(tmem: Mount) -> None:
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir()
    store(pool / "3", text_page(3))
    assert os.listdir(pool) == ["3"]
    assert "stored_pages 1\n" in (pool / ".stats").read_text()
    assert os.stat(pool / ".stats").st_size > 0


def test_chown_chmod_to_the_same_succeed_others_eperm(tmem: Mount) -> None:
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir(mode=0o750)
    page = pool / "3"
    store(page, text_page(3))
    st = os.stat(page)
    assert stat_mode(st) == 0o640  # the pool's mode without x bits
    os.chmod(page, 0o640)
    os.chown(page, st.st_uid, st.st_gid)
    os.chown(page, -1, -1)
    assert errno_of(lambda: os.chmod(page, 0o600)) == errno.EPERM
    assert errno_of(lambda: os.chown(page, st.st_uid + 1, -1)) == errno.EPERM
    assert errno_of(lambda: os.chown(page, -1, st.st_gid + 1)) == errno.EPERM
    assert errno_of(lambda: os.chmod(pool / ".stats", 0o666)) == errno.EPERM
    assert load(page) == text_page(3)


def test_rsync_temporary_file_renamed_onto_a_page(tmem: Mount) -> None:
    """What rsync does for each file, step by step; and renames nothing else."""
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir()
    temp = pool / ".5.Ab3xZ9"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"half")
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)
    assert os.stat(temp).st_size == 4
    assert os.listdir(pool) == []  # a file coming in is not a page yet
    os.utime(temp, (0, 0))
    os.rename(temp, pool / "5")
    assert load(pool / "5") == b"half" + bytes(PAGE - 4)
    assert errno_of(lambda: os.stat(temp)) == errno.ENOENT
    assert os.stat(pool / "5").st_size == PAGE
    # Onto another page, from a page, across pools, a name of the wrong shape: EPERM.
    (tmem.path / "frontswap" / "1").mkdir()
    other = pool / ".6.Ab3xZ9"
    other.write_bytes(b"x")
    assert errno_of(lambda: os.rename(other, pool / "7")) == errno.EPERM
    assert errno_of(lambda: os.rename(other, tmem.path / "frontswap/1/6")) in (
        errno.EPERM,
        errno.EXDEV,
    )
    assert errno_of(lambda: os.rename(pool / "5", pool / "6")) == errno.EPERM
    assert errno_of(lambda: (pool / ".x").write_bytes(b"x")) == errno.EINVAL
    assert errno_of(lambda: (pool / ".6.toolong").write_bytes(b"x")) == errno.EINVAL
    assert errno_of(lambda: other.write_bytes(bytes(PAGE + 1))) == errno.EFBIG
    os.unlink(other)
    assert errno_of(lambda: os.stat(other)) == errno.ENOENT


def stat_mode(st: os.stat_result) -> int:
    return st.st_mode & 0o7777
