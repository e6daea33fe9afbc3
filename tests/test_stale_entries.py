"""Names the kernel must forget: whatever goes away is gone at once, for every tool.

The kernel caches names (dentries). When a pool, an object, an image or a page goes
away by any road other than the kernel's own unlink or rmdir of that very name, the
cached name must go too, or the next open finds a ghost: `truncate -s 1M
frontswap/0.img` right after `rmdir frontswap/0` failed with ENOENT until the entry
expired (issue 12, item 1). No sleeps here: scripts do not sleep between steps.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
from conftest import Mount
from tmemfs_testlib import PAGE, ZERO_PAGE, errno_of, load, random_page, sh, store

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

ROUNDS = 40


def test_image_made_again_right_after_rmdir_shell(tmem: Mount) -> None:
    """The loop from the issue, with the tools a script uses: 0 failures in 40."""
    fs = tmem.path / "frontswap"
    result = sh(
        f"fails=0; for i in $(seq {ROUNDS}); do "
        f"truncate -s 1M {fs}/0.img || fails=$((fails+1)); "
        f"rmdir {fs}/0 || fails=$((fails+1)); done; echo $fails",
        check=False,
    )
    assert result.stdout.strip() == b"0", result.stderr.decode()[-2000:]
    assert not (fs / "0.img").exists()


def test_image_made_again_right_after_rmdir_python(tmem: Mount) -> None:
    """The same with Python calls, as close together as they can be; each new image is
    new: zeros, not the page stored in the pool that was flushed."""
    fs = tmem.path / "frontswap"
    failures = []
    for round_ in range(ROUNDS):
        try:
            fd = os.open(fs / "0.img", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.ftruncate(fd, 4 * PAGE)
                assert os.pread(fd, PAGE, PAGE) == ZERO_PAGE, f"round {round_}: old data"
                os.pwrite(fd, random_page(round_), PAGE)
            finally:
                os.close(fd)
            assert os.stat(fs / "0.img").st_size == 4 * PAGE
            assert load(fs / "0" / "1") == random_page(round_)
            os.rmdir(fs / "0")
        except OSError as exc:
            failures.append((round_, exc))
    assert not failures, f"{len(failures)} of {ROUNDS} rounds failed: {failures[:3]}"


def test_unlinked_image_made_again(tmem: Mount) -> None:
    """unlink N.img then truncate again: the view comes back over the same pool."""
    fs = tmem.path / "frontswap"
    for round_ in range(ROUNDS):
        sh(f"truncate -s 1M {fs}/3.img && test -f {fs}/3.img")
        os.unlink(fs / "3.img")
        assert errno_of(lambda: os.stat(fs / "3.img")) == errno.ENOENT, round_
    assert os.path.isdir(fs / "3")


def test_object_and_pool_made_again(tmem: Mount) -> None:
    """rmdir then mkdir of an object and of a pool, with a page stored each round."""
    cc = tmem.path / "cleancache"
    for round_ in range(ROUNDS):
        os.mkdir(cc / "p")
        os.mkdir(cc / "p" / "o")
        store(cc / "p" / "o" / "7", random_page(round_))
        assert load(cc / "p" / "o" / "7") == random_page(round_)
        os.rmdir(cc / "p" / "o")
        os.mkdir(cc / "p" / "o")
        assert errno_of(lambda: load(cc / "p" / "o" / "7")) == errno.ENOENT, round_
        os.rmdir(cc / "p")


def test_truncated_image_pages_gone(tmem: Mount) -> None:
    """Pages cut off by a shrinking truncate are gone for stat and open at once."""
    fs = tmem.path / "frontswap"
    os.mkdir(fs / "5")
    for round_ in range(ROUNDS // 4):
        sh(f"truncate -s {8 * PAGE} {fs}/5.img")
        store(fs / "5" / "6", random_page(round_))
        assert os.stat(fs / "5" / "6").st_size == PAGE
        os.truncate(fs / "5.img", 2 * PAGE)
        assert errno_of(lambda: load(fs / "5" / "6")) == errno.ENOENT
        assert "6" not in os.listdir(fs / "5")


def test_evicted_page_gone_at_once(mount_factory: Callable[..., Mount]) -> None:
    """A cleancache page the kernel looked up, evicted by a store elsewhere, is gone
    for stat and O_EXCL the moment that store returns."""
    mount = mount_factory("--max-pool", "24K")
    obj = mount.path / "cleancache" / "p" / "o"
    obj.mkdir(parents=True)
    pool = mount.path / "frontswap" / "0"
    pool.mkdir()
    page = obj / "1"
    for round_ in range(ROUNDS):
        store(page, random_page(round_))
        assert os.stat(page).st_size == PAGE
        for index in range(5):  # more than the budget: the cleancache page goes
            store(pool / str(index), random_page(1000 + index))
        assert not page.exists(), f"round {round_}: an evicted page still exists"
        os.close(os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        for index in range(5):
            os.unlink(pool / str(index))
        os.unlink(page)
    assert mount.stats()["evicted_pages"] >= ROUNDS


def test_exclusively_got_page_gone_at_once(mount_factory: Callable[..., Mount]) -> None:
    """--exclusive-gets: a page read is gone at once, for stat and for ls."""
    mount = mount_factory("--exclusive-gets")
    pool = mount.path / "frontswap" / "0"
    pool.mkdir()
    for round_ in range(ROUNDS):
        page = pool / str(round_ % 3)
        store(page, random_page(round_))
        assert os.stat(page).st_size == PAGE
        assert load(page) == random_page(round_)
        assert not page.exists(), f"round {round_}: a page got exclusively still exists"
        assert errno_of(lambda p=page: load(p)) == errno.ENOENT
