"""Pages in Redis (`--backend redis://...`, `redis+cluster://...`), through real mounts.

The promises checked here (SPEC sections 2 and 3, and the remote failure rules):
- pages go to Redis and come back byte for byte, as page files and through the image;
- while Redis is down a store is refused (ENOSPC), a load of a frontswap page is EIO
  (never zeros, never other bytes) and a cleancache load is a miss (ENOENT); the daemon
  lives on, and when Redis is back the same mount works again without a remount;
- a Redis that comes back empty makes the lost frontswap pages EIO, counted in
  `lost_pages`;
- a remount on the same Redis finds its frontswap pools again; a UUID pool is shared
  between mounts; in a cluster, a dead master fails only the pages it held.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TMEMFS, Mount, is_mounted, mounted, start_mount
from redis_servers import RedisCluster, RedisFactory, RedisServer, free_port
from tmemfs_testlib import (
    PAGE,
    SPEC_COUNTERS,
    ZERO_PAGE,
    errno_of,
    load,
    page_names,
    random_page,
    same_filled_page,
    store,
    text_page,
    try_store,
)

pytest_plugins = ["redis_servers"]  # the redis_factory and redis_cluster fixtures
pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MountFactory = Callable[..., Mount]
MiB = 1 << 20
# Short deadlines keep the outage tests quick; one test keeps the default (2 s).
FAST = ("--remote-timeout", "1")
# How long one operation against a dead or hung Redis may take: the deadline and slack.
SLOW_OP = 1 + 3.0


# -- helpers -------------------------------------------------------------------------------


def outcome(path: Path) -> bytes | int:
    """What a load gives: the bytes, or the errno it failed with."""
    try:
        return load(path)
    except OSError as exc:
        return exc.errno or -1


def timed(action: Callable[[], object]) -> tuple[object, float]:
    start = time.monotonic()
    result = action()
    return result, time.monotonic() - start


def name(err: object) -> str:
    if isinstance(err, int):
        return errno.errorcode.get(err, str(err)) if err else "success"
    return "data"


def wait_until_stores_work(pool: Path, timeout: float = 10.0) -> float:
    """Store a probe page until it is accepted (Redis is back); how long that took."""
    probe = pool / "999999"
    start = time.monotonic()
    while try_store(probe, random_page(999999)):
        if time.monotonic() - start > timeout:
            pytest.fail(f"stores into {pool} still refused {timeout}s after Redis came back")
        time.sleep(0.2)
    os.unlink(probe)
    return time.monotonic() - start


def mixed_page(i: int) -> bytes:
    """Incompressible, compressible, zero and same-filled pages, by index."""
    kind = i % 8
    if kind == 0:
        return ZERO_PAGE
    if kind == 1:
        return same_filled_page(i)
    if kind in (2, 3):
        return text_page(i)
    return random_page(i)


def direct_pwrite(path: Path, offset: int, data: bytes) -> None:
    """One O_DIRECT write from a page-aligned buffer (as a loop device or dd would)."""
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwrite(fd, buf, offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def direct_pread(path: Path, offset: int, size: int) -> bytes:
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], offset)
        return bytes(buf[:got])
    finally:
        os.close(fd)
        buf.close()


def dd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "status=none", *args], capture_output=True, text=True, timeout=120, check=False
    )


def assert_counters_sane(mount: Mount) -> None:
    """No counter in `stats` or any pool's `.stats` is negative."""
    files = {"stats": mount.stats()}
    for kind in ("frontswap", "cleancache"):
        for pool in page_names(mount.path / kind):
            if (mount.path / kind / pool).is_dir():
                files[f"{kind}/{pool}/.stats"] = mount.stats(f"{kind}/{pool}")
    negative = {
        f"{file}: {key}": value
        for file, values in files.items()
        for key, value in values.items()
        if value < 0
    }
    assert not negative, f"negative counters: {negative}"


