"""Helpers shared by the engine and backend unit tests: real backends, no FUSE."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from tmemfs.backends import Backend, open_backend
from tmemfs.engine import Engine, PoolId, PoolKind

PAGE = 4096
SWAP0 = PoolId(PoolKind.PERSISTENT, "0")


def make_backend(name: str = "lz4", reject_ratio: float = 0.875, tokens: int = 2) -> Backend:
    return open_backend(
        name, page_size=PAGE, limiter=trio.CapacityLimiter(tokens), reject_ratio=reject_ratio
    )


def make_engine(
    name: str = "raw",
    *,
    max_pool: int = 64 << 20,
    exclusive_gets: bool = False,
    reject_poor: bool = False,
    reject_ratio: float = 0.875,
    pools: Sequence[PoolId] = (),
) -> Engine:
    """An engine on backend `name` (not opened: local backends need no open), with `pools`."""
    engine = Engine(
        make_backend(name, reject_ratio),
        max_pool=max_pool,
        exclusive_gets=exclusive_gets,
        reject_poor=reject_poor,
    )
    for pool in pools:
        engine.create_pool(pool)
    return engine
