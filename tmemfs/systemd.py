"""systemd's readiness protocol (sd_notify(3)), in the few lines it takes.

Under `Type=notify`, systemd passes a unix datagram socket in $NOTIFY_SOCKET (a path,
or "@name" in the abstract namespace). A service sends newline-separated
VARIABLE=value lines to it: READY=1 once it serves, STATUS=... for `systemctl
status`, STOPPING=1 on its way out. Without $NOTIFY_SOCKET every call does nothing,
so the daemon calls these unconditionally. No library: the protocol is one sendto().
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """A connection to systemd's notification socket, or nothing outside systemd."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._warned = False
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send VARIABLE=value lines in one datagram; False if it could not be sent."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._warned:  # systemd gone or the socket full: say it once
                log.warning(
                    "cannot notify systemd at %s: %s",
                    os.environ.get("NOTIFY_SOCKET", self._address),
                    exc.strerror,
                )
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str = "unmounting") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(stats: dict[str, int]) -> str:
    """What `systemctl status` shows: pages held, their memory, the compression ratio."""
    pages = stats.get("stored_pages", 0)
    orig = stats.get("orig_data_size", 0)
    compr = stats.get("compr_data_size", 0)
    total = stats.get("pool_total_size", 0)
    ratio = f"{orig / compr:.2f}" if compr else "-"
    return (
        f"holding {pages} pages ({orig / 2**20:.1f} MiB) in "
        f"{total / 2**20:.1f} MiB; compression ratio {ratio}"
    )
