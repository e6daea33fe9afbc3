"""Fixtures that run the real daemon: `tmemfs mount --foreground` through /dev/fuse.

Cleanup follows pyfuse3's own test util: a normal unmount, then a lazy one, then a
kill of the daemon we started (and only that one), always, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmemfs.engine import stats as statsfmt

TMEMFS = [sys.executable, "-m", "tmemfs"]
MOUNT_TIMEOUT = 20.0


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class Mount:
    """A running tmemfs daemon and its mount point."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.path = path
        self.proc = proc
        self.log = log

    def stats(self, pool: str | None = None) -> dict[str, int]:
        """The global stats file, or a pool's .stats ("frontswap/0", "cleancache/x")."""
        path = self.path / "stats" if pool is None else self.path / pool / ".stats"
        return statsfmt.counters(path.read_text())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def unmount(self) -> None:
        """Unmount as a user would, then make sure the daemon we started is gone."""
        try:
            if is_mounted(self.path):
                subprocess.run(["fusermount3", "-u", str(self.path)], timeout=15,
                               capture_output=True)
            if is_mounted(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], timeout=15,
                               capture_output=True)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def start_mount(path: Path, *args: str, log: Path) -> Mount:
    """Start `tmemfs mount --foreground ARGS PATH` and wait until the mount is there."""
    path.mkdir(parents=True, exist_ok=True)
    logf = open(log, "ab")  # noqa: SIM115 - the daemon keeps it open
    proc = subprocess.Popen(
        [*TMEMFS, "mount", "--foreground", *args, str(path)],
        stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    logf.close()
    mount = Mount(path, proc, log)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not is_mounted(path):
        if proc.poll() is not None:
            raise RuntimeError(f"tmemfs exited with {proc.returncode}:\n{mount.log_text()}")
        if time.monotonic() > deadline:
            mount.unmount()
            raise RuntimeError(f"tmemfs did not mount in {MOUNT_TIMEOUT}s:\n{mount.log_text()}")
        time.sleep(0.05)
    return mount


@contextlib.contextmanager
def mounted(path: Path, *args: str) -> Iterator[Mount]:
    """A mount for the duration of a with-block; the daemon must not have died."""
    mount = start_mount(path, *args, log=path.parent / f"{path.name}.log")
    try:
        yield mount
    finally:
        died = not mount.alive()
        mount.unmount()
        if died:
            pytest.fail(f"tmemfs died during the test:\n{mount.log_text()}")


@pytest.fixture
def tmem(tmp_path: Path) -> Iterator[Mount]:
    """A default mount (lz4, 20% budget) at a fresh mount point."""
    with mounted(tmp_path / "mnt") as mount:
        yield mount


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[object]:
    """mount_factory(*args) -> Mount, for tests that need options; all unmounted at the end."""
    stack = contextlib.ExitStack()
    counter = iter(range(1000))

    def factory(*args: str) -> Mount:
        return stack.enter_context(mounted(tmp_path / f"mnt{next(counter)}", *args))

    with stack:
        yield factory


def requires_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount tests run as root in CI)")


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name
