"""The errno matrix: every refused operation fails with the chosen errno, and the
mount keeps answering afterwards (the daemon must survive every one of them).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mount, mounted
from tmemfs_testlib import PAGE, load, random_page, store, text_page, try_store

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

_pool_numbers = itertools.count(100)


@dataclass
class Tree:
    """A fresh frontswap pool and cleancache pool/object, each holding one page."""

    mnt: Path
    fs: Path  # frontswap/N
    cc: Path  # cleancache/P
    obj: Path  # cleancache/P/O
    page: Path  # frontswap/N/5
    cpage: Path  # cleancache/P/O/3
    page_data: bytes
    cpage_data: bytes


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for the whole matrix: each case gets its own pools on it."""
    with mounted(tmp_path_factory.mktemp("errno") / "mnt") as mount:
        yield mount


@pytest.fixture
def tree(shared_mount: Mount) -> Iterator[Tree]:
    n = next(_pool_numbers)
    mnt = shared_mount.path
    fs = mnt / "frontswap" / str(n)
    cc = mnt / "cleancache" / f"pool{n}"
    obj = cc / "obj"
    for directory in (fs, cc, obj):
        directory.mkdir()
    t = Tree(mnt, fs, cc, obj, fs / "5", obj / "3", random_page(), text_page(n))
    store(t.page, t.page_data)
    store(t.cpage, t.cpage_data)
    yield t
    for directory in (fs, cc):
        if directory.exists():
            os.rmdir(directory)


def open_fd(path: Path, flags: int) -> None:
    """Open and close, as `open(2)` alone would be used by a tool."""
    os.close(os.open(path, flags, 0o644))


def create(path: Path) -> None:
    open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)


