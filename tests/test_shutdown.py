"""Stopping the daemon: SIGTERM unmounts when nothing holds the mount, and never
takes the mount from under a loop device that swaps or stores through it.
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
from conftest import Mount, is_mounted, start_mount
from tmemfs_testlib import load, store, text_page

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

TMEMFS = [sys.executable, "-m", "tmemfs"]
IMAGE_MIB = 16
WRITTEN_MIB = 4


@contextlib.contextmanager
def own_mount(tmp_path: Path) -> Iterator[Mount]:
    """A foreground daemon this test may signal; unmounted and reaped whatever happens."""
    mount = start_mount(tmp_path / "mnt", log=tmp_path / "daemon.log")
    try:
        yield mount
    finally:
        mount.unmount()


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """losetup --direct-io=on of the image; always detached again."""
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "-f", "--show", str(image)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


def test_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    with own_mount(tmp_path) as mount:
        (mount.path / "frontswap" / "0").mkdir()
        store(mount.path / "frontswap" / "0" / "1", text_page(1))
        mount.proc.send_signal(signal.SIGTERM)
        assert mount.proc.wait(timeout=15) == 0
        assert not is_mounted(mount.path)
        log = mount.log_text()
        assert "Traceback" not in log


def test_busy_mount_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    data = os.urandom(WRITTEN_MIB << 20)
    with own_mount(tmp_path) as mount:
        image = mount.path / "frontswap" / "0.img"
        subprocess.run(["truncate", "-s", f"{IMAGE_MIB}M", str(image)], check=True)
        with loop_device(image) as dev:
            (tmp_path / "data").write_bytes(data)
            subprocess.run(
                [
                    "dd",
                    f"if={tmp_path / 'data'}",
                    f"of={dev}",
                    "bs=1M",
                    "oflag=direct",
                    "status=none",
                ],
                check=True,
                timeout=60,
            )
            # `tmemfs umount` says no, in one line, and the mount stays.
            done = subprocess.run(
                [*TMEMFS, "umount", str(mount.path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 1
            assert len(done.stderr.strip().splitlines()) == 1 and "busy" in done.stderr
            assert is_mounted(mount.path) and mount.alive()
            # SIGTERM neither: the daemon keeps serving the loop device.
            mount.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert mount.alive() and is_mounted(mount.path)
            assert "busy" in mount.log_text()
            back = subprocess.run(
                ["dd", f"if={dev}", "bs=1M", f"count={WRITTEN_MIB}", "iflag=direct", "status=none"],
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
            assert back == data
        # Detached: every page written through the loop device is still there.
        assert mount.alive() and is_mounted(mount.path)
        pool = mount.path / "frontswap" / "0"
        for k in range(0, WRITTEN_MIB << 20 >> 12, 97):
            assert load(pool / str(k)) == data[k << 12 : (k + 1) << 12], f"page {k}"
        assert mount.stats("frontswap/0")["stored_pages"] == WRITTEN_MIB << 8
        # Now nothing holds it, and SIGTERM unmounts.
        mount.proc.send_signal(signal.SIGTERM)
        assert mount.proc.wait(timeout=15) == 0
        assert not is_mounted(mount.path)
