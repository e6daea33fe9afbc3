"""The mount driven with real tools (dd, cp, cat, ls, rm, rmdir, du, stat, touch) and
Python file I/O, checking what a user of the mount would check (SPEC sections 1, 2, 5).
"""

from __future__ import annotations

import errno
import os
import shlex
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from tmemfs_testlib import (
    PAGE,
    SPEC_COUNTERS,
    ZERO_PAGE,
    load,
    padded,
    page_names,
    patched,
    random_page,
    run,
    same_filled_page,
    sh,
    store,
    text_page,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MountFactory = Callable[..., Mount]


def q(path: Path) -> str:
    return shlex.quote(str(path))


def delta(before: dict[str, int], after: dict[str, int], name: str) -> int:
    return after[name] - before[name]


def blocks(path: Path) -> int:
    """st_blocks as `stat -c %b` shows it."""
    return int(run("stat", "-c", "%b", path).stdout)


def du_bytes(path: Path) -> int:
    """What `du -B1` says a file costs."""
    return int(run("du", "-B1", path).stdout.split()[0])


def fs_pool(mount: Mount, swap_type: int = 0) -> Path:
    pool = mount.path / "frontswap" / str(swap_type)
    run("mkdir", pool)
    return pool


# -- frontswap pages with dd, cat, cp, ls, stat, du, rm, rmdir -------------------------


def test_dd_store_then_cat_returns_the_page(tmem: Mount, tmp_path: Path) -> None:
    pool = fs_pool(tmem)
    data = random_page()
    src = tmp_path / "page.bin"
    src.write_bytes(data)
    before = tmem.stats()

    run("dd", f"if={src}", f"of={pool / '5'}", "bs=4096", "count=1", "status=none")

    assert run("cat", pool / "5").stdout == data
    # Off by default: a second cat shows the same page (no exclusive gets).
    assert run("cat", pool / "5").stdout == data
    assert load(pool / "5") == data
    after = tmem.stats()
    # dd closes a dup of its output before it writes; that close must not store a zero
    # page first: one dd, one store.
    assert delta(before, after, "stores") == 1
    assert delta(before, after, "duplicate_entry") == 0
    assert delta(before, after, "stored_pages") == 1
    assert delta(before, after, "loads") == 3


def test_pages_written_and_read_in_pieces_count_once(tmem: Mount, tmp_path: Path) -> None:
    pool = fs_pool(tmem)
    data = random_page()
    src = tmp_path / "page.bin"
    src.write_bytes(data)
    before = tmem.stats()

    run("dd", f"if={src}", f"of={pool / '3'}", "bs=512", "count=8", "status=none")
    pieces = run("dd", f"if={pool / '3'}", "bs=512", "status=none").stdout

    assert pieces == data
    assert (
        run("dd", f"if={pool / '3'}", "bs=1", "skip=100", "count=3", "status=none").stdout
        == data[100:103]
    )
    after = tmem.stats()
    assert delta(before, after, "stores") == 1, "8 writes of 512 bytes are one page stored"
    assert delta(before, after, "loads") == 2, "a read from offset 0 is one get"


def test_cp_in_and_out(tmem: Mount, tmp_path: Path) -> None:
    pool = fs_pool(tmem)
    data = random_page()
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    before = tmem.stats()

    run("cp", src, pool / "4711")
    run("cp", pool / "4711", tmp_path / "out.bin")

    assert (tmp_path / "out.bin").read_bytes() == data
    run("cp", pool / "4711", pool / "4712")
    assert load(pool / "4712") == data
    after = tmem.stats()
    assert delta(before, after, "stores") == 2, "one 4096-byte cp is one store"
    assert delta(before, after, "stored_pages") == 2
    assert delta(before, after, "orig_data_size") == 2 * PAGE
    assert delta(before, after, "loads") == 3


def test_ls_lists_pages_and_hides_dot_files(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    for index in (0, 5, 4711):
        store(pool / str(index), text_page(index))

    assert sh(f"ls {q(pool)} | wc -l").stdout.strip() == b"3"
    assert set(run("ls", pool).stdout.decode().split()) == {"0", "5", "4711"}
    # "." and ".." are optional in readdir (POSIX). .stats, .max and .weight are not listed
    # even by -a (archivers must not copy them), yet it is there for whoever names it.
    assert set(run("ls", "-a", pool).stdout.decode().split()) - {".", ".."} == {"0", "5", "4711"}
    assert b"stored_pages 3\n" in run("cat", pool / ".stats").stdout
    assert set(run("ls", tmem.path / "frontswap").stdout.decode().split()) == {"0"}
    assert set(run("ls", tmem.path).stdout.decode().split()) == {"stats", "frontswap", "cleancache"}


def test_stat_size_and_blocks_show_logical_and_real_cost(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    store(pool / "1", ZERO_PAGE)
    store(pool / "2", random_page())
    store(pool / "3", text_page(3))
    store(pool / "4", same_filled_page(0xDEADBEEF))

    for index in (1, 2, 3, 4):
        assert run("stat", "-c", "%s", pool / str(index)).stdout.strip() == b"4096"
        assert os.stat(pool / str(index)).st_size == PAGE
    # A zero page (or any same-filled page) costs no compressed storage.
    assert blocks(pool / "1") == 0
    assert du_bytes(pool / "1") == 0
    assert blocks(pool / "4") == 0
    # An incompressible page costs about a page.
    assert 8 <= blocks(pool / "2") <= 9
    assert PAGE <= du_bytes(pool / "2") <= PAGE + 512
    # A compressible page costs something, but less than a page.
    assert 1 <= blocks(pool / "3") < 8
    assert os.stat(pool / "3").st_blocks == blocks(pool / "3")
    # `du` of the pool adds up its pages (distinct inodes, so none is skipped).
    files = sum(du_bytes(pool / str(i)) for i in (1, 2, 3, 4))
    own = os.stat(pool).st_blocks * 512
    assert int(run("du", "-s", "-B1", pool).stdout.split()[0]) == files + own


def test_deduplicated_pages_share_their_cost(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    data = random_page()
    store(pool / "1", data)
    before = tmem.stats()
    store(pool / "2", data)
    after = tmem.stats()

    assert load(pool / "1") == load(pool / "2") == data
    assert delta(before, after, "compr_data_size") < PAGE, "identical pages kept once"
    assert after["dedup_pages"] >= 1
    # Shared cost: du of both adds up to about one page, not two.
    assert 8 <= blocks(pool / "1") + blocks(pool / "2") <= 10


def test_rm_invalidates_a_page(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    store(pool / "5", random_page())
    store(pool / "6", random_page())
    before = tmem.stats()

    run("rm", pool / "5")

    with pytest.raises(OSError) as exc:
        os.stat(pool / "5")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        load(pool / "5")
    assert exc.value.errno == errno.ENOENT
    failed = run("cat", pool / "5", check=False)
    assert failed.returncode != 0
    assert b"No such file or directory" in failed.stderr
    assert page_names(pool) == {"6"}
    after = tmem.stats()
    assert delta(before, after, "invalidates") == 1
    assert delta(before, after, "stored_pages") == -1
    assert run("rm", pool / "5", check=False).returncode != 0


def test_rmdir_of_a_non_empty_pool_flushes_it(tmem: Mount) -> None:
    pool = fs_pool(tmem, 3)
    for index in range(3):
        store(pool / str(index), random_page())
    before = tmem.stats()

    run("rmdir", pool)

    assert not pool.exists()
    assert "3" not in page_names(tmem.path / "frontswap")
    after = tmem.stats()
    assert delta(before, after, "stored_pages") == -3
    assert delta(before, after, "invalidates") == 3
    # A new pool of the same type starts empty: the old pages are really gone.
    run("mkdir", pool)
    assert sh(f"ls {q(pool)} | wc -l").stdout.strip() == b"0"
    assert not (pool / "0").exists()
    with pytest.raises(OSError) as exc:
        load(pool / "0")
    assert exc.value.errno == errno.ENOENT


# -- cleancache ----------------------------------------------------------------------


def test_cleancache_pool_objects_and_pages(tmem: Mount, tmp_path: Path) -> None:
    pool = tmem.path / "cleancache" / "fs1"
    run("mkdir", pool)
    run("mkdir", pool / "inode-42")
    run("mkdir", pool / "43")
    obj = pool / "inode-42"
    pages = {0: random_page(), 3: text_page(3)}
    for index, data in pages.items():
        src = tmp_path / f"{index}.bin"
        src.write_bytes(data)
        run("dd", f"if={src}", f"of={obj / str(index)}", "bs=4096", "count=1", "status=none")
    store(pool / "43" / "0", random_page())

    for index, data in pages.items():
        assert run("cat", obj / str(index)).stdout == data
    assert sh(f"ls {q(obj)} | wc -l").stdout.strip() == b"2"
    assert set(run("ls", pool).stdout.decode().split()) == {"inode-42", "43"}
    assert ".stats" not in run("ls", "-a", pool).stdout.decode().split()
    assert run("test", "-f", pool / ".stats").returncode == 0
    assert set(run("ls", tmem.path / "cleancache").stdout.decode().split()) == {"fs1"}
    assert tmem.stats("cleancache/fs1")["stored_pages"] == 3

    # rmdir of a non-empty object is invalidate_inode: the object and its pages go.
    before = tmem.stats()
    run("rmdir", obj)
    assert not obj.exists()
    assert set(run("ls", pool).stdout.decode().split()) == {"43"}
    assert delta(before, tmem.stats(), "stored_pages") == -2
    assert tmem.stats("cleancache/fs1")["stored_pages"] == 1

    # A new object of that name starts empty.
    run("mkdir", obj)
    with pytest.raises(OSError) as exc:
        load(obj / "0")
    assert exc.value.errno == errno.ENOENT

    # rmdir of a non-empty pool is invalidate_fs.
    run("rmdir", pool)
    assert not pool.exists()
    assert tmem.stats()["stored_pages"] == 0


# -- short, partial and empty writes -------------------------------------------------


def test_a_whole_page_is_stored_at_write(tmem: Mount) -> None:
    """A full-page write at offset 0 is a store at once, before close."""
    pool = fs_pool(tmem)
    old, new = random_page(), random_page()
    store(pool / "1", old)

    fd = os.open(pool / "1", os.O_WRONLY)
    try:
        assert os.write(fd, new) == PAGE
        assert load(pool / "1") == new
    finally:
        os.close(fd)
    assert load(pool / "1") == new


def test_a_partial_page_is_stored_at_close(tmem: Mount) -> None:
    """Other writes are assembled per open file: readers see the old page until close."""
    pool = fs_pool(tmem)
    old = random_page()
    store(pool / "1", old)

    fd = os.open(pool / "1", os.O_WRONLY)
    try:
        os.pwrite(fd, b"new", 10)
        assert load(pool / "1") == old
    finally:
        os.close(fd)
    assert load(pool / "1") == patched(old, 10, b"new")


def test_short_write_is_zero_padded(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    before = tmem.stats()

    sh(f"echo hi > {q(pool / '9')}")

    assert load(pool / "9") == padded(b"hi\n")
    assert run("cat", pool / "9").stdout == padded(b"hi\n")
    assert run("stat", "-c", "%s", pool / "9").stdout.strip() == b"4096"
    assert delta(before, tmem.stats(), "stores") == 1
    (pool / "10").write_bytes(b"xyz")
    assert load(pool / "10") == padded(b"xyz")


def test_truncating_open_replaces_the_whole_page(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    store(pool / "9", random_page())

    sh(f"echo hi > {q(pool / '9')}")

    assert load(pool / "9") == padded(b"hi\n"), "O_TRUNC must not keep the old tail"


def test_partial_write_without_truncate_is_read_modify_write(tmem: Mount, tmp_path: Path) -> None:
    pool = fs_pool(tmem)
    old = random_page()
    store(pool / "2", old)
    src = tmp_path / "xyz"
    src.write_bytes(b"XYZ")
    before = tmem.stats()

    # Three one-byte writes at 100, 101, 102, assembled and stored once at close.
    run(
        "dd",
        f"if={src}",
        f"of={pool / '2'}",
        "bs=1",
        "count=3",
        "seek=100",
        "conv=notrunc",
        "status=none",
    )

    assert load(pool / "2") == patched(old, 100, b"XYZ")
    assert delta(before, tmem.stats(), "stores") == 1, "stores count pages, not requests"

    fd = os.open(pool / "2", os.O_WRONLY)
    try:
        os.pwrite(fd, b"tail", PAGE - 4)
    finally:
        os.close(fd)
    assert load(pool / "2") == patched(patched(old, 100, b"XYZ"), PAGE - 4, b"tail")


def test_touch_creates_a_zero_page(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    before = tmem.stats()

    run("touch", pool / "7")

    assert load(pool / "7") == ZERO_PAGE
    assert os.stat(pool / "7").st_size == PAGE
    assert page_names(pool) == {"7"}
    # The store lands at release, just after touch's close() (see the test below).
    deadline = time.monotonic() + 5
    while delta(before, tmem.stats(), "stores") != 1:
        assert time.monotonic() < deadline, "touch never stored its page"
        time.sleep(0.01)


def test_create_and_close_is_a_zero_page_at_once(tmem: Mount) -> None:
    """The zero page is there when close() returns: it lists, stats and reads as zeros.

    Its store lands at release, which the kernel sends just after close() returns (a
    close of a dup, as every shell redirection makes, must not store a zero page), so
    the counters catch up a moment later; that is waited for with a deadline.
    """
    pool = fs_pool(tmem)
    for index in range(20):
        os.close(os.open(pool / str(index), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        assert load(pool / str(index)) == ZERO_PAGE, f"page {index} right after close"
        assert str(index) in page_names(pool)
        assert os.stat(pool / str(index)).st_size == PAGE
    deadline = time.monotonic() + 5
    while tmem.stats("frontswap/0")["stored_pages"] != 20:
        assert time.monotonic() < deadline, "created pages were never stored"
        time.sleep(0.01)
    assert tmem.stats("frontswap/0")["stores"] == 20


def test_touch_keeps_an_existing_page(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    data = random_page()
    store(pool / "7", data)

    run("touch", pool / "7")

    assert load(pool / "7") == data


# -- statistics ----------------------------------------------------------------------


def test_stats_files_show_every_spec_counter(tmem: Mount) -> None:
    fs = fs_pool(tmem)
    cc = tmem.path / "cleancache" / "p"
    run("mkdir", cc)
    run("mkdir", cc / "o")

    text = run("cat", tmem.path / "stats").stdout.decode()
    for line in text.splitlines():
        assert len(line.split()) == 2, f"not 'name value': {line!r}"
    for stats in (tmem.stats(), tmem.stats("frontswap/0"), tmem.stats("cleancache/p")):
        missing = [name for name in SPEC_COUNTERS if name not in stats]
        assert not missing, f"counters missing: {missing}"
    assert tmem.stats()["stored_pages"] == 0

    store(fs / "0", ZERO_PAGE)
    store(fs / "1", random_page())
    store(cc / "o" / "0", random_page())
    run("mkdir", tmem.path / "frontswap" / "1")
    store(tmem.path / "frontswap" / "1" / "0", text_page(1))

    glob = tmem.stats()
    pools = [tmem.stats(p) for p in ("frontswap/0", "frontswap/1", "cleancache/p")]
    for name in ("stored_pages", "orig_data_size", "same_filled_pages", "stores"):
        assert glob[name] == sum(pool[name] for pool in pools), f"global {name} is the sum"
    assert glob["stored_pages"] == 4
    assert glob["stores"] == 4
    assert glob["orig_data_size"] == 4 * PAGE
    assert glob["same_filled_pages"] == 1
    assert tmem.stats("frontswap/0")["stored_pages"] == 2
    assert tmem.stats("frontswap/0")["stores"] == 2
    assert tmem.stats("frontswap/1")["stored_pages"] == 1
    assert tmem.stats("cleancache/p")["stored_pages"] == 1
    assert tmem.stats("cleancache/p")["orig_data_size"] == PAGE

    # Looking at pages is not loading them.
    run("ls", "-l", fs)
    run("stat", fs / "1")
    run("du", "-s", fs)
    assert tmem.stats()["loads"] == glob["loads"]
    run("cat", fs / "1")
    assert tmem.stats()["loads"] == glob["loads"] + 1

    # Storing a page again replaces it: one more store, no more pages.
    store(fs / "1", random_page())
    after = tmem.stats()
    assert after["stored_pages"] == 4
    assert delta(glob, after, "stores") == 1
    assert delta(glob, after, "duplicate_entry") == 1


def test_stats_are_read_only_in_ls(tmem: Mount) -> None:
    fs_pool(tmem)
    mode = os.stat(tmem.path / "stats").st_mode
    assert mode & 0o222 == 0, "stats is read-only"
    assert os.stat(tmem.path / "frontswap" / "0" / ".stats").st_mode & 0o222 == 0


# -- options -------------------------------------------------------------------------


def test_exclusive_gets_make_a_second_read_miss(mount_factory: MountFactory) -> None:
    mount = mount_factory("--exclusive-gets")
    pool = fs_pool(mount)
    data = random_page()
    store(pool / "5", data)

    assert run("cat", pool / "5").stdout == data
    second = run("cat", pool / "5", check=False)
    assert second.returncode != 0
    assert b"No such file or directory" in second.stderr
    with pytest.raises(OSError) as exc:
        load(pool / "5")
    assert exc.value.errno == errno.ENOENT
    assert page_names(pool) == set()
    assert mount.stats()["stored_pages"] == 0

    # Private cleancache pools too.
    obj = mount.path / "cleancache" / "private" / "o"
    run("mkdir", obj.parent)
    run("mkdir", obj)
    store(obj / "1", data)
    assert load(obj / "1") == data
    with pytest.raises(OSError) as exc:
        load(obj / "1")
    assert exc.value.errno == errno.ENOENT


def test_exclusive_gets_in_pieces_and_store_again(mount_factory: MountFactory) -> None:
    """swap-in then swap-out of the same slot: a get (which takes the page), then a put."""
    mount = mount_factory("--exclusive-gets")
    pool = fs_pool(mount)
    first = random_page()
    store(pool / "5", first)
    assert run("dd", f"if={pool / '5'}", "bs=512", "status=none").stdout == first
    second = random_page()
    store(pool / "5", second)
    assert load(pool / "5") == second

    sh(f"echo one > {q(pool / '6')}")
    assert run("cat", pool / "6").stdout == padded(b"one\n")
    sh(f"echo two > {q(pool / '6')}")
    assert run("cat", pool / "6").stdout == padded(b"two\n")


def test_exclusive_gets_spare_shared_pools(mount_factory: MountFactory) -> None:
    mount = mount_factory("--exclusive-gets")
    obj = mount.path / "cleancache" / str(uuid.uuid4()) / "o"
    run("mkdir", obj.parent)
    run("mkdir", obj)
    data = random_page()
    store(obj / "1", data)

    assert load(obj / "1") == data
    assert load(obj / "1") == data, "a shared pool's page is not taken by a get"


def test_raw_backend_stores_pages_uncompressed(mount_factory: MountFactory) -> None:
    mount = mount_factory("--backend", "raw")
    pool = fs_pool(mount)
    data = random_page()
    store(pool / "0", data)
    store(pool / "1", ZERO_PAGE)
    sh(f"echo hi > {q(pool / '2')}")

    assert run("cat", pool / "0").stdout == data
    assert load(pool / "1") == ZERO_PAGE
    assert load(pool / "2") == padded(b"hi\n")
    # Nothing is compressed: even a zero page costs a page.
    assert blocks(pool / "1") >= 8
    assert blocks(pool / "0") >= 8
    stats = mount.stats()
    assert stats["stored_pages"] == 3
    assert stats["compr_data_size"] >= 3 * PAGE


# -- timestamps ----------------------------------------------------------------------


def let_the_clock_move(seconds: float) -> None:
    """Not a synchronisation: two stores must be far enough apart to tell them apart."""
    time.sleep(seconds)


def test_mtime_is_the_time_of_the_store(tmem: Mount) -> None:
    pool = fs_pool(tmem)
    t0 = time.time_ns()
    store(pool / "1", random_page())
    t1 = time.time_ns()
    let_the_clock_move(1.1)

    mtime = os.stat(pool / "1").st_mtime_ns
    # Whole-second timestamps may round down by up to a second; never later than the store.
    assert t0 - 1_000_000_000 <= mtime <= t1 + 10_000_000
    assert int(run("stat", "-c", "%Y", pool / "1").stdout) <= t1 // 1_000_000_000

    load(pool / "1")
    assert os.stat(pool / "1").st_mtime_ns == mtime, "a load is not a store"

    t2 = time.time_ns()
    store(pool / "1", random_page())
    assert os.stat(pool / "1").st_mtime_ns >= t2 - 1_000_000_000
    assert os.stat(pool / "1").st_mtime_ns > mtime