def tmemfs_umount(mount: Mount) -> None:
    """`tmemfs umount` as a user would; the daemon must exit cleanly."""
    result = subprocess.run(
        [*TMEMFS, "umount", str(mount.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert mount.proc.wait(timeout=30) == 0, mount.log_text()
    assert not is_mounted(mount.path)


# -- round trips -----------------------------------------------------------------------------


def test_page_files_round_trip(redis_factory: RedisFactory, mount_factory: MountFactory) -> None:
    server = redis_factory()
    mount = mount_factory("--backend", server.url)
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    pages = {i * 7: mixed_page(i) for i in range(400)}
    for index, data in pages.items():
        store(fs / str(index), data)
    assert page_names(fs) == {str(i) for i in pages}
    for index, data in pages.items():
        assert load(fs / str(index)) == data, f"frontswap/0/{index}"
    assert (fs / "7").stat().st_size == PAGE
    assert server.dbsize() > 0, "no key in Redis: the pages are not stored there"

    # Overwrite, short write (zero-padded), unlink.
    store(fs / "7", random_page(1))
    assert load(fs / "7") == random_page(1)
    store(fs / "14", b"hello")
    assert load(fs / "14") == b"hello" + bytes(PAGE - 5)
    os.unlink(fs / "21")
    assert outcome(fs / "21") == errno.ENOENT
    assert "21" not in page_names(fs)

    obj = mount.path / "cleancache" / "cc" / "inode1"
    obj.parent.mkdir()
    obj.mkdir()
    for i in range(50):
        store(obj / str(i), mixed_page(i))
    for i in range(50):
        assert load(obj / str(i)) == mixed_page(i), "a cleancache page missed or changed"

    stats = mount.stats()
    missing = [c for c in (*SPEC_COUNTERS, "lost_pages") if c not in stats]
    assert not missing, f"global stats lack {missing}"
    assert stats["lost_pages"] == 0
    assert mount.stats("frontswap/0")["stored_pages"] == len(pages) - 1
    assert mount.stats("cleancache/cc")["stored_pages"] == 50
    assert_counters_sane(mount)


def test_image_direct_io_round_trip(
    redis_factory: RedisFactory, mount_factory: MountFactory, tmp_path: Path
) -> None:
    server = redis_factory()
    mount = mount_factory("--backend", server.url)
    img = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", str(16 * MiB), str(img)], check=True)
    source = tmp_path / "source"
    source.write_bytes(b"".join(mixed_page(i) for i in range(16 * MiB // PAGE)))

    before = mount.stats()["stores"]
    result = dd(f"if={source}", f"of={img}", "bs=1M", "oflag=direct", "conv=notrunc")
    assert result.returncode == 0, result.stderr
    assert mount.stats()["stores"] - before == 16 * MiB // PAGE, "stores count pages"
    assert mount.stats("frontswap/0")["stored_pages"] == 16 * MiB // PAGE

    copy = tmp_path / "copy"
    result = dd(f"if={img}", f"of={copy}", "bs=1M", "iflag=direct")
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == source.read_bytes()
    fs = mount.path / "frontswap" / "0"
    for k in (0, 1, 2, 4, 1000, 4095):
        assert load(fs / str(k)) == mixed_page(k), f"page file {k} differs from the image"

    # O_DIRECT from Python, unaligned to a MiB, over pages already stored.
    data = b"".join(random_page(100 + i) for i in range(64))
    direct_pwrite(img, 3 * PAGE, data)
    assert direct_pread(img, 3 * PAGE, len(data)) == data
    assert load(fs / "3") == random_page(100)
    assert direct_pread(img, 0, 3 * PAGE) == source.read_bytes()[: 3 * PAGE]


def test_flushed_pools_leave_redis(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """rmdir of a pool (or an object) frees the Redis memory its pages used."""
    server = redis_factory()
    mount = mount_factory("--backend", server.url)
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    baseline = server.used_memory()
    for i in range(600):
        store(fs / str(i), random_page(i))
    full = server.used_memory()
    assert full - baseline >= 600 * PAGE * 0.9, "the pages are not in Redis"
    os.rmdir(fs)
    deadline = time.monotonic() + 15
    while server.used_memory() > baseline + 600 * PAGE * 0.2:
        assert time.monotonic() < deadline, (
            f"Redis still holds {server.used_memory() - baseline} bytes 15 s after rmdir"
        )
        time.sleep(0.2)
    fs.mkdir()
    assert page_names(fs) == set()
    assert outcome(fs / "5") == errno.ENOENT


# -- Redis down, hung, back, empty -------------------------------------------------------------


def test_redis_killed_and_restarted_with_aof(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    server = redis_factory(aof=True)
    mount = mount_factory("--backend", server.url, *FAST)
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    obj = mount.path / "cleancache" / "cc" / "o"
    obj.parent.mkdir()
    obj.mkdir()
    pages = {i: random_page(i) for i in range(50)}
    for i, data in pages.items():
        store(fs / str(i), data)
    for i in range(10):
        store(obj / str(i), text_page(i))

    server.kill()
    err, took = timed(lambda: try_store(fs / "100", random_page(100)))
    assert err == errno.ENOSPC, f"a new store with Redis down: {name(err)}"
    assert took < SLOW_OP, f"a refused store took {took:.1f}s"
    err = try_store(fs / "5", random_page(5000))
    assert err == errno.ENOSPC, f"an overwrite with Redis down: {name(err)}"
    for i in range(10, 20):
        got, took = timed(lambda i=i: outcome(fs / str(i)))
        assert got == errno.EIO, f"frontswap/0/{i} with Redis down: {name(got)}"
        assert took < SLOW_OP, f"a failed load took {took:.1f}s"
    for i in range(3):
        got = outcome(obj / str(i))
        assert got == errno.ENOENT, f"cleancache page with Redis down: {name(got)}"
    assert mount.alive()
    mount.stats()  # the counters still answer
    assert mount.alive()

    server.restart()
    wait_until_stores_work(fs)
    pages.pop(5)  # the refused overwrite invalidated the old copy
    for i, data in pages.items():
        got = outcome(fs / str(i))
        assert got == data, f"frontswap/0/{i} after Redis came back: {name(got)}"
    assert outcome(fs / "5") == errno.ENOENT, "a refused overwrite left the old copy"
    assert outcome(fs / "100") == errno.ENOENT, "a refused store was kept"
    assert page_names(fs) == {str(i) for i in pages}
    store(fs / "200", random_page(200))
    assert load(fs / "200") == random_page(200)
    for i in range(10):  # cleancache: a hit must be right, a miss is allowed
        got = outcome(obj / str(i))
        assert got in (text_page(i), errno.ENOENT), f"cleancache page {i}: {name(got)}"
    assert mount.alive()


def test_unlink_and_rmdir_while_redis_is_down(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """What an invalidate did while Redis was away stays done when it is back."""
    server = redis_factory(aof=True)
    mount = mount_factory("--backend", server.url, *FAST)
    fs0, fs1 = mount.path / "frontswap" / "0", mount.path / "frontswap" / "1"
    fs0.mkdir()
    fs1.mkdir()
    for i in range(10):
        store(fs0 / str(i), random_page(i))
        store(fs1 / str(i), random_page(100 + i))
    server.kill()
    unlinked = errno_of(lambda: os.unlink(fs0 / "3"))
    flushed = errno_of(lambda: os.rmdir(fs1))
    assert unlinked in (0, errno.EIO), f"unlink with Redis down: {name(unlinked)}"
    assert flushed in (0, errno.EIO), f"rmdir with Redis down: {name(flushed)}"
    server.restart()
    wait_until_stores_work(fs0)
    if unlinked == 0:
        assert outcome(fs0 / "3") == errno.ENOENT, "an unlinked page came back"
    else:
        assert load(fs0 / "3") == random_page(3)
    if flushed == 0:
        assert not fs1.exists(), "a flushed pool came back"
        fs1.mkdir()
        assert page_names(fs1) == set(), "a flushed pool's pages came back"
    for i in (0, 1, 2, 4, 9):
        assert load(fs0 / str(i)) == random_page(i)


def test_hung_redis_times_out_and_recovers(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """A Redis that stops answering (SIGSTOP) costs the default 2 s deadline per call,
    and the replies it sends late, once resumed, are never taken for newer ones."""
    server = redis_factory()
    mount = mount_factory("--backend", server.url)  # default --remote-timeout: 2 s
    mount.expect_error(r"coredis: Connection attempt failed")  # the hang, as provoked
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    for i in range(8):
        store(fs / str(i), random_page(i))
    server.pause()
    try:
        got, took = timed(lambda: outcome(fs / "0"))
        assert got == errno.EIO, f"a load from a hung Redis: {name(got)}"
        assert took < 2 + 3.0, f"a load from a hung Redis took {took:.1f}s"
        err, took = timed(lambda: try_store(fs / "1", random_page(1001)))
        assert err == errno.ENOSPC, f"an overwrite into a hung Redis: {name(err)}"
        assert took < 2 * 2 + 3.0, f"a store into a hung Redis took {took:.1f}s"
        err = try_store(fs / "50", random_page(50))
        assert err == errno.ENOSPC, f"a store into a hung Redis: {name(err)}"
        assert mount.alive()
    finally:
        server.resume()
    # The late replies (a GET of page 0, SETs of pages 1 and 50) now arrive.
    for i in (4, 5, 6, 7, 0, 2, 3):
        got = outcome(fs / str(i))
        assert got == random_page(i), f"page {i} after the hang: {name(got)}"
    time.sleep(0.5)
    assert outcome(fs / "1") == errno.ENOENT, "a refused overwrite is readable after all"
    assert outcome(fs / "50") == errno.ENOENT, "a refused store is readable after all"
    assert page_names(fs) == {"0", "2", "3", "4", "5", "6", "7"}


def test_concurrent_io_across_a_hang(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """Eight threads store and load their own pages while Redis hangs for a while:
    every load is the last page stored or EIO, every store is kept or ENOSPC, and
    afterwards each page is exactly what its last store left (no reply taken for
    another's)."""
    server = redis_factory()
    mount = mount_factory("--backend", server.url, *FAST)
    mount.expect_error(r"coredis: Connection attempt failed")  # the hang, as provoked
    threads, per_thread = 8, 40
    for t in range(threads):
        (mount.path / "frontswap" / str(t)).mkdir()
    expected: list[dict[int, bytes | None]] = [{} for _ in range(threads)]
    problems: list[str] = []
    failures = [0] * threads  # refused stores and EIO loads: the hang was seen
    stop = threading.Event()

    def worker(t: int) -> None:
        pool = mount.path / "frontswap" / str(t)
        model = expected[t]
        r = 0
        while not stop.is_set():
            r += 1
            for i in range(per_thread):
                data = random_page(t * 1_000_000 + r * 1000 + i)
                err = try_store(pool / str(i), data)
                if err not in (0, errno.ENOSPC):
                    problems.append(f"store {t}/{i}: {name(err)}")
                failures[t] += err != 0
                model[i] = None if err else data
            for i in range(per_thread):
                got = outcome(pool / str(i))
                want = model[i]
                failures[t] += got == errno.EIO
                if got not in (errno.EIO, errno.ENOENT if want is None else want):
                    problems.append(f"load {t}/{i} in round {r}: {name(got)}")

    pool_threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool_threads:
        thread.start()
    time.sleep(0.5)
    server.pause()
    time.sleep(2.5)
    server.resume()
    time.sleep(0.5)
    stop.set()
    for thread in pool_threads:
        thread.join(timeout=120)
    assert not problems, problems[:20]
    assert sum(failures) > 0, "no operation met the hang"
    assert mount.alive()
    for t in range(threads):
        pool = mount.path / "frontswap" / str(t)
        for i, want in expected[t].items():
            got = outcome(pool / str(i))
            assert got == (errno.ENOENT if want is None else want), (
                f"frontswap/{t}/{i} after the hang: {name(got)}"
            )


def test_redis_restarted_empty_loses_pages_loudly(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    server = redis_factory()  # no persistence: a restart comes back empty
    mount = mount_factory("--backend", server.url, *FAST)
    mount.expect_error(r"page \d+ is lost: its store no longer has it")  # loudly, as asked
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    obj = mount.path / "cleancache" / "cc" / "o"
    obj.parent.mkdir()
    obj.mkdir()
    for i in range(20):
        store(fs / str(i), random_page(i))
        store(obj / str(i), random_page(i))
    assert mount.stats()["lost_pages"] == 0
    server.kill()
    server.restart()
    wait_until_stores_work(fs)
    for _ in range(2):  # a lost page stays lost (EIO), and is counted once
        for i in range(20):
            got = outcome(fs / str(i))
            assert got == errno.EIO, f"a frontswap page lost with Redis: {name(got)}"
    for i in range(20):
        got = outcome(obj / str(i))
        assert got == errno.ENOENT, f"a cleancache page lost with Redis: {name(got)}"
    lost = mount.stats()["lost_pages"]
    assert lost == 20, f"lost_pages is {lost} after 20 frontswap pages were lost"
    assert mount.alive()
    # The pool still works for new pages.
    store(fs / "100", random_page(100))
    assert load(fs / "100") == random_page(100)


def test_redis_out_of_memory_refuses_stores(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """A Redis at maxmemory (noeviction) refuses writes: the store is ENOSPC, nothing lost."""
    server = redis_factory(maxmemory="4mb")
    mount = mount_factory("--backend", server.url)
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    kept: dict[int, bytes] = {}
    refused = None
    for i in range(3000):
        err = try_store(fs / str(i), random_page(i))
        if err:
            assert err == errno.ENOSPC, f"store {i} into a full Redis: {name(err)}"
            refused = i
            break
        kept[i] = random_page(i)
    assert refused is not None, "4 MB of Redis took 3000 pages"
    assert kept, "a 4 MB Redis took no page at all"
    assert outcome(fs / str(refused)) == errno.ENOENT
    for i, data in kept.items():
        assert load(fs / str(i)) == data
    assert mount.alive()
    assert mount.stats()["lost_pages"] == 0


# -- remounts, namespaces, shared pools --------------------------------------------------------


def test_remount_finds_frontswap_pages(redis_factory: RedisFactory, tmp_path: Path) -> None:
    server = redis_factory(aof=True)
    mnt = tmp_path / "mnt"
    log = tmp_path / "mnt.log"
    fs_pages = {
        0: {i: mixed_page(i) for i in range(100)},
        3: {i * 1000: random_page(i) for i in range(20)},
    }
    first = start_mount(mnt, "--backend", server.url, log=log)
    try:
        for pool, pages in fs_pages.items():
            (mnt / "frontswap" / str(pool)).mkdir()
            for i, data in pages.items():
                store(mnt / "frontswap" / str(pool) / str(i), data)
        obj = mnt / "cleancache" / "cc" / "o"
        obj.parent.mkdir()
        obj.mkdir()
        store(obj / "1", text_page(1))
        tmemfs_umount(first)
    finally:
        first.unmount()

    with mounted(mnt, "--backend", server.url) as again:
        names = set(os.listdir(mnt / "frontswap"))
        assert {"0", "3"} <= names, f"frontswap pools after a remount: {sorted(names)}"
        for pool, pages in fs_pages.items():
            directory = mnt / "frontswap" / str(pool)
            assert page_names(directory) == {str(i) for i in pages}
            assert again.stats(f"frontswap/{pool}")["stored_pages"] == len(pages)
            for i, data in pages.items():
                got = outcome(directory / str(i))
                assert got == data, f"frontswap/{pool}/{i} after a remount: {name(got)}"
        # Cleancache is ephemeral: the pool may be gone, but never wrong.
        page = mnt / "cleancache" / "cc" / "o" / "1"
        if page.parent.exists():
            assert outcome(page) in (text_page(1), errno.ENOENT)
        store(mnt / "frontswap" / "0" / "5000", random_page(5000))
        assert again.stats()["lost_pages"] == 0

    # Another mount point on the same Redis has its own namespace: none of these pools.
    with mounted(tmp_path / "other", "--backend", server.url) as other:
        assert page_names(other.path / "frontswap") == set()


def test_remount_finds_the_images_with_their_sizes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """truncate, write, unmount, remount: `stat` and losetup find the same images."""
    if subprocess.run(["losetup", "-f"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("no free loop device on this machine")
    server = redis_factory()
    mnt = tmp_path / "mnt"
    sizes = {2: 3 * MiB + 8 * PAGE, 5: MiB, 7: MiB}  # 5 holds no page; 7.img is removed
    source = tmp_path / "source"
    source.write_bytes(os.urandom(3 * MiB))
    first = start_mount(mnt, "--backend", server.url, log=tmp_path / "mnt.log")
    try:
        frontswap = mnt / "frontswap"
        for n, size in sizes.items():
            subprocess.run(
                ["truncate", "-s", str(size), str(frontswap / f"{n}.img")], check=True, timeout=30
            )
        result = dd(
            f"if={source}",
            f"of={frontswap / '2.img'}",
            "bs=1M",
            "seek=0",
            "oflag=direct",
            "conv=notrunc",
        )
        assert result.returncode == 0, result.stderr
        os.unlink(frontswap / "7.img")
        tmemfs_umount(first)
    finally:
        first.unmount()

    expected = source.read_bytes() + bytes(8 * PAGE)
    with mounted(mnt, "--backend", server.url):
        frontswap = mnt / "frontswap"
        assert sorted(os.listdir(frontswap)) == ["2", "2.img", "5", "5.img", "7"]
        assert (frontswap / "2.img").stat().st_size == sizes[2]
        assert (frontswap / "5.img").stat().st_size == sizes[5]
        assert direct_pread(frontswap / "2.img", 0, sizes[2]) == expected
        assert direct_pread(frontswap / "5.img", 0, sizes[5]) == bytes(MiB)
        attached = subprocess.run(
            ["losetup", "--direct-io=on", "--read-only", "-f", "--show", str(frontswap / "2.img")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert attached.returncode == 0, attached.stderr
        device = attached.stdout.strip()
        try:
            size = subprocess.run(
                ["blockdev", "--getsize64", device],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            assert int(size) == sizes[2]
            assert direct_pread(Path(device), 0, sizes[2]) == expected
        finally:
            subprocess.run(["losetup", "-d", device], timeout=30, check=False)


def test_an_image_size_that_cannot_be_kept_is_refused(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """While Redis hangs, truncate of an image fails and changes nothing (no stale size
    for the next mount to find); once Redis is back it works."""
    server = redis_factory()
    mount = mount_factory("--backend", server.url, *FAST)
    image = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", str(MiB), str(image)], check=True, timeout=30)
    server.pause()
    try:
        result = subprocess.run(
            ["truncate", "-s", str(2 * MiB), str(image)], capture_output=True, text=True, timeout=30
        )
    finally:
        server.resume()
    assert result.returncode != 0 and "No space left" in result.stderr, result.stderr
    assert image.stat().st_size == MiB
    subprocess.run(["truncate", "-s", str(2 * MiB), str(image)], check=True, timeout=30)
    assert image.stat().st_size == 2 * MiB


def test_explicit_namespace_follows_the_pages(redis_factory: RedisFactory, tmp_path: Path) -> None:
    server = redis_factory()
    with mounted(tmp_path / "a", "--backend", server.url, "--namespace", "node7") as a:
        (a.path / "frontswap" / "0").mkdir()
        for i in range(30):
            store(a.path / "frontswap" / "0" / str(i), random_page(i))
    with mounted(tmp_path / "b", "--backend", server.url, "--namespace", "node7") as b:
        for i in range(30):
            assert load(b.path / "frontswap" / "0" / str(i)) == random_page(i)
    with mounted(tmp_path / "c", "--backend", server.url, "--namespace", "node8") as c:
        assert page_names(c.path / "frontswap") == set()


def test_shared_pool_across_two_mounts(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    server = redis_factory()
    a = mount_factory("--backend", server.url)
    b = mount_factory("--backend", server.url)
    shared = str(uuid.uuid4())
    for m in (a, b):
        (m.path / "cleancache" / shared).mkdir()
    (a.path / "cleancache" / shared / "obj").mkdir()
    store(a.path / "cleancache" / shared / "obj" / "1", random_page(1))

    on_b = b.path / "cleancache" / shared
    assert "obj" in page_names(on_b), "B does not see the object A made in a shared pool"
    assert load(on_b / "obj" / "1") == random_page(1)
    store(on_b / "obj" / "2", text_page(2))
    assert load(a.path / "cleancache" / shared / "obj" / "2") == text_page(2)
    # Coherency: after put A then put B, nobody gets A.
    store(on_b / "obj" / "1", random_page(11))
    assert outcome(a.path / "cleancache" / shared / "obj" / "1") in (random_page(11), errno.ENOENT)
    os.unlink(a.path / "cleancache" / shared / "obj" / "2")
    assert outcome(on_b / "obj" / "2") == errno.ENOENT

    # A pool that is not named by a UUID stays private to its mount.
    for m in (a, b):
        (m.path / "cleancache" / "private" / "obj").mkdir(parents=True)
    store(a.path / "cleancache" / "private" / "obj" / "1", random_page(1))
    assert outcome(b.path / "cleancache" / "private" / "obj" / "1") == errno.ENOENT


def test_shared_pool_removal_elsewhere_is_seen_at_once(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """What another mount removes from a shared pool is gone here at once, with no
    sleep: this kernel holds no name of it (issue 12, item 1)."""
    server = redis_factory()
    a = mount_factory("--backend", server.url)
    b = mount_factory("--backend", server.url)
    shared = str(uuid.uuid4())
    on_a, on_b = (m.path / "cleancache" / shared for m in (a, b))
    on_a.mkdir()
    on_b.mkdir()
    for round_ in range(10):
        (on_a / "obj").mkdir()
        store(on_a / "obj" / "1", random_page(round_))
        assert load(on_b / "obj" / "1") == random_page(round_)  # B looks them up
        assert os.stat(on_b / "obj").st_mode & 0o40000
        os.rmdir(on_a / "obj")
        assert errno_of(lambda: os.stat(on_b / "obj" / "1")) == errno.ENOENT, round_
        assert not (on_b / "obj").exists(), round_
        (on_b / "obj").mkdir()  # not EEXIST from a name B's kernel kept
        assert outcome(on_b / "obj" / "1") == errno.ENOENT
        os.rmdir(on_b / "obj")


# -- cluster --------------------------------------------------------------------------------------


def test_cluster_kill_one_master(
    redis_cluster: RedisCluster, mount_factory: MountFactory, tmp_path: Path
) -> None:
    mount = mount_factory("--backend", redis_cluster.url, *FAST)
    # Many pools: the daemon may keep a pool's pages together on one master, and
    # every master must hold some.
    pools = range(16)
    per_pool = 125
    for pool in pools:
        directory = mount.path / "frontswap" / str(pool)
        directory.mkdir()
        for i in range(per_pool):
            store(directory / str(i), random_page(pool * 10000 + i))
    img = mount.path / "frontswap" / "16.img"
    subprocess.run(["truncate", "-s", str(8 * MiB), str(img)], check=True)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(8 * MiB))
    result = dd(f"if={source}", f"of={img}", "bs=1M", "oflag=direct", "conv=notrunc")
    assert result.returncode == 0, result.stderr
    for pool in pools:
        for i in range(0, per_pool, 10):
            assert load(mount.path / "frontswap" / str(pool) / str(i)) == random_page(
                pool * 10000 + i
            )
    assert direct_pread(img, 0, 8 * MiB) == source.read_bytes()
    keys = [node.dbsize() for node in redis_cluster.nodes]
    assert all(keys), f"keys per master {keys}: the pages are not spread"

    busiest = max(redis_cluster.nodes, key=lambda node: node.dbsize())
    busiest.kill()
    results: dict[str, int] = {"right": 0, "EIO": 0}
    start = time.monotonic()
    for pool in pools:
        for i in range(0, per_pool, 5):
            got = outcome(mount.path / "frontswap" / str(pool) / str(i))
            if got == errno.EIO:
                results["EIO"] += 1
            else:
                assert got == random_page(pool * 10000 + i), (
                    f"frontswap/{pool}/{i} with one master dead: {name(got)}"
                )
                results["right"] += 1
    data = source.read_bytes()
    for k in range(8 * MiB // PAGE // 16):  # 64 KiB reads of the image
        try:
            got_bytes = direct_pread(img, k * 16 * PAGE, 16 * PAGE)
        except OSError as exc:
            assert exc.errno == errno.EIO, f"image read with one master dead: {exc}"
            results["EIO"] += 1
            continue
        assert got_bytes == data[k * 16 * PAGE : (k + 1) * 16 * PAGE], "image: wrong data"
        results["right"] += 1
    took = time.monotonic() - start
    assert results["EIO"] > 0, f"no load failed with a master dead: {results}"
    assert results["right"] > 0, f"no load worked with two masters alive: {results}"
    assert took < 60, f"{sum(results.values())} loads took {took:.0f}s with a master dead"
    assert mount.alive()


# -- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ("--backend", "redis://127.0.0.1:{port}/0"),
        ("--backend", "redis+cluster://127.0.0.1:{port}"),
        ("--writeback", "redis://127.0.0.1:{port}/0"),
        ("--backend", "redis://127.0.0.1:notaport/0"),
        ("--backend", "redis://127.0.0.1:{port}/0", "--remote-timeout", "-1"),
    ],
)
def test_unusable_remote_is_one_line_on_stderr(tmp_path: Path, option: tuple[str, ...]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    port = free_port()
    args = [arg.format(port=port) for arg in option]
    proc = subprocess.Popen(
        [*TMEMFS, "mount", "--foreground", *args, str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        proc.kill()
        proc.communicate()
        pytest.fail(f"tmemfs mounted with {args}")
    assert proc.returncode != 0, f"tmemfs accepted {args}"
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, f"{args}: stderr is {stderr!r}"
    assert not is_mounted(mnt)


def test_server_fixture_restart_keeps_aof(redis_factory: RedisFactory) -> None:
    """The infrastructure itself: a killed AOF server comes back with its data."""
    server: RedisServer = redis_factory(aof=True)
    assert server.cli("set", "k", "v") == "OK"
    server.kill()
    assert not server.running()
    server.restart()
    assert server.cli("get", "k") == "v"
