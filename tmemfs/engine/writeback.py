"""The writeback tier: moving the coldest frontswap pages down, out of the budget.

With --writeback, frontswap pages are not refused for want of room while the tier
takes them: `Engine._admit` sends a page that does not fit straight down, and this
module moves pages already held here down when the mount is full, as zswap's
shrinker writes back to swap:

- in the background (`WritebackTier.run`), while the mount holds more than the
  engine's accept_threshold (0.9) of --max-pool, as zswap's accept_threshold_percent;
- directly (`WritebackTier.reclaim`), before a store that may not fit.

Pages go coldest first, from the pool furthest over its weighted share first. A page
moved down keeps its index entry here, with a `Lowered` handle.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import trio

from tmemfs.backends.store import Location, PageStore, StoreUnavailable
from tmemfs.engine.copies import location_of
from tmemfs.engine.handles import Lowered
from tmemfs.engine.keys import PageKey
from tmemfs.engine.pool import Entry, Pool

if TYPE_CHECKING:
    from tmemfs.engine.engine import Engine

log = logging.getLogger(__name__)

# How many pages the writeback worker moves down at a time.
WRITEBACK_BATCH = 256


class WritebackTier:
    """The tier below an engine's backend, and the moving of pages down to it."""

    def __init__(self, store: PageStore, engine: Engine) -> None:
        self.store = store
        # The tier moves pages of this engine's index, charged to its pools.
        self._engine = engine
        self._wanted = trio.Event()
        # One move at a time (the background worker and a store's direct reclaim
        # would otherwise pick the same coldest pages and move them twice).
        self._lock = trio.Lock()

    def wake(self) -> None:
        """The mount is full: let the background worker move pages down."""
        self._wanted.set()

    def _movable(self) -> bool:
        return any(p.order for p in self._engine.pools.values() if p.persistent)

    async def run(self) -> None:
        """Move the coldest persistent pages down while the pool is over the threshold."""
        engine = self._engine
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            while (
                engine.pool_total_size() > engine.accept_threshold * engine.max_pool
                and self._movable()
            ):
                try:
                    moved = await self.write_back(WRITEBACK_BATCH)
                except StoreUnavailable as exc:
                    log.warning("writeback tier unavailable (%s); retrying in 1 s", exc)
                    await trio.sleep(1)
                    continue
                if not moved:
                    break

    async def reclaim(self, room: int) -> None:
        """Direct reclaim: before a store that may not fit, move the coldest persistent
        pages down until it does (or nothing is left to move), as the background worker
        would. Without it, requests that follow each other with no await between them
        never let the worker run, and the index entries of pages stored straight to the
        tier pushed pool_total_size past --max-pool."""
        budget = self._engine._budget
        while not budget.fits(room) and self._movable():
            try:
                if not await self.write_back(WRITEBACK_BATCH):
                    return
            except StoreUnavailable as exc:
                log.debug("direct reclaim stopped: %s", exc)
                return

    async def write_back(self, limit: int) -> int:
        """Move up to `limit` of the coldest persistent pages held here to the tier;
        how many were moved."""
        async with self._lock:
            return await self._write_back_locked(limit)

    async def _write_back_locked(self, limit: int) -> int:
        engine = self._engine
        batch: list[tuple[PageKey, Entry, Location, bytes]] = []
        for key in writeback_order(engine.pools.values(), limit):
            pool = engine.pools[key.pool]
            tobj = pool.objects[key.object]
            entry = tobj.pages[key.index]
            payload = engine.backend.payload_of(entry.handle)
            batch.append((key, entry, location_of(pool, tobj, key.index), payload))
        if not batch:
            return 0
        await self.store.put_many([(loc, payload) for _, _, loc, payload in batch])
        moved = 0
        for key, entry, _, payload in batch:
            pool = engine.pools.get(key.pool)
            tobj = pool.objects.get(key.object) if pool else None
            if pool is None or tobj is None or tobj.pages.get(key.index) != entry:
                # Invalidated or stored anew while it was being written; or a page of
                # its leaf was stored (an Entry tells stores apart by leaf: a skip that
                # is not needed, never a wrong move; the page goes on a later pass).
                # Marking the batch's pages Lowered one by one does not count as a store.
                continue
            # Its payload leaves this process; its entry stays, saying where it went.
            engine._release_here(pool, key, entry)
            tobj.pages.set_handle(key.index, Lowered(len(payload)))
            engine._count(pool, "written_back_pages")
            moved += 1
        return moved


def writeback_order(pools: Iterable[Pool], limit: int) -> list[PageKey]:
    """Up to `limit` pages to move down: the coldest of the pool furthest over its
    weighted share first (bytes held here per unit of weight), then the next."""
    held = sorted(
        (p for p in pools if p.persistent and p.order),
        key=lambda p: p.charged / p.weight,
        reverse=True,
    )
    keys: list[PageKey] = []
    for pool in held:
        keys += itertools.islice(pool.order, limit - len(keys))
        if len(keys) >= limit:
            break
    return keys


__all__ = ["WRITEBACK_BATCH", "WritebackTier", "writeback_order"]
