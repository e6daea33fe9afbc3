"""The stores under test, each a context manager that undoes itself.

tmemfs (a fresh daemon per use, so its memory starts from nothing), zram0 (reset
before and after: it is a shared kernel device), and tmpfs. Every exit path, an
exception or Ctrl-C included, runs the `finally` that unmounts or resets.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from bench.pagefiles import stats as read_stats
from bench.redis import TMEMFS
from bench.system import ZRAM_SYS, cpu_seconds, proc_stat, run, try_run, vm_rss, warn
from tmemfs.mount import daemon_pid

ZRAM_DEV = Path("/dev/zram0")
MM_STAT = (
    "orig_data_size",
    "compr_data_size",
    "mem_used_total",
    "mem_limit",
    "mem_used_max",
    "same_pages",
    "pages_compacted",
    "huge_pages",
    "huge_pages_since",
)


class TmemMount:
    """A tmemfs daemon this bench started, and its mount point."""

    def __init__(self, path: Path) -> None:
        self.path = path
        pid = daemon_pid(path)
        if pid is None:
            raise RuntimeError(f"{path}/.daemon names no pid")
        self.pid = pid

    def stats(self) -> dict[str, int]:
        return read_stats(self.path)

    def rss(self) -> int:
        return vm_rss(self.pid)

    def cpu(self) -> float:
        """Seconds of CPU the daemon has used."""
        return cpu_seconds(self.pid)

    def image(self, pool: int, size: int) -> Path:
        """Create frontswap/POOL.img of `size` bytes (and pool POOL)."""
        path = self.path / "frontswap" / f"{pool}.img"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)  # what truncate(1) does
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return path


@contextlib.contextmanager
def tmemfs(path: Path, *options: str) -> Iterator[TmemMount]:
    """Mount a new tmemfs on `path` (created here) and unmount it whatever happens."""
    path.mkdir(parents=True, exist_ok=False)
    pid = None
    try:
        run([*TMEMFS, "mount", *options, str(path)], timeout=60)
        mount = TmemMount(path)
        pid = mount.pid
        yield mount
    finally:
        unmount(path, pid)


def unmount(path: Path, pid: int | None) -> None:
    """`tmemfs umount`, else a lazy unmount, and the daemon we started is gone."""
    if os.path.ismount(path) and not try_run([*TMEMFS, "umount", str(path)], timeout=120):
        try_run(["fusermount3", "-u", "-z", str(path)], timeout=30)
    if pid is not None:
        stop_daemon(pid)
    if not os.path.ismount(path):
        with contextlib.suppress(OSError):
            path.rmdir()


def stop_daemon(pid: int, timeout: float = 30) -> None:
    """Wait for our daemon to exit after its unmount; kill it only if it hangs."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            warn(f"tmemfs daemon {pid} did not exit after unmount; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            return
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = proc_stat(pid)[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Zram:
    """zram0, set up with lz4 by `zram()`."""

    device = ZRAM_DEV

    @staticmethod
    def mm_stat() -> dict[str, int]:
        values = (ZRAM_SYS / "mm_stat").read_text().split()
        return dict(zip(MM_STAT, map(int, values), strict=False))


@contextlib.contextmanager
def zram(size: int) -> Iterator[Zram]:
    """zram0 with lz4 and `size` bytes, reset before and after."""
    zram_reset()
    try:
        (ZRAM_SYS / "comp_algorithm").write_text("lz4")
        (ZRAM_SYS / "disksize").write_text(str(size))
        yield Zram()
    finally:
        zram_reset()


def zram_reset() -> None:
    """Reset zram0; it is busy for a moment after a close or a swapoff, so retry."""
    for _ in range(50):
        try:
            (ZRAM_SYS / "reset").write_text("1")
            return
        except OSError:
            time.sleep(0.1)
    warn("cleanup: could not reset zram0; undo by hand: echo 1 > /sys/block/zram0/reset")


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=False)
    try:
        run(["mount", "-t", "tmpfs", "tmpfs", str(path)])
        yield path
    finally:
        if os.path.ismount(path):
            try_run(["umount", str(path)]) or try_run(["umount", "-l", str(path)])
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[int]:
    """A private redis-server on 127.0.0.1 (bench.redis starts it); yields its port."""
    from bench.redis import free_port, start_redis, stop_redis

    port = free_port()
    try:
        server = start_redis(directory, port)
    except SystemExit as exc:  # bench.redis says why and exits; here it is one failure
        raise RuntimeError(str(exc)) from None
    try:
        yield port
    finally:
        stop_redis(server)
