"""systemd knows when the mount is ready: the sd_notify protocol over a real socket.

The test plays systemd: it binds a unix datagram socket, passes it in NOTIFY_SOCKET
to `tmemfs mount --foreground` (as `Type=notify` does), and reads what arrives.
READY=1 must come only once the mount answers, a STATUS= line must show the pages
held and the compression ratio, and STOPPING=1 must come on the way out.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import is_mounted, start_mount
from tmemfs_testlib import text_page

from tmemfs.systemd import Notifier, status_line

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    try:
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket, timeout: float) -> dict[str, str]:
    """One datagram as {VARIABLE: value}; {} when none came in time."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return {}
    return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


def test_notifier_speaks_the_protocol(notify_socket: socket.socket) -> None:
    """The datagram format of sd_notify(3): VARIABLE=value lines, one datagram."""
    notifier = Notifier(notify_socket.getsockname())
    assert notifier.ready("starting")
    assert receive(notify_socket, 1) == {
        "READY": "1",
        "STATUS": "starting",
        "MAINPID": str(os.getpid()),
    }
    assert notifier.stopping()
    assert receive(notify_socket, 1)["STOPPING"] == "1"
    notifier.close()
    assert not Notifier("").enabled  # outside systemd: nothing to do, nothing sent


def test_status_line() -> None:
    line = status_line(
        {
            "stored_pages": 3,
            "orig_data_size": 3 * 4096,
            "compr_data_size": 4096,
            "pool_total_size": 2**20,
        }
    )
    assert line == "holding 3 pages (0.0 MiB) in 1.0 MiB; compression ratio 3.00"


def test_ready_only_once_the_mount_answers(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    mnt = tmp_path / "mnt"
    mount = start_mount(mnt, log=tmp_path / "mnt.log")
    try:
        deadline = time.monotonic() + 20
        ready: dict[str, str] = {}
        while not ready and time.monotonic() < deadline:
            message = receive(notify_socket, 1)
            if message.get("READY") == "1":
                ready = message
                # At the moment systemd hears READY=1, the mount is there and answers.
                assert is_mounted(mnt)
                assert (mnt / ".daemon").read_text().startswith("pid ")
        assert ready, f"no READY=1 came:\n{mount.log_text()}"
        assert ready["MAINPID"] == str(mount.proc.pid)
        assert ready["STATUS"].startswith("holding 0 pages")
        # Pages stored: a later STATUS= line says so, with the compression ratio.
        os.mkdir(mnt / "frontswap" / "0")
        for i in range(3):
            (mnt / "frontswap" / "0" / str(i)).write_bytes(text_page(i))
        status = ""
        while "holding 3 pages" not in status and time.monotonic() < deadline + 10:
            status = receive(notify_socket, 2).get("STATUS", status)
        assert "holding 3 pages" in status and "compression ratio " in status, status
        assert float(status.rsplit(" ", 1)[1]) > 1.5  # text pages compress well
    finally:
        mount.unmount()
    # On the way out: STOPPING=1 (after any STATUS= lines still queued).
    messages = []
    while message := receive(notify_socket, 2):
        messages.append(message)
    assert any(m.get("STOPPING") == "1" for m in messages), messages
    assert mount.proc.returncode == 0


def test_no_notify_socket_no_change(tmem: object) -> None:
    """Outside systemd the daemon mounts as before (the tmem fixture checks its log)."""
    assert "NOTIFY_SOCKET" not in os.environ
