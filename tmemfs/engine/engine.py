"""The tmem engine: every tmem operation and rule, with no knowledge of FUSE.

A store is decided in one place, `_admit`, top to bottom as zswap_store does it:
replace the old copy, refuse poor compression if asked, make room (evicting
ephemeral pages first), keep the page. The budget counts real memory: the
backend's payloads and handles plus the engine's own per-page index entry.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from tmemfs.backends.base import Backend, Encoded
from tmemfs.engine.errors import NoSuchObject, NoSuchPool, PoolExists, StoreRejected
from tmemfs.engine.keys import SWAP_OBJECT, PageKey, PoolId, PoolKind
from tmemfs.engine.pool import Entry, Owner, Pool, TmemObject
from tmemfs.engine.stats import new_counters

log = logging.getLogger(__name__)

# What one index entry costs in CPython: the Entry (48), its mtime int (32) and its
# slot in the object's dict with the index int (~80). Measured with tracemalloc.
ENTRY_OVERHEAD = 160


class Engine:
    """Pools of pages over one backend, within a memory budget."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_pool: int,
        exclusive_gets: bool = False,
        reject_poor: bool = False,
    ) -> None:
        self.backend = backend
        self.page_size = backend.page_size
        self.max_pool = max_pool
        self.exclusive_gets = exclusive_gets
        self.reject_poor = reject_poor
        self.pools: dict[PoolId, Pool] = {}
        self.counters = new_counters()
        self._entries = 0
        # Ephemeral pages, least recently used first: the eviction order.
        self._lru: OrderedDict[PageKey, None] = OrderedDict()

    # -- pools and objects -------------------------------------------------------------

    def create_pool(self, pool_id: PoolId, owner: Owner | None = None) -> Pool:
        """frontswap init(type) or cleancache init_fs/init_shared_fs."""
        if pool_id in self.pools:
            raise PoolExists(str(pool_id))
        pool = self.pools[pool_id] = Pool.create(pool_id, owner or Owner())
        log.debug("created pool %s", pool_id)
        return pool

    def pool(self, pool_id: PoolId) -> Pool:
        try:
            return self.pools[pool_id]
        except KeyError:
            raise NoSuchPool(str(pool_id)) from None

    def get_object(self, pool_id: PoolId, obj: str) -> TmemObject:
        try:
            return self.pool(pool_id).objects[obj]
        except KeyError:
            raise NoSuchObject(f"{pool_id}/{obj}") from None

    def create_object(self, pool_id: PoolId, obj: str, owner: Owner | None = None) -> TmemObject:
        """A cleancache object directory; frontswap pools have exactly one object."""
        pool = self.pool(pool_id)
        if pool.persistent or obj in pool.objects:
            raise PoolExists(f"{pool_id}/{obj}")
        tobj = pool.objects[obj] = TmemObject(owner or Owner())
        return tobj

    def flush_pool(self, pool_id: PoolId) -> int:
        """frontswap invalidate_area / cleancache invalidate_fs: drop the pool and its pages."""
        pool = self.pool(pool_id)
        dropped = sum(self._drop_object(pool, name) for name in list(pool.objects))
        del self.pools[pool_id]
        log.debug("flushed pool %s (%d pages)", pool_id, dropped)
        return dropped

    def invalidate_object(self, pool_id: PoolId, obj: str) -> int:
        """cleancache invalidate_inode: drop an object and every page in it."""
        pool = self.pool(pool_id)
        if pool.persistent or obj not in pool.objects:
            raise NoSuchObject(f"{pool_id}/{obj}")
        dropped = self._drop_object(pool, obj)
        del pool.objects[obj]
        return dropped

    def _drop_object(self, pool: Pool, name: str) -> int:
        pages = pool.objects[name].pages
        for index, entry in pages.items():
            self._release(pool, PageKey(pool.id, name, index), entry)
        count = len(pages)
        pages.clear()
        self._count(pool, "invalidates", count)
        return count

    # -- store -------------------------------------------------------------------------

    async def store(self, key: PageKey, page: bytes) -> None:
        """Store one full page; StoreRejected if it is refused."""
        (stored,) = await self.store_many(key.pool, key.object, [(key.index, page)])
        if not stored:
            raise StoreRejected(str(key))

    async def store_many(
        self, pool_id: PoolId, obj: str, pages: Sequence[tuple[int, bytes]]
    ) -> list[bool]:
        """Store full pages of one object; returns, per page, whether it was kept."""
        self.get_object(pool_id, obj)
        encoded = await self.backend.encode_many([page for _, page in pages])
        # No await from here on: the batch is admitted against one consistent state.
        # The pool may have been flushed (or flushed and made anew) while we encoded.
        tobj = self.get_object(pool_id, obj)
        pool = self.pools[pool_id]
        now = time.time_ns()
        return [
            self._admit(pool, tobj, PageKey(pool_id, obj, index), enc, now)
            for (index, _), enc in zip(pages, encoded, strict=True)
        ]

    def _admit(self, pool: Pool, tobj: TmemObject, key: PageKey, enc: Encoded, now: int) -> bool:
        # 1. A store replaces the old copy; if this store is refused, the old copy must
        #    not be returned either (frontswap's duplicate-store rule), so drop it first.
        old = tobj.pages.pop(key.index, None)
        if old is not None:
            self._count(pool, "duplicate_entry")
            self._count(pool, "invalidates")
            self._release(pool, key, old)
        # 2. Poor compression: kept raw by default, refused with --reject-poor (compress_poor).
        if enc.poor and self.reject_poor:
            self._count(pool, "reject_compress_poor")
            return False
        # 3. The budget: evict ephemeral pages, least recently used first, before refusing.
        if not self._make_room(enc.cost + ENTRY_OVERHEAD):
            self._count(pool, "pool_limit_hit")
            return False
        # 4. Keep it.
        tobj.pages[key.index] = Entry(self.backend.store(enc), now)
        self._entries += 1
        if not pool.persistent:
            self._lru[key] = None
        self._count(pool, "stores")
        return True

    def _make_room(self, cost: int) -> bool:
        while self.pool_total_size() + cost > self.max_pool:
            if not self._lru:
                return False
            victim, _ = self._lru.popitem(last=False)
            self._evict(victim)
        return True

    def _evict(self, key: PageKey) -> None:
        pool = self.pools[key.pool]
        entry = pool.objects[key.object].pages.pop(key.index)
        self._release(pool, key, entry)
        self._count(pool, "evicted_pages")

    def _release(self, pool: Pool, key: PageKey, entry: Entry) -> None:
        """Forget an entry that has been removed from its object's index."""
        self.backend.invalidate(entry.handle)
        self._entries -= 1
        if not pool.persistent:
            self._lru.pop(key, None)

    # -- load --------------------------------------------------------------------------

    async def load(self, key: PageKey) -> bytes | None:
        """Load one page; None on a miss."""
        (page,) = await self.load_many(key.pool, key.object, [key.index])
        return page

    async def load_many(
        self, pool_id: PoolId, obj: str, indexes: Iterable[int], *, exclusive: bool = True
    ) -> list[bytes | None]:
        """Load pages of one object; None for each miss.

        `exclusive=False` never invalidates on load, whatever --exclusive-gets says: a
        block device's reader (the image) may read a block again and must find it.
        """
        pool = self.pool(pool_id)
        tobj = self.get_object(pool_id, obj)
        exclusive = exclusive and self.exclusive_gets and not pool.shared
        indexes = list(indexes)
        if exclusive:
            # Taken out of the index before the await, so no other load can get them too.
            entries = [self._take(pool, tobj, PageKey(pool_id, obj, i)) for i in indexes]
        else:
            entries = [tobj.pages.get(index) for index in indexes]
        hits = [(i, e) for i, e in zip(indexes, entries, strict=True) if e is not None]
        if not exclusive and not pool.persistent:
            for index, _ in hits:
                self._lru.move_to_end(PageKey(pool_id, obj, index))
        try:
            # Holding the handles keeps their payloads alive even if invalidated meanwhile.
            data = iter(await self.backend.load_many([e.handle for _, e in hits]))
        except BaseException:
            if exclusive:
                self._put_back(pool, tobj, obj, hits)
            raise
        if exclusive:
            for _, entry in hits:
                self.backend.invalidate(entry.handle)
            self._count(pool, "invalidates", len(hits))
        self._count(pool, "loads", len(hits))
        self._count(pool, "load_misses", len(entries) - len(hits))
        return [None if e is None else next(data) for e in entries]

    def _take(self, pool: Pool, tobj: TmemObject, key: PageKey) -> Entry | None:
        """Remove an entry for an exclusive get; its handle is released after decoding."""
        entry = tobj.pages.pop(key.index, None)
        if entry is not None:
            self._entries -= 1
            if not pool.persistent:
                self._lru.pop(key, None)
        return entry

    def _put_back(
        self, pool: Pool, tobj: TmemObject, name: str, taken: list[tuple[int, Entry]]
    ) -> None:
        """An exclusive get that did not complete (cancelled, failed) loses nothing."""
        alive = self.pools.get(pool.id) is pool and pool.objects.get(name) is tobj
        for index, entry in taken:
            if alive and index not in tobj.pages:
                tobj.pages[index] = entry
                self._entries += 1
                if not pool.persistent:
                    self._lru[PageKey(pool.id, name, index)] = None
            else:
                # Flushed, or stored anew, meanwhile: this copy is no longer wanted.
                self.backend.invalidate(entry.handle)

    # -- invalidate --------------------------------------------------------------------

    def invalidate_page(self, key: PageKey) -> bool:
        """frontswap invalidate_page / cleancache invalidate_page; False if it was absent."""
        pool = self.pool(key.pool)
        entry = self.get_object(key.pool, key.object).pages.pop(key.index, None)
        if entry is None:
            return False
        self._release(pool, key, entry)
        self._count(pool, "invalidates")
        return True

    def invalidate_range(self, pool_id: PoolId, obj: str, start: int) -> int:
        """Invalidate every page of an object with index >= start (a shrinking truncate)."""
        pool = self.pool(pool_id)
        pages = self.get_object(pool_id, obj).pages
        doomed = [i for i in pages if i >= start]
        for index in doomed:
            self._release(pool, PageKey(pool_id, obj, index), pages.pop(index))
        self._count(pool, "invalidates", len(doomed))
        return len(doomed)

    # -- the block image -----------------------------------------------------------------

    async def resize_image(self, pool_id: PoolId, size: int) -> None:
        """Give a frontswap pool a block image of `size` bytes (made with the pool if needed).

        Shrinking invalidates the pages past the new end, and zeroes the tail of a page
        the new end cuts, so that growing again shows zeros, as a file would.
        """
        if pool_id.kind is not PoolKind.PERSISTENT:
            raise NoSuchPool(str(pool_id))
        pool = self.pools.get(pool_id) or self.create_pool(pool_id)
        old = pool.image_size or 0
        pool.image_size = size
        if size >= old:
            return
        cut, partial = divmod(size, self.page_size)
        self.invalidate_range(pool_id, SWAP_OBJECT, cut + (1 if partial else 0))
        if partial:
            (page,) = await self.load_many(pool_id, SWAP_OBJECT, [cut], exclusive=False)
            if page is not None:
                await self.store(PageKey(pool_id, SWAP_OBJECT, cut), page[:partial].ljust(
                    self.page_size, b"\0"))

    def remove_image(self, pool_id: PoolId) -> None:
        """Unlink the image: the view goes, the pool and its pages stay."""
        pool = self.pool(pool_id)
        if pool.image_size is None:
            raise NoSuchPool(f"{pool_id}.img")
        pool.image_size = None

    # -- inspection --------------------------------------------------------------------

    def entry(self, key: PageKey) -> Entry | None:
        """The index entry of a page, without loading it (for stat and lookup)."""
        pool = self.pools.get(key.pool)
        tobj = pool.objects.get(key.object) if pool else None
        return tobj.pages.get(key.index) if tobj else None

    def page_cost(self, entry: Entry) -> float:
        """Compressed bytes charged to one page; what st_blocks reports."""
        return self.backend.payload_share(entry.handle)

    def pool_total_size(self) -> int:
        """All memory held for pages: backend payloads and handles, and the index."""
        return self.backend.memory_used() + self._entries * ENTRY_OVERHEAD

    def pool_stats(self, pool_id: PoolId) -> dict[str, int]:
        """A pool's counters. The gauges are summed over its pages when asked."""
        pool = self.pool(pool_id)
        backend = self.backend
        stored = same = shared = 0
        compressed = 0.0
        for tobj in pool.objects.values():
            for entry in tobj.pages.values():
                handle: Any = entry.handle
                stored += 1
                compressed += backend.payload_share(handle)
                same += backend.is_same_filled(handle)
                shared += backend.is_shared(handle)
        total = round(compressed) + stored * ENTRY_OVERHEAD
        if stored:
            # The pool's share of per-handle overhead, pro rata by pages.
            total += round((backend.memory_used() - backend.stats()["compr_data_size"])
                           * stored / max(self._entries, 1))
        gauges = {
            "stored_pages": stored,
            "orig_data_size": stored * self.page_size,
            "compr_data_size": round(compressed),
            "pool_total_size": total,
            "same_filled_pages": same,
            "dedup_pages": shared,
        }
        return gauges | pool.counters

    def stats(self) -> dict[str, int]:
        """Global counters: gauges of the whole backend, events summed over all pools ever."""
        backend = self.backend.stats()
        gauges = {
            "stored_pages": self._entries,
            "orig_data_size": self._entries * self.page_size,
            "compr_data_size": backend["compr_data_size"],
            "pool_total_size": self.pool_total_size(),
            "same_filled_pages": backend["same_filled_pages"],
            "dedup_pages": backend["dedup_pages"],
        }
        return gauges | self.counters | {
            "max_pool_size": self.max_pool,
            "page_size": self.page_size,
            "pools": len(self.pools),
        }

    def _count(self, pool: Pool, name: str, n: int = 1) -> None:
        pool.counters[name] += n
        self.counters[name] += n


__all__ = ["ENTRY_OVERHEAD", "SWAP_OBJECT", "Engine", "PoolKind"]