def pwrite_and_close(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def ftruncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def read_after_invalidate(t: Tree) -> None:
    """A page that is gone by the time of the read: open, unlink, then read."""
    page = t.fs / "6"
    store(page, random_page())
    fd = os.open(page, os.O_RDONLY)
    try:
        os.unlink(page)
        os.pread(fd, PAGE, 0)
    finally:
        os.close(fd)


def _raise(err: int) -> None:
    if err:
        raise OSError(err, os.strerror(err))


def _unlink_then(t: Tree, action: Callable[[Path], object]) -> None:
    """A page written whole, removed, then used again by name."""
    page = t.fs / "6"
    store(page, random_page())
    os.unlink(page)
    action(page)


def _rename_over(t: Tree) -> None:
    store(t.fs / "6", random_page())
    os.rename(t.page, t.fs / "6")


Case = Callable[[Tree], object]

CASES: list[tuple[str, Case, int]] = [
    # lookup and open of bad or missing names
    ("stat-missing-in-root", lambda t: os.stat(t.mnt / "nope"), errno.ENOENT),
    ("stat-missing-fs-pool", lambda t: os.stat(t.mnt / "frontswap/99999"), errno.ENOENT),
    ("stat-bad-fs-pool-name", lambda t: os.stat(t.mnt / "frontswap/abc"), errno.ENOENT),
    ("stat-leading-zero-pool", lambda t: os.stat(t.mnt / "frontswap/01"), errno.ENOENT),
    ("stat-missing-cc-pool", lambda t: os.stat(t.mnt / "cleancache/nope"), errno.ENOENT),
    ("stat-bad-cc-pool-name", lambda t: os.stat(t.mnt / "cleancache/a b"), errno.ENOENT),
    ("stat-missing-object", lambda t: os.stat(t.cc / "nope"), errno.ENOENT),
    ("stat-missing-page", lambda t: os.stat(t.fs / "6"), errno.ENOENT),
    ("stat-bad-page-name", lambda t: os.stat(t.fs / "abc"), errno.ENOENT),
    ("stat-leading-zero-page", lambda t: os.stat(t.fs / "05"), errno.ENOENT),
    ("stat-negative-page", lambda t: os.stat(t.fs / "-1"), errno.ENOENT),
    ("stat-bad-cc-page-name", lambda t: os.stat(t.obj / "x"), errno.ENOENT),
    ("open-missing-page", lambda t: open_fd(t.fs / "6", os.O_RDONLY), errno.ENOENT),
    ("open-missing-cc-page", lambda t: open_fd(t.obj / "6", os.O_RDONLY), errno.ENOENT),
    ("open-bad-page-name", lambda t: open_fd(t.fs / "abc", os.O_RDONLY), errno.ENOENT),
    ("open-leading-zero-page", lambda t: open_fd(t.fs / "03", os.O_RDONLY), errno.ENOENT),
    ("listdir-missing-pool", lambda t: os.listdir(t.mnt / "frontswap/99999"), errno.ENOENT),
    ("read-missing-page", lambda t: load(t.fs / "6"), errno.ENOENT),
    ("read-invalidated-page", read_after_invalidate, errno.ENOENT),
    ("stat-unlinked-page", lambda t: _unlink_then(t, os.stat), errno.ENOENT),
    (
        "open-unlinked-page",
        lambda t: _unlink_then(t, lambda p: open_fd(p, os.O_RDONLY)),
        errno.ENOENT,
    ),
    (
        "rmw-unlinked-page",
        lambda t: _unlink_then(t, lambda p: pwrite_and_close(p, b"x", 9)),
        errno.ENOENT,
    ),
    ("unlink-missing-page", lambda t: os.unlink(t.fs / "6"), errno.ENOENT),
    ("unlink-missing-cc-page", lambda t: os.unlink(t.obj / "6"), errno.ENOENT),
    ("rmdir-missing-pool", lambda t: os.rmdir(t.mnt / "frontswap/99999"), errno.ENOENT),
    ("rmdir-missing-object", lambda t: os.rmdir(t.cc / "nope"), errno.ENOENT),
    # create of a page with a name that is not canonical decimal
    ("create-page-abc", lambda t: create(t.fs / "abc"), errno.EINVAL),
    ("create-page-leading-zero", lambda t: create(t.fs / "05"), errno.EINVAL),
    ("create-page-00", lambda t: create(t.fs / "00"), errno.EINVAL),
    ("create-page-negative", lambda t: create(t.fs / "-1"), errno.EINVAL),
    ("create-page-plus", lambda t: create(t.fs / "+1"), errno.EINVAL),
    ("create-page-hex", lambda t: create(t.fs / "0x10"), errno.EINVAL),
    ("create-page-space", lambda t: create(t.fs / " 1"), errno.EINVAL),
    ("create-page-dot-ext", lambda t: create(t.fs / "1.0"), errno.EINVAL),
    ("create-cc-page-abc", lambda t: create(t.obj / "abc"), errno.EINVAL),
    ("create-cc-page-leading-zero", lambda t: create(t.obj / "007"), errno.EINVAL),
    # mkdir of pools and objects with bad names
    ("mkdir-fs-abc", lambda t: os.mkdir(t.mnt / "frontswap/abc"), errno.EINVAL),
    ("mkdir-fs-leading-zero", lambda t: os.mkdir(t.mnt / "frontswap/01"), errno.EINVAL),
    ("mkdir-fs-negative", lambda t: os.mkdir(t.mnt / "frontswap/-1"), errno.EINVAL),
    ("mkdir-cc-dot", lambda t: os.mkdir(t.mnt / "cleancache/.hidden"), errno.EINVAL),
    ("mkdir-cc-space", lambda t: os.mkdir(t.mnt / "cleancache/a b"), errno.EINVAL),
    ("mkdir-cc-colon", lambda t: os.mkdir(t.mnt / "cleancache/a:b"), errno.EINVAL),
    ("mkdir-cc-non-ascii", lambda t: os.mkdir(t.mnt / "cleancache/caf\u00e9"), errno.EINVAL),
    ("mkdir-object-dot", lambda t: os.mkdir(t.cc / ".hidden"), errno.EINVAL),
    ("mkdir-object-space", lambda t: os.mkdir(t.cc / "a b"), errno.EINVAL),
    # mkdir of what exists
    ("mkdir-existing-fs-pool", lambda t: os.mkdir(t.fs), errno.EEXIST),
    ("mkdir-existing-cc-pool", lambda t: os.mkdir(t.cc), errno.EEXIST),
    ("mkdir-existing-object", lambda t: os.mkdir(t.obj), errno.EEXIST),
    # mkdir in the wrong place
    ("mkdir-in-root", lambda t: os.mkdir(t.mnt / "x"), errno.EPERM),
    ("mkdir-in-fs-pool", lambda t: os.mkdir(t.fs / "x"), errno.EPERM),
    ("mkdir-numeric-in-fs-pool", lambda t: os.mkdir(t.fs / "7"), errno.EPERM),
    ("mkdir-in-object", lambda t: os.mkdir(t.obj / "x"), errno.EPERM),
    ("mkdir-numeric-in-object", lambda t: os.mkdir(t.obj / "7"), errno.EPERM),
    # files where no files belong
    ("create-in-root", lambda t: create(t.mnt / "x"), errno.EPERM),
    ("create-in-frontswap", lambda t: create(t.mnt / "frontswap/x"), errno.EPERM),
    ("create-number-in-frontswap", lambda t: create(t.mnt / "frontswap/7"), errno.EPERM),
    ("create-in-cleancache", lambda t: create(t.mnt / "cleancache/x"), errno.EPERM),
    ("create-in-cc-pool", lambda t: create(t.cc / "x"), errno.EPERM),
    ("create-number-in-cc-pool", lambda t: create(t.cc / "7"), errno.EPERM),
    # pages are at most a page
    ("write-at-page-end", lambda t: pwrite_and_close(t.page, b"x", PAGE), errno.EFBIG),
    ("write-across-page-end", lambda t: pwrite_and_close(t.page, b"x" * 10, PAGE - 5), errno.EFBIG),
    (
        "write-more-than-a-page",
        lambda t: _raise(try_store(t.fs / "8", b"x" * (PAGE + 1))),
        errno.EFBIG,
    ),
    ("write-cc-past-page", lambda t: pwrite_and_close(t.cpage, b"x", PAGE), errno.EFBIG),
    ("truncate-page-up", lambda t: os.truncate(t.page, PAGE + 1), errno.EFBIG),
    ("ftruncate-page-up", lambda t: ftruncate(t.page, 2 * PAGE), errno.EFBIG),
    ("truncate-cc-page-up", lambda t: os.truncate(t.cpage, PAGE + 1), errno.EFBIG),
    # stats files are read-only
    ("open-stats-write", lambda t: open_fd(t.mnt / "stats", os.O_WRONLY), errno.EACCES),
    ("open-stats-rdwr", lambda t: open_fd(t.mnt / "stats", os.O_RDWR), errno.EACCES),
    (
        "open-stats-append",
        lambda t: open_fd(t.mnt / "stats", os.O_WRONLY | os.O_APPEND),
        errno.EACCES,
    ),
    ("open-fs-dotstats-write", lambda t: open_fd(t.fs / ".stats", os.O_WRONLY), errno.EACCES),
    ("open-cc-dotstats-write", lambda t: open_fd(t.cc / ".stats", os.O_WRONLY), errno.EACCES),
    ("truncate-stats", lambda t: os.truncate(t.mnt / "stats", 0), errno.EACCES),
    ("truncate-dotstats", lambda t: os.truncate(t.fs / ".stats", 0), errno.EACCES),
    ("unlink-stats", lambda t: os.unlink(t.mnt / "stats"), errno.EPERM),
    ("unlink-fs-dotstats", lambda t: os.unlink(t.fs / ".stats"), errno.EPERM),
    ("unlink-cc-dotstats", lambda t: os.unlink(t.cc / ".stats"), errno.EPERM),
    # rename, link, symlink, mknod, chmod, chown of and into pages
    ("rename-page-to-new", lambda t: os.rename(t.page, t.fs / "6"), errno.EPERM),
    ("rename-page-over-page", lambda t: _rename_over(t), errno.EPERM),
    ("rename-page-across-pools", lambda t: os.rename(t.page, t.obj / "9"), errno.EPERM),
    ("rename-cc-page", lambda t: os.rename(t.cpage, t.obj / "4"), errno.EPERM),
    ("rename-fs-pool", lambda t: os.rename(t.fs, t.mnt / "frontswap/99998"), errno.EPERM),
    ("rename-object", lambda t: os.rename(t.obj, t.cc / "other"), errno.EPERM),
    ("link-page", lambda t: os.link(t.page, t.fs / "6"), errno.EPERM),
    ("link-cc-page", lambda t: os.link(t.cpage, t.obj / "4"), errno.EPERM),
    ("symlink-in-fs-pool", lambda t: os.symlink("5", t.fs / "6"), errno.EPERM),
    ("symlink-in-object", lambda t: os.symlink("3", t.obj / "4"), errno.EPERM),
    ("mknod-reg-in-fs-pool", lambda t: os.mknod(t.fs / "6", stat.S_IFREG | 0o644), errno.EPERM),
    ("mknod-fifo-in-fs-pool", lambda t: os.mknod(t.fs / "6", stat.S_IFIFO | 0o644), errno.EPERM),
    ("mknod-reg-in-object", lambda t: os.mknod(t.obj / "4", stat.S_IFREG | 0o644), errno.EPERM),
    ("chmod-page", lambda t: os.chmod(t.page, 0o600), errno.EPERM),
    ("chmod-cc-page", lambda t: os.chmod(t.cpage, 0o600), errno.EPERM),
    ("chown-page", lambda t: os.chown(t.page, 1000, 1000), errno.EPERM),
    ("chown-cc-page", lambda t: os.chown(t.cpage, 1000, -1), errno.EPERM),
    # the fixed directories stay
    ("rmdir-frontswap", lambda t: os.rmdir(t.mnt / "frontswap"), errno.EPERM),
    ("rmdir-cleancache", lambda t: os.rmdir(t.mnt / "cleancache"), errno.EPERM),
    # extended attributes: none, and none can be set
    ("setxattr-page", lambda t: os.setxattr(t.page, "user.x", b"1"), errno.EOPNOTSUPP),
    ("setxattr-pool", lambda t: os.setxattr(t.fs, "user.x", b"1"), errno.EOPNOTSUPP),
    ("setxattr-root", lambda t: os.setxattr(t.mnt, "user.x", b"1"), errno.EOPNOTSUPP),
    ("setxattr-stats", lambda t: os.setxattr(t.mnt / "stats", "user.x", b"1"), errno.EOPNOTSUPP),
    ("getxattr-page", lambda t: os.getxattr(t.page, "user.x"), errno.EOPNOTSUPP),
    ("getxattr-cc-page", lambda t: os.getxattr(t.cpage, "user.x"), errno.EOPNOTSUPP),
    ("getxattr-pool", lambda t: os.getxattr(t.fs, "user.x"), errno.EOPNOTSUPP),
    ("getxattr-root", lambda t: os.getxattr(t.mnt, "user.x"), errno.EOPNOTSUPP),
    ("getxattr-stats", lambda t: os.getxattr(t.mnt / "stats", "user.x"), errno.EOPNOTSUPP),
]


def assert_mount_answers(mount: Mount) -> None:
    assert "stored_pages" in (mount.path / "stats").read_text()
    assert mount.alive(), f"tmemfs died:\n{mount.log_text()}"


@pytest.mark.parametrize(
    ("action", "expected"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_errno(shared_mount: Mount, tree: Tree, action: Case, expected: int) -> None:
    with pytest.raises(OSError) as exc:
        action(tree)
    assert exc.value.errno == expected, (
        f"expected {errno.errorcode[expected]}, got "
        f"{errno.errorcode.get(exc.value.errno or 0, exc.value.errno)} ({exc.value})"
    )
    assert_mount_answers(shared_mount)
    # A refused operation leaves the pages it touched as they were.
    if tree.fs.exists() and tree.obj.exists():
        assert load(tree.page) == tree.page_data
        assert load(tree.cpage) == tree.cpage_data


def test_store_refused_for_a_full_budget_is_enospc(tmp_path: Path) -> None:
    with mounted(tmp_path / "mnt", "--max-pool", "64K") as mount:
        pool = mount.path / "frontswap" / "0"
        pool.mkdir()
        errors = [try_store(pool / str(i), random_page()) for i in range(64)]
        refused = [err for err in errors if err]

        assert refused, "64 incompressible pages fit in a 64K budget"
        assert set(refused) == {errno.ENOSPC}
        assert_mount_answers(mount)
