"""A daemon killed with SIGKILL: the mount point says so, and tmemfs cleans up after it.

The daemon runs as users run it (`tmemfs mount`, daemonized); its pid comes from
MNT/.daemon and only that pid is ever killed. Writers store pages in threads while
the daemon dies under them. With a Redis backend (AOF, fsync always) every store that
returned success before the kill is there again after the next `tmemfs mount` on
the same mount point (the default namespace is HOST:MOUNTPOINT).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_mounted
from redis_servers import RedisFactory
from tmemfs_testlib import load, page_names, try_store

from tmemfs import mount as tmemfs_mount

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

pytest_plugins = ["redis_servers"]  # the redis_factory fixture

TMEMFS = [sys.executable, "-m", "tmemfs"]
WRITERS = 4
STORM_SECONDS = 1.5


def tmemfs(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TMEMFS, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def daemon_pid(mnt: Path) -> int:
    pid = tmemfs_mount.daemon_pid(mnt)
    assert pid is not None, f"no pid in {mnt}/.daemon"
    return pid


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or -1
    return 0


def kill9(mnt: Path) -> int:
    """SIGKILL the mount's daemon (ours) and wait until the kernel says ENOTCONN."""
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), f"daemon {pid} to die")
    wait_for(lambda: stat_errno(mnt) == errno.ENOTCONN, "ENOTCONN at the mount point")
    return pid


@contextlib.contextmanager
def daemon_mounts(mnt: Path) -> Iterator[list[int]]:
    """Cleanup for every daemon the test starts at `mnt`: the test appends their pids."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        if is_mounted(mnt):
            tmemfs("umount", mnt)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], timeout=30, check=False)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def page_for(index: int) -> bytes:
    """A page that names its index and checks itself: a wrong or torn page shows."""
    head = f"page {index:08d} ".encode()
    body = (head * (4096 // len(head) + 1))[: 4096 - 16]
    return body + f"{sum(body) % 10**15:016d}".encode()


def storm(pool: Path, acked: list[set[int]], stop: threading.Event) -> list[threading.Thread]:
    """WRITERS threads storing distinct pages as fast as they can; acked[w] = successes."""

    def writer(w: int) -> None:
        index = w
        while not stop.is_set():
            try:
                err = try_store(pool / str(index), page_for(index))
            except OSError:
                return  # the mount is gone (ENOTCONN at open)
            if err:
                return
            acked[w].add(index)
            index += WRITERS

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(WRITERS)]
    for t in threads:
        t.start()
    return threads


def kill_during_storm(mnt: Path, pool: Path) -> set[int]:
    """Store from WRITERS threads, SIGKILL the daemon mid-storm; the acknowledged pages."""
    acked: list[set[int]] = [set() for _ in range(WRITERS)]
    stop = threading.Event()
    threads = storm(pool, acked, stop)
    time.sleep(STORM_SECONDS)
    kill9(mnt)
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a writer hangs on the dead mount"
    return set().union(*acked)


def test_kill9_during_write_storm_is_cleaned_by_umount_and_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with daemon_mounts(mnt) as pids:
        assert tmemfs("mount", "--log", tmp_path / "log1", mnt).returncode == 0
        pids.append(daemon_pid(mnt))
        (mnt / "frontswap" / "0").mkdir()
        stored = kill_during_storm(mnt, mnt / "frontswap" / "0")
        assert len(stored) > 100, f"only {len(stored)} stores before the kill"

        # The dead mount says so; `tmemfs umount` takes it away, no fusermount needed.
        assert is_mounted(mnt) and stat_errno(mnt / "stats") == errno.ENOTCONN
        done = tmemfs("umount", mnt)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)

        # Again, and this time the next `tmemfs mount` cleans the dead mount itself.
        assert tmemfs("mount", "--log", tmp_path / "log2", mnt).returncode == 0
        pids.append(daemon_pid(mnt))
        (mnt / "frontswap" / "0").mkdir()
        kill_during_storm(mnt, mnt / "frontswap" / "0")
        done = tmemfs("mount", "--log", tmp_path / "log3", mnt)
        assert done.returncode == 0, done.stderr
        pids.append(daemon_pid(mnt))
        assert page_names(mnt) == {"cleancache", "frontswap", "stats"}
        with open("/proc/self/mountinfo") as f:
            assert sum(line.split()[4] == str(mnt) for line in f) == 1
        done = tmemfs("umount", mnt)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: not alive(pids[-1]), "the daemon to exit after umount")
    for log in ("log2", "log3"):
        text = (tmp_path / log).read_text()
        assert "Traceback" not in text and "unexpected error" not in text


def test_redis_keeps_every_acknowledged_page_across_kill9(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    server = redis_factory(aof=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pool = mnt / "frontswap" / "0"
    with daemon_mounts(mnt) as pids:
        done = tmemfs("mount", "--backend", server.url, "--log", tmp_path / "log1", mnt)
        assert done.returncode == 0, done.stderr
        pids.append(daemon_pid(mnt))
        pool.mkdir()
        acked = kill_during_storm(mnt, pool)
        assert len(acked) > 50, f"only {len(acked)} stores before the kill"

        # Same mount point, same Redis: the next mount finds the pool and its pages.
        done = tmemfs("mount", "--backend", server.url, "--log", tmp_path / "log2", mnt)
        assert done.returncode == 0, done.stderr
        pids.append(daemon_pid(mnt))
        assert pool.is_dir(), "the frontswap pool did not come back"
        missing = [i for i in sorted(acked) if not (pool / str(i)).exists()]
        assert not missing, (
            f"{len(missing)} of {len(acked)} acknowledged pages lost: {missing[:10]}"
        )
        wrong = [i for i in sorted(acked) if load(pool / str(i)) != page_for(i)]
        assert not wrong, f"{len(wrong)} acknowledged pages read back wrong: {wrong[:10]}"
        # A store in flight at the kill may or may not be there, but never torn.
        for name in os.listdir(pool):
            if not name.startswith("."):
                assert load(pool / name) == page_for(int(name)), f"page {name} is torn"
        done = tmemfs("umount", mnt)
        assert done.returncode == 0, done.stderr
    text = (tmp_path / "log2").read_text()
    assert "Traceback" not in text and "unexpected error" not in text


@pytest.fixture(autouse=True)
def _no_leftover_loop_or_mount(tmp_path: Path) -> Iterator[None]:
    yield
    assert not is_mounted(tmp_path / "mnt"), "the test left its mount behind"
