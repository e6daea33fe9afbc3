"""Backends by name: adding one is a module and a line in `_REGISTRY`."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.lz4 import Lz4Backend
from tmemfs.backends.raw import RawBackend

__all__ = ["BACKEND_NAMES", "Backend", "BackendError", "Encoded", "open_backend"]

_REGISTRY: dict[str, Callable[..., Backend]] = {
    "lz4": Lz4Backend,
    "raw": RawBackend,
}
BACKEND_NAMES = tuple(_REGISTRY)


class BackendError(Exception):
    """A backend that cannot be opened as asked (bad name, unreachable server)."""


def open_backend(
    spec: str, *, page_size: int, limiter: trio.CapacityLimiter, reject_ratio: float
) -> Backend:
    """The backend named by a --backend value."""
    if spec == "lz4":
        return Lz4Backend(page_size, limiter, reject_ratio=reject_ratio)
    factory = _REGISTRY.get(spec)
    if factory is None:
        raise BackendError(f"unknown backend {spec!r} (choose from {', '.join(BACKEND_NAMES)})")
    return factory(page_size, limiter)
