"""Backends and writeback tiers by name: adding one is a module and a line here."""

from __future__ import annotations

from collections.abc import Callable

import trio

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.lz4 import Lz4Backend
from tmemfs.backends.raw import RawBackend
from tmemfs.backends.redis import RedisBackend, RedisStore, is_redis_url, mask_url
from tmemfs.backends.store import PageStore

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "BackendError",
    "Encoded",
    "mask_url",
    "open_backend",
    "open_tier",
]

_LOCAL: dict[str, Callable[..., Backend]] = {
    "lz4": Lz4Backend,
    "raw": RawBackend,
}
BACKEND_NAMES = (*_LOCAL, "redis://…", "rediss://…", "redis+cluster://…")


class BackendError(Exception):
    """A backend that cannot be opened as asked (bad name, bad URL)."""


def check_backend(spec: str) -> None:
    """BackendError unless `spec` names a backend (for the command line, before forking)."""
    if spec in _LOCAL:
        if spec == "lz4":
            from tmemfs.backends.lz4 import MISSING

            if MISSING:
                raise BackendError(MISSING)
        return
    if is_redis_url(spec):
        try:
            from tmemfs.backends.redis import make_client

            make_client(spec, 1.0)
        except (ValueError, TypeError) as exc:
            raise BackendError(f"bad redis URL {mask_url(spec)}: {exc}") from None
        return
    raise BackendError(
        f"unknown backend {spec!r} (lz4, raw, or a redis://, rediss:// or redis+cluster:// URL)"
    )


def open_backend(
    spec: str,
    *,
    page_size: int,
    limiter: trio.CapacityLimiter,
    reject_ratio: float,
    recompress_after: float | None = None,
    recompress_level: int = 3,
    recompress_dict: bool = False,
    namespace: str = "tmemfs",
    timeout: float = 2.0,
) -> Backend:
    """The backend named by a --backend value."""
    check_backend(spec)
    if is_redis_url(spec):
        return RedisBackend(
            page_size,
            limiter,
            url=spec,
            namespace=namespace,
            timeout=timeout,
            reject_ratio=reject_ratio,
        )
    if spec == "lz4":
        return Lz4Backend(
            page_size,
            limiter,
            reject_ratio=reject_ratio,
            recompress_after=recompress_after,
            recompress_level=recompress_level,
            recompress_dict=recompress_dict,
        )
    return _LOCAL[spec](page_size, limiter)


def open_tier(
    target: str,
    *,
    page_size: int,
    limiter: trio.CapacityLimiter,
    namespace: str = "tmemfs",
    timeout: float = 2.0,
) -> PageStore:
    """The writeback tier named by a --writeback value: a redis URL or a file path."""
    if is_redis_url(target):
        return RedisStore(target, namespace=f"{namespace}:writeback", timeout=timeout)
    from tmemfs.backends.filestore import FileStore

    return FileStore(target, page_size, limiter)
