"""The tmem engine: every tmem operation and rule, with no knowledge of FUSE.

`Engine` holds the pools and their index, and runs each tmem operation: store, load,
invalidate, flush, and the shared pools' and the block image's. A store is decided
in one place, `Engine._admit`, top to bottom as zswap_store does it: replace the old
copy, refuse poor compression if asked, make room (evicting ephemeral pages first),
then keep the page here, send it down to the writeback tier, or refuse it. `_keep`
then carries the decision out and `_insert_many` indexes what was kept. The budget
counts real memory: the backend's payloads and handles plus the page index (a
compiled table per object, tmemfs/_pagetable.pyx), charged at what a page costs it
in a full leaf.

Pages may live in three places: the backend in this process (lz4, raw), a remote
backend (redis), or the writeback tier under a local backend. The index here is
the truth for what a mount has stored; a remote backend is asked only for data.
An entry's handle says which (handles.py: `held_here`, `in_tier`, `is_lost`).

The other jobs live beside it, each with the state it owns:

- budget.py: `Budget`, the limits (--max-pool, --max-pool-per-user, `.max`), the
  fair shares by `.weight`, making room, and which pool loses a page;
- writeback.py: `WritebackTier`, its lock and worker, moving cold pages down;
- copies.py: `CopiesElsewhere`, deleting the remote's and the tier's copies of
  released pages, now or at the end of a pool's mutation;
- inspection.py: what a page costs and the counters (`pool_stats`, `stats`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import trio

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.codec import decode_payloads, payload_of
from tmemfs.backends.store import PageStore, StoreUnavailable
from tmemfs.engine import inspection
from tmemfs.engine.budget import (
    DEFAULT_WEIGHT,
    ENTRY_OVERHEAD,
    MAX_WEIGHT,
    MIN_WEIGHT,
    Budget,
    check_weight,
)
from tmemfs.engine.copies import CopiesElsewhere, location_of, locations_of
from tmemfs.engine.errors import (
    BadValue,
    NoSuchObject,
    NoSuchPool,
    PageLost,
    PoolExists,
    StoreRejected,
)
from tmemfs.engine.handles import LOST, Handle, Lost, Lowered, held_here, in_tier, is_lost
from tmemfs.engine.keys import SWAP_OBJECT, PageKey, PoolId, PoolKind
from tmemfs.engine.pool import Entry, IndexMemory, Owner, PageTable, Pool, TmemObject
from tmemfs.engine.stats import new_counters
from tmemfs.engine.writeback import WritebackTier
from tmemfs.sizes import format_size

log = logging.getLogger(__name__)

# At most one log line about refused stores in this many seconds.
REFUSAL_LOG_INTERVAL = 10.0


class Decision(enum.Enum):
    """What `Engine._admit` decides for one page."""

    KEEP = "keep"  # held by the backend (here, or remotely)
    LOWER = "lower"  # sent straight down to the writeback tier
    REFUSE = "refuse"  # not stored; its old copy is gone too


class Engine:
    """Pools of pages over one backend (and optionally a writeback tier), within a budget."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_pool: int,
        exclusive_gets: bool = False,
        reject_poor: bool = False,
        writeback: PageStore | None = None,
        accept_threshold: float = 0.9,
        max_pool_per_user: int | None = None,
    ) -> None:
        self.backend = backend
        self.page_size = backend.page_size
        self.exclusive_gets = exclusive_gets
        self.reject_poor = reject_poor
        self.writeback = writeback
        # Like zswap's accept_threshold_percent: once full, write back down to this.
        self.accept_threshold = accept_threshold
        self.pools: dict[PoolId, Pool] = {}
        # --max-pool, --max-pool-per-user, the pools' .max and .weight (budget.py).
        self._budget = Budget(
            self.pools,
            max_pool=max_pool,
            max_pool_per_user=max_pool_per_user,
            total=self.pool_total_size,
            evict=self._evict,
        )
        # Moves the coldest frontswap pages down when full (writeback.py).
        self._tier = WritebackTier(writeback, self) if writeback is not None else None
        # The remote's and the tier's copies of released pages (copies.py).
        self._copies = CopiesElsewhere(backend, writeback)
        self.counters = new_counters()
        self.counters["lost_pages"] = 0
        # Every page table of this engine counts its bytes and pages here.
        self._index = IndexMemory()
        self._last_stamp = 0
        self._refusals = 0
        self._refusals_logged = -REFUSAL_LOG_INTERVAL
        # Counts uses of pages: the eviction and writeback orders live in each pool
        # (Pool.order), and a page's tick there tells which pool's oldest is oldest.
        self._tick = 0
        self._locks: dict[PoolId, trio.Lock] = {}
        self._serialize = backend.remote or writeback is not None
        # Told of every page, object and pool that goes away, whatever the reason, so
        # that whoever shows them (the FUSE adapter: the kernel's name cache) forgets
        # them too. Called as on_gone(pool, tobj, indexes): the pages `indexes` of
        # `tobj`; indexes None is the whole object; tobj None is the whole pool.
        self.on_gone: Callable[[Pool, TmemObject | None, Sequence[int] | None], None] | None
        self.on_gone = None

    # -- life --------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the backend and tier; bring back the persistent pools a remote holds."""
        await self.backend.open()
        if self.writeback is not None:
            await self.writeback.open()
        for restored in await self.backend.restore():
            pool = self.create_pool(restored.pool)
            pool.generation = restored.generation
            pool.image_size = restored.image_size
            tobj = pool.objects[SWAP_OBJECT]
            now = self._stamp()
            for index, handle in restored.pages.items():
                tobj.pages.put(index, handle, now)
                pool.charged += self._charge(handle)
            log.info("restored %s: %d pages", restored.pool, len(restored.pages))

    async def close(self) -> None:
        if self.writeback is not None:
            await self.writeback.close()
        await self.backend.close()

    async def run_writeback(self) -> None:
        """Move the coldest persistent pages down while the pool is over the threshold."""
        if self._tier is not None:
            await self._tier.run()

    async def run_recompress(self) -> None:
        """Recompress cold pages in the background, if the backend does (lz4: zstd)."""
        counters = self.counters
        await self.backend.run_recompress(lambda: counters["stores"] + counters["loads"])

    @property
    def max_pool(self) -> int:
        """--max-pool: what every pool's pages and the index may hold together."""
        return self._budget.max_pool

    @max_pool.setter
    def max_pool(self, size: int) -> None:
        self._budget.max_pool = size

    @property
    def max_pool_per_user(self) -> int | None:
        """--max-pool-per-user: what the pools of one non-root owner may hold together."""
        return self._budget.max_pool_per_user

    @max_pool_per_user.setter
    def max_pool_per_user(self, size: int | None) -> None:
        self._budget.max_pool_per_user = size

    # -- pools and objects -------------------------------------------------------------

    def create_pool(self, pool_id: PoolId, owner: Owner | None = None) -> Pool:
        """frontswap init(type) or cleancache init_fs/init_shared_fs."""
        if pool_id in self.pools:
            raise PoolExists(str(pool_id))
        pool = self.pools[pool_id] = Pool.create(pool_id, owner or Owner(), self._index)
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
        return pool.objects.setdefault(
            obj, TmemObject(owner or Owner(), obj, PageTable(self._index))
        )

    # -- fair shares: limits and weights --------------------------------------------------

    def set_max_size(self, pool_id: PoolId, limit: int | None) -> None:
        """A pool's own limit (`.max`); None: none. A cleancache pool over its new limit
        loses its oldest pages now; a frontswap pool keeps its pages (they are never
        dropped) and has its stores refused until it is under the limit again."""
        if limit is not None and limit < 0:
            raise BadValue(f"{pool_id}/.max: {limit}")
        pool = self.pool(pool_id)
        pool.max_size = limit
        if limit is not None and not pool.persistent:
            while pool.charged > limit and pool.order:
                self._evict(pool)
            self.backend.trim()

    def set_weight(self, pool_id: PoolId, weight: int) -> None:
        """A pool's weight (`.weight`): how much of what is shared it may keep."""
        check_weight(pool_id, weight)
        self.pool(pool_id).weight = weight

    def pool_shares(self, pool_id: PoolId) -> dict[str, int | None]:
        """A pool's limits, weight and what they count: `max_size` (None: no limit of its
        own), `user_max_size` (its owner's; None: none), `weight`, `charged_size`, and
        `weighted_share` (bytes its weight entitles it to of what pools of its kind hold)."""
        return self._budget.shares(self.pool(pool_id))

    # -- shared pools --------------------------------------------------------------------

    def _remote_shared(self, pool: Pool) -> bool:
        return self.backend.remote and pool.shared

    def refreshes_shared(self, pool_id: PoolId) -> bool:
        """Whether `refresh_shared` of this pool asks the remote (and so waits): a
        shared pool on a remote backend. Any other pool's index is all there is."""
        pool = self.pools.get(pool_id)
        return pool is not None and self._remote_shared(pool)

    async def publish_object(self, pool_id: PoolId, obj: str) -> None:
        """After mkdir of an object in a shared pool: the other mounts see it too."""
        pool = self.pool(pool_id)
        if self._remote_shared(pool):
            try:
                await self.backend.publish_object(location_of(pool, pool.objects[obj], 0))
            except StoreUnavailable as exc:
                log.warning("could not share %s/%s: %s", pool_id, obj, exc)

    async def refresh_shared(self, pool_id: PoolId, obj: str | None = None) -> None:
        """Bring a shared pool's objects, or an object's pages, up to what the remote holds.

        Other mounts store and invalidate in a shared pool; this mount's index of it is
        only a cache. If the remote cannot answer, the cached view stands (the pool is
        ephemeral, so a stale entry only means a miss later).
        """
        pool = self.pools.get(pool_id)
        if pool is None or not self._remote_shared(pool):
            return
        try:
            if obj is None:
                names = set(await self.backend.shared_objects(str(pool_id)))
                for name in names.difference(pool.objects):
                    self.create_object(pool_id, name)
                for name in set(pool.objects).difference(names):
                    # Invalidated by another mount: its pages are gone for everyone.
                    await self._drop_object(pool, name, remote=False)
                    del pool.objects[name]
                return
            tobj = pool.objects.get(obj)
            if tobj is None:
                return
            remote = set(await self.backend.object_pages(location_of(pool, tobj, 0)))
        except StoreUnavailable as exc:
            log.debug("shared pool %s not refreshed: %s", pool_id, exc)
            return
        now = self._stamp()
        for index in remote.difference(tobj.pages):
            tobj.pages.put(index, 0, now)  # stored by another mount; cost unknown here
            pool.charged += self._charge(0)
            self._use(pool, PageKey(pool_id, obj, index))
        removed = set(tobj.pages).difference(remote)
        for index in removed:
            entry = tobj.pages.pop(index)
            self._release_here(pool, PageKey(pool_id, obj, index), entry)
        self._gone(pool, tobj, sorted(removed))

    async def flush_pool(self, pool_id: PoolId) -> int:
        """frontswap invalidate_area / cleancache invalidate_fs: drop the pool and its pages.

        A shared pool is only left by this mount: the pages stay for the others.
        """
        async with self._mutating(pool_id):
            pool = self.pool(pool_id)
            dropped = 0
            for name in list(pool.objects):
                dropped += await self._drop_object(pool, name, remote=not pool.shared)
            if self.backend.remote and pool.persistent:
                try:
                    await self.backend.forget_pool(str(pool.id), pool.generation)
                except StoreUnavailable as exc:
                    # Its generation is gone from here, so nothing of it can come back
                    # into this mount; a remount would find it registered, though.
                    log.warning("could not unregister %s remotely: %s", pool.id, exc)
            del self.pools[pool_id]
            self._locks.pop(pool_id, None)
            self._gone(pool, None)
        log.debug("flushed pool %s (%d pages)", pool_id, dropped)
        return dropped

    async def invalidate_object(self, pool_id: PoolId, obj: str) -> int:
        """cleancache invalidate_inode: drop an object and every page in it."""
        async with self._mutating(pool_id):
            pool = self.pool(pool_id)
            if pool.persistent or obj not in pool.objects:
                raise NoSuchObject(f"{pool_id}/{obj}")
            dropped = await self._drop_object(pool, obj, remote=not pool.shared)
            if self._remote_shared(pool):
                try:
                    await self.backend.unpublish_object(location_of(pool, pool.objects[obj], 0))
                except StoreUnavailable as exc:
                    log.warning("could not invalidate shared %s/%s: %s", pool_id, obj, exc)
            del pool.objects[obj]
        return dropped

    async def _drop_object(self, pool: Pool, name: str, *, remote: bool) -> int:
        tobj = pool.objects[name]
        gone = [(PageKey(pool.id, name, i), e) for i, e in tobj.pages.items()]
        tobj.pages.clear()
        self._gone(pool, tobj)
        await self._release_many(pool, tobj, gone, remote=remote)
        self._count(pool, "invalidates", len(gone))
        return len(gone)

    def _gone(
        self, pool: Pool, tobj: TmemObject | None, indexes: Sequence[int] | None = None
    ) -> None:
        if self.on_gone is not None and (indexes is None or indexes):
            self.on_gone(pool, tobj, indexes)

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
        if self._tier is not None:
            await self._tier.reclaim(len(pages) * (self.page_size + ENTRY_OVERHEAD))
        encoded = await self.backend.encode_many([page for _, page in pages])
        async with self._mutating(pool_id):
            # The pool may have been flushed (or flushed and made anew) while we encoded.
            tobj = self.get_object(pool_id, obj)
            pool = self.pools[pool_id]
            now = self._stamp()
            kept: list[bool] = []
            # A batch that names a page twice is two stores, one after the other.
            for run in _distinct_runs([index for index, _ in pages]):
                run_pages = [pages[i] for i in run]
                run_encoded = [encoded[i] for i in run]
                decisions = [
                    self._admit(pool, tobj, PageKey(pool_id, obj, index), enc)
                    for (index, _), enc in zip(run_pages, run_encoded, strict=True)
                ]
                reserved = sum(
                    enc.cost + ENTRY_OVERHEAD
                    for enc, d in zip(run_encoded, decisions, strict=True)
                    if d is Decision.KEEP
                )
                try:
                    kept += await self._keep(pool, tobj, run_pages, run_encoded, decisions, now)
                finally:
                    self._budget.release(pool, reserved)
            if not all(kept):
                # A refused store leaves no page, not even the old one.
                self._gone(
                    pool,
                    tobj,
                    [
                        index
                        for (index, _), k in zip(pages, kept, strict=True)
                        if not k and index not in tobj.pages
                    ],
                )
            return kept

    async def store_run(
        self, pool_id: PoolId, obj: str, first: int, data: bytes | memoryview
    ) -> bool:
        """Store consecutive whole pages from one buffer (an image write); False if refused.

        This is the image's hot path, decided once per request: compress the batch in
        compiled code, check the budget once, replace the old copies, keep the batch
        (`store_run_now`). A batch that does not fit as a whole, or a setup with rules
        that act page by page (a writeback tier, --reject-poor, a remote backend), takes
        `store_many`.
        """
        if self.store_run_now(pool_id, obj, first, data):
            return True
        count = len(data) // self.page_size
        if self.backend.stores_runs and self.writeback is None and not self.reject_poor:
            stored = await self._store_run_remote(pool_id, obj, first, data, count)
            if stored is not None:
                return stored
        return await self._store_pages(pool_id, obj, first, data, count)

    async def _store_run_remote(
        self, pool_id: PoolId, obj: str, first: int, data: bytes | memoryview, count: int
    ) -> bool | None:
        """`store_run` on a remote backend, decided once for the batch: every page kept
        or (the store failing) none; None, with nothing changed, when the batch does not
        fit as a whole (eviction and refusal are decided page by page, in store_many).

        What `_admit` and `_keep` do page by page, done per batch: a remote page costs
        only its index entry, so the batch's cost is known before it is compressed.
        """
        self.get_object(pool_id, obj)
        batch = self.backend.encode_run(data)
        async with self._mutating(pool_id):
            # The pool may have been flushed (or flushed and made anew) while we encoded.
            tobj = self.get_object(pool_id, obj)
            pool = self.pools[pool_id]
            cost = count * ENTRY_OVERHEAD  # a remote page costs its pool only its entry
            if not self._batch_fits(pool, cost):
                return None
            # The duplicate-store rule: the old copies go first (the new ones replace
            # their remote copies in place, or, refused, take them away).
            indexes = range(first, first + count)
            old = tobj.pages.pop_run(first, count)
            if old:
                self._count(pool, "duplicate_entry", len(old))
                self._count(pool, "invalidates", len(old))
                for handle in old:
                    if held_here(handle):
                        pool.charged -= self._charge(handle)
                        self.backend.invalidate(handle)
            locations = locations_of(pool, tobj, indexes)
            self._copies.about_to_write(locations)
            self._budget.reserve(pool, cost)
            try:
                handles = await self.backend.store_batch(locations, batch)
            except StoreUnavailable as exc:
                log.debug("store of %d pages refused: %s", count, exc)
                self._refused(pool, "reject_alloc_fail", count)
                await self._copies.forget_remote(locations)
                # A refused store leaves no page, not even the old one.
                self._gone(pool, tobj, [i for i in indexes if i not in tobj.pages])
                return False
            finally:
                self._budget.release(pool, cost)
            self._insert_many(pool, tobj, indexes, handles, self._stamp(), charged=cost)
            return True

    def store_run_now(
        self,
        pool_id: PoolId,
        obj: str,
        first: int,
        data: bytes | memoryview,
        *,
        room_for_worst: bool = False,
    ) -> bool:
        """`store_run`'s fast case, without waiting: True if the batch was kept whole.

        False (nothing stored, nothing changed) when the batch must take `store_many`:
        no batch calls, a rule that acts page by page, or no room for the whole batch
        without eviction or refusal. `room_for_worst` declines before compressing
        unless the batch would fit even if no page compressed: the image's fast path,
        whose declined batch `store_run` compresses again. `data` is only read during
        the call.
        """
        backend = self.backend
        if not backend.batches or self.writeback is not None or self.reject_poor:
            return False
        count = len(data) // self.page_size
        tobj = self.get_object(pool_id, obj)
        pool = self.pools[pool_id]
        if room_for_worst and not self._batch_fits(
            pool, count * (backend.max_page_charge() + ENTRY_OVERHEAD)
        ):
            return False
        batch = backend.encode_run(data)
        cost = backend.run_cost(batch) + count * ENTRY_OVERHEAD
        if not self._batch_fits(pool, cost):
            # Eviction and refusal are decided page by page.
            return False
        # The duplicate-store rule: the old copies go first (they are never returned again).
        old = tobj.pages.pop_run(first, count)
        if old:
            # Kept here, with no writeback order to update (this path has no tier).
            self._count(pool, "duplicate_entry", len(old))
            self._count(pool, "invalidates", len(old))
            # Only the compiled store's handles are on this path: no marker to skip.
            pool.charged -= len(old) * ENTRY_OVERHEAD + backend.charge_many(old)
            backend.invalidate_many(old)
        self._insert_many(
            pool,
            tobj,
            range(first, first + count),
            backend.keep_run(batch),
            self._stamp(),
            charged=cost,
        )
        return True

    def _batch_fits(self, pool: Pool, cost: int) -> bool:
        """Whether a batch costing `cost` fits the budget and the pool's limits as it is."""
        return self._budget.fits(cost) and self._budget.limit_refusing(pool, cost) is None

    async def _store_pages(
        self, pool_id: PoolId, obj: str, first: int, data: bytes | memoryview, count: int
    ) -> bool:
        psize = self.page_size
        pages = [(first + i, bytes(data[i * psize : (i + 1) * psize])) for i in range(count)]
        return all(await self.store_many(pool_id, obj, pages))

    def _admit(self, pool: Pool, tobj: TmemObject, key: PageKey, enc: Encoded) -> Decision:
        """Where a store is decided: keep the page, send it down to the tier, or refuse it.

        Every store but the image path's fast case (`store_run`, taken only when this
        would keep every page of the batch) comes here, one page at a time, in the
        order zswap_store checks. Room is made here (`Budget` evicts); a page kept is
        reserved in the budget until `_keep` has it indexed.
        """
        # 1. A store replaces the old copy; if this store is refused, the old copy must
        #    not be returned either (frontswap's duplicate-store rule), so drop it first.
        old = tobj.pages.pop(key.index, None)
        if old is not None:
            self._count(pool, "duplicate_entry")
            self._count(pool, "invalidates")
            self._release_here(pool, key, old)
            if in_tier(old.handle):
                # The new copy may land here, so the old one below must go.
                self._copies.defer_tier(location_of(pool, tobj, key.index))
        # 2. Poor compression: kept raw by default, refused with --reject-poor (compress_poor).
        if enc.poor and self.reject_poor:
            self._refused(pool, "reject_compress_poor")
            return Decision.REFUSE
        # 3. The pool's own limit (.max) and its owner's (--max-pool-per-user): room is
        #    made from their own cleancache pages only; an over-limit frontswap page goes
        #    down to the tier, as zswap sends a cgroup over memory.zswap.max to swap.
        need = enc.cost + ENTRY_OVERHEAD
        # (A same-filled page, whose encoded value is its word as an int, costs only its
        # index entry and stays here.)
        lowerable = (
            self.writeback is not None and pool.persistent and not isinstance(enc.value, int)
        )
        limit = self._budget.make_room_within_limits(pool, need)
        if limit is not None:
            if lowerable:
                return Decision.LOWER
            self._refused(pool, "pool_limit_hit", why=limit)
            return Decision.REFUSE
        # 4. The budget: evict cleancache pages, pools over their weighted share first;
        #    below a full pool a persistent page goes straight to the writeback tier.
        if not self._budget.make_room(need):
            if lowerable:
                assert self._tier is not None
                self._tier.wake()
                return Decision.LOWER
            self._refused(pool, "pool_limit_hit", why=f"--max-pool {format_size(self.max_pool)}")
            return Decision.REFUSE
        self._budget.reserve(pool, need)
        return Decision.KEEP

    async def _keep(
        self,
        pool: Pool,
        tobj: TmemObject,
        pages: Sequence[tuple[int, bytes]],
        encoded: Sequence[Encoded],
        decisions: Sequence[Decision],
        now: int,
    ) -> list[bool]:
        """5. Keep what was admitted: here, in the remote backend, or in the tier below."""
        keep = [i for i, d in enumerate(decisions) if d is Decision.KEEP]
        lower = [i for i, d in enumerate(decisions) if d is Decision.LOWER]
        kept = [d is Decision.KEEP for d in decisions]
        if keep:
            # Locations name pages outside this process; a local backend needs none.
            locations = (
                locations_of(pool, tobj, [pages[i][0] for i in keep]) if self.backend.remote else []
            )
            self._copies.about_to_write(locations)
            try:
                handles = await self.backend.store_many(locations, [encoded[i] for i in keep])
            except StoreUnavailable as exc:
                log.debug("store of %d pages refused: %s", len(keep), exc)
                self._refused(pool, "reject_alloc_fail", len(keep))
                await self._copies.forget_remote(locations)
                for i in keep:
                    kept[i] = False
            else:
                self._insert_many(pool, tobj, [pages[i][0] for i in keep], handles, now)
        if lower:
            assert self.writeback is not None
            items = [
                (location_of(pool, tobj, pages[i][0]), payload_of(encoded[i].value)) for i in lower
            ]
            self._copies.about_to_write([loc for loc, _ in items])
            try:
                await self.writeback.put_many(items)
            except StoreUnavailable as exc:
                log.debug("writeback of %d pages refused: %s", len(lower), exc)
                self._refused(pool, "reject_alloc_fail", len(lower))
            else:
                self._insert_many(
                    pool,
                    tobj,
                    [pages[i][0] for i in lower],
                    [Lowered(len(payload)) for _, payload in items],
                    now,
                )
                for i in lower:
                    kept[i] = True
                self._count(pool, "written_back_pages", len(lower))
        return kept

    def _insert_many(
        self,
        pool: Pool,
        tobj: TmemObject,
        indexes: Sequence[int],
        handles: Sequence[Handle],
        now: int,
        *,
        charged: int | None = None,
    ) -> None:
        """Index stored pages. The hot path of every store: kept lean on purpose.

        `charged` is what the pages cost the pool's limits, when the caller knows it
        for the whole batch (the image path); otherwise it is summed per page.
        """
        pages = tobj.pages
        if isinstance(indexes, range) and indexes.step == 1:
            pages.put_run(indexes.start, list(handles), now)
        else:
            for index, handle in zip(indexes, handles, strict=True):
                pages.put(index, handle, now)
        pool.charged += sum(map(self._charge, handles)) if charged is None else charged
        if not pool.persistent:
            self._tick += 1
            tick = self._tick
            lru = pool.order
            for index in indexes:
                key = PageKey(pool.id, tobj.name, index)
                lru[key] = tick
                lru.move_to_end(key)
        elif self.writeback is not None:
            self._tick += 1
            tick = self._tick
            cold = pool.order
            same_filled = self.backend.is_same_filled
            for index, handle in zip(indexes, handles, strict=True):
                if not in_tier(handle) and not same_filled(handle):
                    cold[PageKey(pool.id, tobj.name, index)] = tick
        self._count(pool, "stores", len(indexes))

    def room_for_page(self, pool_id: PoolId | None = None) -> bool:
        """Whether one more same-filled page fits (evicting ephemeral pages if need be),
        in the budget and, given a pool, under its limits and its owner's."""
        pool = self.pools.get(pool_id) if pool_id is not None else None
        if pool is not None and self._budget.make_room_within_limits(pool, ENTRY_OVERHEAD):
            return False
        return self._budget.make_room(ENTRY_OVERHEAD)

    def _evict(self, pool: Pool) -> None:
        """Evict the least recently used page of a cleancache pool."""
        key, _ = pool.order.popitem(last=False)
        tobj = pool.objects[key.object]
        entry = tobj.pages.pop(key.index)
        self._release_here(pool, key, entry)
        self._count(pool, "evicted_pages")
        self._gone(pool, tobj, (key.index,))
        if self.backend.remote:
            # Evicted from the local index; the remote copy goes in the background.
            self._copies.defer_remote([location_of(pool, tobj, key.index)])

    # -- release: what an invalidated or replaced page gives back -------------------------

    def _release_here(self, pool: Pool, key: PageKey, entry: Entry) -> None:
        """Forget an entry removed from its object's index: memory held in this process."""
        if held_here(entry.handle):
            pool.charged -= self._charge(entry.handle)
            self.backend.invalidate(entry.handle)
        pool.order.pop(key, None)

    async def _release_many(
        self,
        pool: Pool,
        tobj: TmemObject,
        gone: Sequence[tuple[PageKey, Entry]],
        *,
        remote: bool = True,
    ) -> None:
        """Release entries already removed from the index, and their copies elsewhere."""
        for key, entry in gone:
            self._release_here(pool, key, entry)
        self.backend.trim()
        await self._copies.delete(pool, tobj, gone, remote=remote)

    # -- load --------------------------------------------------------------------------

    async def load(self, key: PageKey) -> bytes | None:
        """Load one page; None on a miss."""
        (page,) = await self.load_many(key.pool, key.object, [key.index])
        return page

    def load_run(
        self,
        pool_id: PoolId,
        obj: str,
        first: int,
        count: int,
        into: bytearray | memoryview | None = None,
    ) -> bytearray | memoryview | None:
        """Consecutive pages in one buffer, zeros where nothing is stored (an image read):
        `into` (count pages long, every byte written) or a new bytearray.

        None when the backend cannot do it in one call (the caller then takes load_many).
        """
        backend = self.backend
        if not backend.batches or self.writeback is not None:
            return None
        pool = self.pool(pool_id)
        handles = self.get_object(pool_id, obj).pages.run_handles(first, count)
        out = bytearray(count * self.page_size) if into is None else into
        backend.load_into(handles, out)
        misses = handles.count(-1)
        self._count(pool, "loads", count - misses)
        self._count(pool, "load_misses", misses)
        return out

    def loads_now(self, pool_id: PoolId) -> bool:
        """Whether `load` of this pool's pages answers without waiting (`load_now`): every
        page is held in this process (no remote backend, no writeback tier) and no load
        invalidates (an exclusive get makes names go, which waits for the kernel)."""
        if not self.backend.batches or self.writeback is not None:
            return False
        return not (self.exclusive_gets and not self.pool(pool_id).shared)

    def load_now(self, key: PageKey) -> bytes | None:
        """`load` without waiting, for a pool where `loads_now` says so; None on a miss."""
        pool = self.pool(key.pool)
        entry = self.get_object(key.pool, key.object).pages.get(key.index)
        if entry is None:
            self._count(pool, "load_misses")
            return None
        self._use(pool, key, only_if_present=True)
        page = bytearray(self.page_size)
        self.backend.load_into([entry.handle], page)
        self._count(pool, "loads")
        return bytes(page)

    async def load_many(
        self, pool_id: PoolId, obj: str, indexes: Iterable[int], *, exclusive: bool = True
    ) -> list[bytes | None]:
        """Load pages of one object; None for each miss. PageLost for a lost persistent page.

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
        if not exclusive:
            for index, _ in hits:
                self._use(pool, PageKey(pool_id, obj, index), only_if_present=True)
        try:
            # Holding the handles keeps their payloads alive even if invalidated meanwhile.
            data = await self._fetch(pool, tobj, hits)
        except BaseException:
            if exclusive:
                self._put_back(pool, tobj, obj, hits)
            raise
        if exclusive:
            gone = [
                (PageKey(pool_id, obj, i), e)
                for (i, e), d in zip(hits, data, strict=True)
                if d is not None
            ]
            for _key, entry in gone:
                # Already out of the index and its counts (_take); release the rest.
                if held_here(entry.handle):
                    self.backend.invalidate(entry.handle)
            self._gone(pool, tobj, [key.index for key, _ in gone])
            await self._copies.delete(pool, tobj, gone)
            self._count(pool, "invalidates", len(gone))
        found = iter(data)
        result = [None if e is None else next(found) for e in entries]
        hit_count = sum(page is not None for page in result)
        self._count(pool, "loads", hit_count)
        self._count(pool, "load_misses", len(result) - hit_count)
        return result

    async def load_run_into(
        self, pool_id: PoolId, obj: str, first: int, count: int, into: memoryview
    ) -> None:
        """`load_many(range(first, first + count), exclusive=False)` written into one
        buffer of `count` pages, zeros where nothing is stored: an image read of pages
        held remotely, decided once per request. PageLost as load_many.

        The backend writes the pages into `into` itself (`load_many_into`), so a
        request makes no bytes object per page. With a writeback tier, pages may be in
        two places: that takes load_many.
        """
        psize = self.page_size
        if self.writeback is not None:
            pages = await self.load_many(pool_id, obj, range(first, first + count), exclusive=False)
            for n, page in enumerate(pages):
                into[n * psize : (n + 1) * psize] = bytes(psize) if page is None else page
            return
        pool = self.pool(pool_id)
        tobj = self.get_object(pool_id, obj)
        get = tobj.pages.get
        hits = [(i, e) for i in range(first, first + count) if (e := get(i)) is not None]
        if pool.order:
            for index, _ in hits:
                self._use(pool, PageKey(pool_id, obj, index), only_if_present=True)
        if pool.persistent and any(is_lost(e.handle) for _, e in hits):
            raise PageLost(f"{pool.id}: a page the remote no longer has")
        # With no tier, every page not lost is held by the backend.
        here = [(i, e) for i, e in hits if held_here(e.handle)]
        whole = len(here) == count
        out = into if whole else memoryview(bytearray(len(here) * psize))
        locations = locations_of(pool, tobj, [i for i, _ in here]) if self.backend.remote else []
        try:
            found = await self.backend.load_many_into(locations, [e.handle for _, e in here], out)
        except StoreUnavailable as exc:
            if pool.persistent:
                raise PageLost(f"{pool.id}: {exc}") from None
            log.debug("remote load missed: %s", exc)
            found = [False] * len(here)
            into[:] = bytes(len(into))
        else:
            if not whole:
                into[:] = bytes(len(into))
                for n, (index, _) in enumerate(here):
                    at = (index - first) * psize
                    into[at : at + psize] = out[n * psize : (n + 1) * psize]
            if not all(found):
                for (index, entry), present in zip(here, found, strict=True):
                    if not present and not is_lost(entry.handle):
                        self._lost(pool, tobj, index, entry)
                if pool.persistent:
                    raise PageLost(f"{pool.id}: a page the remote no longer has")
        loads = found.count(True)
        self._count(pool, "loads", loads)
        self._count(pool, "load_misses", count - loads)

    async def _fetch(
        self, pool: Pool, tobj: TmemObject, hits: Sequence[tuple[int, Entry]]
    ) -> list[bytes | None]:
        """The data of index entries, wherever they live; misses and losses sorted out."""
        if pool.persistent and any(is_lost(e.handle) for _, e in hits):
            raise PageLost(f"{pool.id}: a page the remote no longer has")
        here = [(n, i, e) for n, (i, e) in enumerate(hits) if held_here(e.handle)]
        below = [(n, i, e) for n, (i, e) in enumerate(hits) if in_tier(e.handle)]
        data: list[bytes | None] = [None] * len(hits)
        try:
            if here:
                locations = (
                    locations_of(pool, tobj, [i for _, i, _ in here]) if self.backend.remote else []
                )
                pages = await self.backend.load_many(locations, [e.handle for _, _, e in here])
                for (n, _, _), page in zip(here, pages, strict=True):
                    data[n] = page
            if below:
                assert self.writeback is not None
                payloads = await self.writeback.get_many(
                    locations_of(pool, tobj, [i for _, i, _ in below])
                )
                present = [
                    (n, p) for (n, _, _), p in zip(below, payloads, strict=True) if p is not None
                ]
                pages = decode_payloads([p for _, p in present], self.page_size)
                for (n, _), page in zip(present, pages, strict=True):
                    data[n] = page
        except StoreUnavailable as exc:
            if pool.persistent:
                raise PageLost(f"{pool.id}: {exc}") from None
            log.debug("remote load missed: %s", exc)
            return [None] * len(hits)
        for n, (index, entry) in enumerate(hits):
            if data[n] is None and not is_lost(entry.handle):
                self._lost(pool, tobj, index, entry)
        if pool.persistent and any(d is None for d in data):
            raise PageLost(f"{pool.id}: a page the remote no longer has")
        return data

    def _lost(self, pool: Pool, tobj: TmemObject, index: int, entry: Entry) -> None:
        """A page the index has but its store had not: a persistent one stays, as lost.

        Only if the index still holds `entry`: a page stored anew meanwhile is left as
        it is. An Entry tells stores apart by leaf (tmemfs/_pagetable.pyx), so a store
        to a neighbour page in the same leaf also leaves it as it is: conservative, the
        next load that misses it marks it.
        """
        if pool.persistent:
            self._count(pool, "lost_pages")
            log.error("%s page %d is lost: its store no longer has it", pool.id, index)
            if tobj.pages.get(index) == entry:
                pool.charged -= self._charge(entry.handle)
                tobj.pages.set_handle(index, LOST)
            entry.handle = LOST
        elif tobj.pages.get(index) == entry:
            # An ephemeral page the remote evicted: a miss from now on.
            del tobj.pages[index]
            pool.charged -= self._charge(entry.handle)
            self._release_here(pool, PageKey(pool.id, tobj.name, index), Entry(LOST, 0))
            self._gone(pool, tobj, (index,))

    def _take(self, pool: Pool, tobj: TmemObject, key: PageKey) -> Entry | None:
        """Remove an entry for an exclusive get; its handle is released after loading."""
        entry = tobj.pages.pop(key.index, None)
        if entry is not None:
            pool.charged -= self._charge(entry.handle)
            pool.order.pop(key, None)
        return entry

    def _put_back(
        self, pool: Pool, tobj: TmemObject, name: str, taken: list[tuple[int, Entry]]
    ) -> None:
        """An exclusive get that did not complete (cancelled, failed) loses nothing."""
        alive = self.pools.get(pool.id) is pool and pool.objects.get(name) is tobj
        for index, entry in taken:
            if alive and index not in tobj.pages:
                # Counts as a store into its leaf: older Entries of its pages go unequal.
                tobj.pages[index] = entry
                pool.charged += self._charge(entry.handle)
                if not pool.persistent:
                    self._use(pool, PageKey(pool.id, name, index))
            elif held_here(entry.handle):
                # Flushed, or stored anew, meanwhile: this copy is no longer wanted.
                self.backend.invalidate(entry.handle)

    # -- invalidate --------------------------------------------------------------------

    async def invalidate_page(self, key: PageKey) -> bool:
        """frontswap invalidate_page / cleancache invalidate_page; False if it was absent."""
        async with self._mutating(key.pool):
            pool = self.pool(key.pool)
            tobj = self.get_object(key.pool, key.object)
            entry = tobj.pages.pop(key.index, None)
            if entry is None:
                return False
            self._gone(pool, tobj, (key.index,))
            await self._release_many(pool, tobj, [(key, entry)])
            self._count(pool, "invalidates")
            return True

    async def invalidate_range(self, pool_id: PoolId, obj: str, start: int) -> int:
        """Invalidate every page of an object with index >= start (a shrinking truncate)."""
        async with self._mutating(pool_id):
            pool = self.pool(pool_id)
            tobj = self.get_object(pool_id, obj)
            gone = [
                (PageKey(pool_id, obj, i), tobj.pages.pop(i))
                for i in [i for i in tobj.pages if i >= start]
            ]
            self._gone(pool, tobj, [key.index for key, _ in gone])
            await self._release_many(pool, tobj, gone)
            self._count(pool, "invalidates", len(gone))
            return len(gone)

    async def discard(self, pool_id: PoolId, obj: str, pages: range) -> int:
        """Invalidate every page of an object whose index is in `pages`, as one batch.

        A discard of an image range (swap freeing slots, blkdiscard) is frontswap's
        invalidate for each page in it; each counts in `invalidates`.
        """
        async with self._mutating(pool_id):
            pool = self.pool(pool_id)
            tobj = self.get_object(pool_id, obj)
            if len(pages) <= len(tobj.pages):
                indexes = [i for i in pages if i in tobj.pages]
            else:
                indexes = [i for i in tobj.pages if i in pages]
            gone = [(PageKey(pool_id, obj, i), tobj.pages.pop(i)) for i in indexes]
            await self._release_many(pool, tobj, gone)
            self._count(pool, "invalidates", len(gone))
            self._gone(pool, tobj, indexes)
            return len(gone)

    # -- the block image ---------------------------------------------------------------

    async def resize_image(self, pool_id: PoolId, size: int) -> None:
        """Give a frontswap pool a block image of `size` bytes (made with the pool if needed).

        Shrinking invalidates the pages past the new end, and zeroes the tail of a page
        the new end cuts, so that growing again shows zeros, as a file would.
        """
        if pool_id.kind is not PoolKind.PERSISTENT:
            raise NoSuchPool(str(pool_id))
        pool = self.pools.get(pool_id) or self.create_pool(pool_id)
        old = pool.image_size or 0
        if size != pool.image_size:
            await self._save_image(pool, size)
        pool.image_size = size
        if size >= old:
            return
        cut, partial = divmod(size, self.page_size)
        await self.invalidate_range(pool_id, SWAP_OBJECT, cut + (1 if partial else 0))
        if partial:
            (page,) = await self.load_many(pool_id, SWAP_OBJECT, [cut], exclusive=False)
            if page is not None:
                tail = page[:partial].ljust(self.page_size, b"\0")
                await self.store(PageKey(pool_id, SWAP_OBJECT, cut), tail)

    @property
    def grows_images_now(self) -> bool:
        """Whether `grow_image_now` may be used: the backend keeps no image sizes."""
        return not self.backend.remote

    def grow_image_now(self, pool_id: PoolId, size: int) -> None:
        """`resize_image`'s growing case without waiting (only if `grows_images_now`):
        nothing to save, nothing to invalidate."""
        pool = self.pool(pool_id)
        assert self.grows_images_now and pool.image_size is not None
        pool.image_size = max(pool.image_size, size)

    async def remove_image(self, pool_id: PoolId) -> None:
        """Unlink the image: the view goes, the pool and its pages stay."""
        pool = self.pool(pool_id)
        if pool.image_size is None:
            raise NoSuchPool(f"{pool_id}.img")
        await self._save_image(pool, None)
        pool.image_size = None

    async def _save_image(self, pool: Pool, size: int | None) -> None:
        """Record an image's size where a remount finds it; refused if it cannot be."""
        try:
            await self.backend.save_image(str(pool.id), pool.generation, size)
        except StoreUnavailable as exc:
            raise StoreRejected(f"{pool.id}.img: {exc}") from None

    # -- inspection --------------------------------------------------------------------

    def entry(self, key: PageKey) -> Entry | None:
        """The index entry of a page, without loading it (for stat and lookup)."""
        pool = self.pools.get(key.pool)
        tobj = pool.objects.get(key.object) if pool else None
        return tobj.pages.get(key.index) if tobj else None

    def page_cost(self, entry: Entry) -> float:
        """Compressed bytes charged to one page; what st_blocks reports."""
        return inspection.page_cost(self, entry)

    @property
    def index_size(self) -> int:
        """Bytes the page index holds (every pool's page tables), read in O(1)."""
        return self._index.nbytes

    def pool_total_size(self) -> int:
        """All memory held for pages in this process: payloads, handles, the index."""
        tier = self.writeback.memory_used() if self.writeback is not None else 0
        return self.backend.memory_used() + self._index.pages * ENTRY_OVERHEAD + tier

    def pool_stats(self, pool_id: PoolId) -> dict[str, int]:
        """A pool's counters. The gauges are summed over its pages when asked."""
        return inspection.pool_stats(self, pool_id)

    def stats(self) -> dict[str, int]:
        """Global counters: gauges of the whole backend, events summed over all pools ever."""
        return inspection.engine_stats(self)

    # -- helpers -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _mutating(self, pool_id: PoolId) -> AsyncIterator[None]:
        """Mutations of a pool whose pages live elsewhere run one at a time, in order."""
        if not self._serialize:
            yield
            return
        lock = self._locks.setdefault(pool_id, trio.Lock())
        async with lock:
            yield
            await self._copies.flush()

    def _refused(self, pool: Pool, reason: str, n: int = 1, *, why: str = "") -> None:
        """Count refused stores, and say so in the log once per burst, not once per page.

        `why` names the limit that refused (the pool's .max, its owner's share, the budget).
        """
        self._count(pool, reason, n)
        self._refusals += n
        now = time.monotonic()
        if now - self._refusals_logged >= REFUSAL_LOG_INTERVAL:
            log.warning(
                "%d stores refused since the last report (latest: %s in %s%s)",
                self._refusals,
                reason,
                pool.id,
                f", by {why}" if why else "",
            )
            self._refusals, self._refusals_logged = 0, now

    def _charge(self, handle: Handle) -> int:
        """What a page held here costs its pool's limits: its payload at its own size (a
        deduplicated payload is charged to every pool holding it) and its index entry.
        A page moved down to the tier, or lost, costs its pool nothing here."""
        if held_here(handle):
            return ENTRY_OVERHEAD + self.backend.page_charge(handle)
        return 0

    def _stamp(self) -> int:
        """The time of a store, in ns, later than every earlier one: an index entry's
        stamp tells this store of a page from any other."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _use(self, pool: Pool, key: PageKey, *, only_if_present: bool = False) -> None:
        """A page was used: it goes to the young end of its pool's order."""
        order = pool.order
        if only_if_present and key not in order:
            return
        self._tick += 1
        order[key] = self._tick
        order.move_to_end(key)

    def _count(self, pool: Pool, name: str, n: int = 1) -> None:
        if n:
            pool.counters[name] = pool.counters.get(name, 0) + n
            self.counters[name] = self.counters.get(name, 0) + n


def _distinct_runs(indexes: Sequence[int]) -> list[range]:
    """Split positions into consecutive runs in which no index repeats."""
    runs: list[range] = []
    start = 0
    seen: set[int] = set()
    for position, index in enumerate(indexes):
        if index in seen:
            runs.append(range(start, position))
            start, seen = position, set()
        seen.add(index)
    runs.append(range(start, len(indexes)))
    return runs


__all__ = [
    "DEFAULT_WEIGHT",
    "ENTRY_OVERHEAD",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "SWAP_OBJECT",
    "Engine",
    "Lost",
    "Lowered",
    "PoolKind",
]
