"""Fixtures that run the real daemon: `tmemfs mount --foreground` through /dev/fuse.

Cleanup follows pyfuse3's own test util: a normal unmount, then a lazy one, then a
kill of the daemon we started (and only that one), always, even when a test fails.
And as there, a test fails when its daemon died, exited non-zero, or logged an error
(ERROR, CRITICAL, a traceback) the test did not declare with `Mount.expect_error`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmemfs.engine import stats as statsfmt

TMEMFS = [sys.executable, "-m", "tmemfs"]
MOUNT_TIMEOUT = 20.0
# The start of a daemon log record: "2026-12-02 10:36:44,831 LEVEL logger: message".
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class Mount:
    """A running tmemfs daemon and its mount point."""

    def __init__(
        self, path: Path, proc: subprocess.Popen[bytes], log: Path, log_start: int = 0
    ) -> None:
        self.path = path
        self.proc = proc
        self.log = log
        # Log lines a test provokes on purpose (a lost page, a dead Redis).
        self.expected_errors: list[re.Pattern[str]] = []
        self._log_start = log_start  # where this daemon's lines begin in a shared log

    def expect_error(self, pattern: str) -> None:
        """Declare that the daemon may log an error matching `pattern` (a regex)."""
        self.expected_errors.append(re.compile(pattern))

    def unexpected_errors(self) -> list[str]:
        """Error records this daemon logged that no test declared (first line of each).

        A record is a timestamped log line with the lines that follow it (a traceback
        belongs to the line that logged it); it is an error at ERROR or CRITICAL, or
        when it holds a traceback.
        """
        text = self.log.read_bytes()[self._log_start :].decode(errors="replace")
        records: list[list[str]] = []
        for line in text.splitlines():
            if LOG_RECORD.match(line) or not records:
                records.append([line])
            else:
                records[-1].append(line)
        found = []
        for record in records:
            match = LOG_RECORD.match(record[0])
            level = match.group(1) if match else ""
            if level not in ("ERROR", "CRITICAL") and not any(
                line.startswith("Traceback ") for line in record
            ):
                continue
            whole = "\n".join(record)
            if not any(p.search(whole) for p in self.expected_errors):
                found.append(record[0])
        return found

    def stats(self, pool: str | None = None) -> dict[str, int]:
        """The global stats file, or a pool's .stats ("frontswap/0", "cleancache/x")."""
        path = self.path / "stats" if pool is None else self.path / pool / ".stats"
        return statsfmt.counters(path.read_text())

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def unmount(self) -> bool:
        """Unmount as a user would, then make sure the daemon we started is gone.

        True when it went by itself, False when it had to be killed.
        """
        killed = False
        try:
            if is_mounted(self.path):
                subprocess.run(
                    ["fusermount3", "-u", str(self.path)], timeout=15, capture_output=True
                )
            if is_mounted(self.path):
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(self.path)], timeout=15, capture_output=True
                )
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                killed = True
                self.proc.kill()
        return not killed


def start_mount(path: Path, *args: str, log: Path) -> Mount:
    """Start `tmemfs mount --foreground ARGS PATH` and wait until the mount is there."""
    path.mkdir(parents=True, exist_ok=True)
    logf = open(log, "ab")  # noqa: SIM115 - the daemon keeps it open
    log_start = logf.tell()
    proc = subprocess.Popen(
        [*TMEMFS, "mount", "--foreground", *args, str(path)],
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    logf.close()
    mount = Mount(path, proc, log, log_start)
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
        by_itself = mount.unmount()
        if died:
            pytest.fail(f"tmemfs died during the test:\n{mount.log_text()}")
        if by_itself and mount.proc.returncode != 0:
            pytest.fail(f"tmemfs exited with {mount.proc.returncode}:\n{mount.log_text()}")
        errors = mount.unexpected_errors()
        if errors:
            pytest.fail("tmemfs logged errors:\n" + "\n".join(errors[:20]))


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


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A 0755 directory every user can reach (pytest's tmp_path is root's 0700), for
    mounts that other users (setpriv) must reach."""
    path = Path(tempfile.mkdtemp(prefix="tmemfs-shared-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        # Only remove it once nothing is mounted inside; never rmtree a mount.
        if not any(is_mounted(p) for p in path.iterdir() if p.is_dir()):
            shutil.rmtree(path, ignore_errors=True)
