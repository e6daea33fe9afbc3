"""Fair shares in the engine, no mount: per-pool limits (.max), the per-user limit
(--max-pool-per-user) and weights (.weight), as Xen tmem weighed and capped clients.

- a store over a pool's or its owner's limit is refused (StoreRejected, ENOSPC at the
  mount) and counted in that pool's `pool_limit_hit`; a cleancache pool at a limit
  makes room from its own (or its owner's) pages, never from anyone else's;
- when the budget is full, cleancache pools over their weighted share lose pages first;
- with a writeback tier, the frontswap pool furthest over its share moves down first;
- a hypothesis model: after any store returns, no pool is over its limit (unless it was
  already over a limit lowered under it, and did not grow), and no frontswap page is
  ever dropped.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from engine_testlib import PAGE, SWAP0, make_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmemfs.backends import open_tier
from tmemfs.backends.base import Encoded
from tmemfs.engine import (
    ENTRY_OVERHEAD,
    SWAP_OBJECT,
    BadValue,
    Engine,
    Owner,
    PageKey,
    PoolId,
    PoolKind,
    StoreRejected,
)
from tmemfs.engine.handles import Lowered

SWAP1 = PoolId(PoolKind.PERSISTENT, "1")
CC_A = PoolId(PoolKind.EPHEMERAL, "a")
CC_B = PoolId(PoolKind.EPHEMERAL, "b")
OBJ = "ino"
ALICE, BOB = 1000, 1001


def _raw_cost() -> int:
    backend = make_backend("raw", tokens=1)
    backend.store(Encoded(bytes(PAGE), PAGE))
    return backend.memory_used() + ENTRY_OVERHEAD


RAW_COST = _raw_cost()


def noise(seed: int) -> bytes:
    """A page that does not compress: every page costs about the same."""
    return random.Random(seed).randbytes(PAGE)


def engine_with(
    max_pages: int,
    *,
    backend: str = "raw",
    per_user_pages: int | None = None,
    writeback: object = None,
) -> Engine:
    return Engine(
        make_backend(backend),
        max_pool=max_pages * RAW_COST,
        max_pool_per_user=None if per_user_pages is None else per_user_pages * RAW_COST,
        writeback=writeback,
    )  # type: ignore[arg-type]


def cleancache(engine: Engine, pool_id: PoolId, uid: int) -> None:
    engine.create_pool(pool_id, Owner(uid, uid))
    engine.create_object(pool_id, OBJ)


def eph(pool_id: PoolId, index: int) -> PageKey:
    return PageKey(pool_id, OBJ, index)


def swap(pool_id: PoolId, index: int) -> PageKey:
    return PageKey(pool_id, SWAP_OBJECT, index)


def charged_by_entries(engine: Engine, pool_id: PoolId) -> int:
    """What the pool's pages cost its limits, summed from scratch."""
    pool = engine.pool(pool_id)
    total = 0
    for tobj in pool.objects.values():
        for entry in tobj.pages.values():
            if not isinstance(entry.handle, Lowered):
                total += ENTRY_OVERHEAD + engine.backend.page_charge(entry.handle)
    return total


# -- .max ---------------------------------------------------------------------------------


async def test_frontswap_store_over_its_max_is_refused_and_counted() -> None:
    engine = engine_with(100)
    engine.create_pool(SWAP0, Owner(ALICE, ALICE))
    engine.set_max_size(SWAP0, 3 * RAW_COST)
    for i in range(3):
        await engine.store(swap(SWAP0, i), noise(i))
    with pytest.raises(StoreRejected):
        await engine.store(swap(SWAP0, 3), noise(3))
    assert engine.pool_stats(SWAP0)["pool_limit_hit"] == 1
    assert engine.pool(SWAP0).charged <= 3 * RAW_COST
    # Replacing a page is still allowed: the old copy goes first.
    await engine.store(swap(SWAP0, 0), noise(10))
    assert await engine.load(swap(SWAP0, 0)) == noise(10)
    # No limit of its own: the store fits.
    engine.set_max_size(SWAP0, None)
    await engine.store(swap(SWAP0, 3), noise(3))


async def test_cleancache_at_its_max_evicts_its_own_pages_only() -> None:
    engine = engine_with(100)
    cleancache(engine, CC_A, ALICE)
    cleancache(engine, CC_B, ALICE)
    for i in range(5):
        await engine.store(eph(CC_B, i), noise(100 + i))
    engine.set_max_size(CC_A, 4 * RAW_COST)
    for i in range(20):
        await engine.store(eph(CC_A, i), noise(i))
        assert engine.pool(CC_A).charged <= 4 * RAW_COST
    assert engine.pool(CC_A).page_count() == 4
    assert engine.pool(CC_B).page_count() == 5  # nobody else paid for it
    assert engine.pool_stats(CC_A)["evicted_pages"] == 16
    assert engine.pool_stats(CC_A)["pool_limit_hit"] == 0
    # Lowering the limit of a cleancache pool evicts down to it at once.
    engine.set_max_size(CC_A, 2 * RAW_COST)
    assert engine.pool(CC_A).page_count() == 2
    assert await engine.load(eph(CC_A, 19)) == noise(19)  # the newest stay


async def test_lowering_a_frontswap_max_keeps_its_pages() -> None:
    engine = engine_with(100)
    engine.create_pool(SWAP0)
    for i in range(4):
        await engine.store(swap(SWAP0, i), noise(i))
    engine.set_max_size(SWAP0, RAW_COST)
    for i in range(4):
        assert await engine.load(swap(SWAP0, i)) == noise(i)
    with pytest.raises(StoreRejected):
        await engine.store(swap(SWAP0, 9), noise(9))


def test_bad_values_are_refused_and_the_old_value_stays() -> None:
    engine = engine_with(10)
    engine.create_pool(SWAP0)
    engine.set_weight(SWAP0, 300)
    for bad in (0, -1, 10001):
        with pytest.raises(BadValue):
            engine.set_weight(SWAP0, bad)
    assert engine.pool(SWAP0).weight == 300
    engine.set_max_size(SWAP0, 4096)
    with pytest.raises(BadValue):
        engine.set_max_size(SWAP0, -1)
    assert engine.pool_shares(SWAP0)["max_size"] == 4096


# -- --max-pool-per-user --------------------------------------------------------------------


async def test_per_user_limit_spans_a_users_pools() -> None:
    engine = engine_with(100, per_user_pages=6)
    engine.create_pool(SWAP0, Owner(ALICE, ALICE))
    engine.create_pool(SWAP1, Owner(BOB, BOB))
    cleancache(engine, CC_A, ALICE)
    for i in range(3):
        await engine.store(eph(CC_A, i), noise(100 + i))
    # Alice's frontswap takes her cleancache pages first, then is refused.
    for i in range(6):
        await engine.store(swap(SWAP0, i), noise(i))
    assert engine.pool(CC_A).page_count() == 0
    with pytest.raises(StoreRejected):
        await engine.store(swap(SWAP0, 6), noise(6))
    assert engine.pool_stats(SWAP0)["pool_limit_hit"] == 1
    # Bob is not Alice: his stores go on.
    for i in range(6):
        await engine.store(swap(SWAP1, i), noise(i))
    assert engine.pool_stats(SWAP1)["pool_limit_hit"] == 0
    assert engine.pool_shares(SWAP1)["user_max_size"] == 6 * RAW_COST


async def test_roots_pools_are_not_bound_by_the_per_user_limit() -> None:
    engine = engine_with(100, per_user_pages=2)
    engine.create_pool(SWAP0, Owner(0, 0))
    for i in range(10):
        await engine.store(swap(SWAP0, i), noise(i))
    assert engine.pool_shares(SWAP0)["user_max_size"] is None


async def test_image_batch_over_a_limit_is_refused_page_by_page() -> None:
    """store_run checks the limits in its one check; over them it goes page by page."""
    engine = engine_with(1000, backend="lz4")
    engine.create_pool(SWAP0, Owner(ALICE, ALICE))
    data = b"".join(noise(i) for i in range(8))
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, data)
    limit = engine.pool(SWAP0).charged + 2 * (PAGE + 1024)
    engine.set_max_size(SWAP0, limit)
    assert not await engine.store_run(SWAP0, SWAP_OBJECT, 8, data)
    pool = engine.pool(SWAP0)
    assert pool.charged <= limit
    assert engine.pool_stats(SWAP0)["pool_limit_hit"] >= 1
    assert 8 < pool.page_count() < 16  # the pages that fit were kept
    assert charged_by_entries(engine, SWAP0) == pool.charged


# -- weights --------------------------------------------------------------------------------


async def flood_and_reuse(weight_a: int, weight_b: int) -> float:
    """A keeps re-reading a working set while B floods; A's hit rate."""
    engine = engine_with(40)
    cleancache(engine, CC_A, ALICE)
    cleancache(engine, CC_B, BOB)
    engine.set_weight(CC_A, weight_a)
    engine.set_weight(CC_B, weight_b)
    rng = random.Random(1)
    working_set = 30
    hits = tries = 0
    flood = 0
    for step in range(3000):
        if step % 2:
            await engine.store(eph(CC_B, flood), noise(10_000 + flood))
            flood += 1
            continue
        index = rng.randrange(working_set)
        got = await engine.load(eph(CC_A, index))
        if step > 600:
            tries += 1
            hits += got is not None
        if got is None:  # cleancache: a miss is read from disk and put again
            await engine.store(eph(CC_A, index), noise(index))
    return hits / tries


async def test_a_pool_keeps_its_weighted_share_of_hits_under_a_flood() -> None:
    # Budget 40 pages; A reuses 30. Its share is 20 at 100:100 and 30 at 300:100: with
    # random reuse its hit rate is about share/working set.
    even = await flood_and_reuse(100, 100)
    favoured = await flood_and_reuse(300, 100)
    assert even >= 0.9 * 20 / 30
    assert favoured >= 0.9 * 30 / 30
    assert favoured > even


async def test_over_share_pool_is_evicted_first() -> None:
    engine = engine_with(10)
    cleancache(engine, CC_A, ALICE)
    cleancache(engine, CC_B, BOB)
    for i in range(3):  # A: old pages, under its share (5 of 10)
        await engine.store(eph(CC_A, i), noise(i))
    for i in range(20):  # B floods with newer pages
        await engine.store(eph(CC_B, i), noise(100 + i))
    assert engine.pool(CC_A).page_count() == 3
    shares = engine.pool_shares(CC_B)
    assert shares["charged_size"] > shares["weighted_share"]  # type: ignore[operator]


# -- writeback -----------------------------------------------------------------------------


async def test_writeback_moves_the_pool_over_its_share_down_first(tmp_path: Path) -> None:
    tier = open_tier(str(tmp_path / "tier"), page_size=PAGE, limiter=trio.CapacityLimiter(2))
    engine = engine_with(20, writeback=tier)
    await engine.open()
    try:
        engine.create_pool(SWAP0, Owner(ALICE, ALICE))
        engine.create_pool(SWAP1, Owner(BOB, BOB))
        for i in range(4):  # SWAP0 stores first: its pages are the coldest
            await engine.store(swap(SWAP0, i), noise(i))
        for i in range(14):
            await engine.store(swap(SWAP1, i), noise(100 + i))
        moved = await engine._tier.write_back(4)
        assert moved == 4
        assert engine.pool_stats(SWAP1)["written_back_pages"] == 4
        assert engine.pool_stats(SWAP0)["written_back_pages"] == 0
        # With a weight that entitles it to more, SWAP1 is no longer over its share.
        engine.set_weight(SWAP1, 1000)
        await engine._tier.write_back(2)
        assert engine.pool_stats(SWAP0)["written_back_pages"] == 2
        for i in range(4):
            assert await engine.load(swap(SWAP0, i)) == noise(i)
        for i in range(14):
            assert await engine.load(swap(SWAP1, i)) == noise(100 + i)
    finally:
        await engine.close()


async def test_with_writeback_a_frontswap_page_over_its_max_goes_down(tmp_path: Path) -> None:
    tier = open_tier(str(tmp_path / "tier"), page_size=PAGE, limiter=trio.CapacityLimiter(2))
    engine = engine_with(100, writeback=tier)
    await engine.open()
    try:
        engine.create_pool(SWAP0, Owner(ALICE, ALICE))
        engine.set_max_size(SWAP0, 2 * RAW_COST)
        for i in range(5):
            await engine.store(swap(SWAP0, i), noise(i))
        assert engine.pool(SWAP0).charged <= 2 * RAW_COST
        assert engine.pool_stats(SWAP0)["written_back_pages"] == 3
        assert engine.pool_stats(SWAP0)["pool_limit_hit"] == 0
        for i in range(5):
            assert await engine.load(swap(SWAP0, i)) == noise(i)
    finally:
        await engine.close()


# -- the model ------------------------------------------------------------------------------

POOLS = {
    SWAP0: ALICE,
    SWAP1: BOB,
    PoolId(PoolKind.PERSISTENT, "2"): 0,
    CC_A: ALICE,
    CC_B: BOB,
    PoolId(PoolKind.EPHEMERAL, "c"): 0,
}
POOL_IDS = list(POOLS)
limits = st.one_of(st.none(), st.integers(0, 12).map(lambda n: n * RAW_COST // 2))
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("store"), st.sampled_from(POOL_IDS), st.integers(0, 15), st.integers(0, 40)
        ),
        st.tuples(
            st.just("run"), st.sampled_from(POOL_IDS[:3]), st.integers(0, 15), st.integers(1, 6)
        ),
        st.tuples(st.just("invalidate"), st.sampled_from(POOL_IDS), st.integers(0, 15)),
        st.tuples(st.just("max"), st.sampled_from(POOL_IDS), limits),
        st.tuples(st.just("weight"), st.sampled_from(POOL_IDS), st.integers(1, 10000)),
    ),
    max_size=60,
)


def content(pool_id: PoolId, index: int, seed: int) -> bytes:
    """Pages that compress differently (lz4), and identical ones (dedup) by seed."""
    if seed % 5 == 0:
        return bytes(PAGE)
    if seed % 5 == 1:
        return ((b"%d " % seed) * PAGE)[:PAGE]
    return noise(seed)


def used_by(engine: Engine, uid: int) -> int:
    return sum(p.charged for p in engine.pools.values() if p.owner.uid == uid)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backend=st.sampled_from(["raw", "lz4"]),
    budget=st.integers(4, 30),
    per_user=st.one_of(st.none(), st.integers(2, 20)),
    ops=operations,
)
def test_model_limits_hold_and_frontswap_is_never_dropped(
    backend: str, budget: int, per_user: int | None, ops: list[tuple]
) -> None:
    async def main() -> None:
        engine = engine_with(budget, backend=backend, per_user_pages=per_user)
        for pool_id, uid in POOLS.items():
            if pool_id.kind is PoolKind.PERSISTENT:
                engine.create_pool(pool_id, Owner(uid, uid))
            else:
                cleancache(engine, pool_id, uid)
        model: dict[PageKey, bytes] = {}  # frontswap pages that must be there

        def check_after_store(before: dict[PoolId, int], users: dict[int, int]) -> None:
            for pool_id in POOL_IDS:
                pool = engine.pool(pool_id)
                assert pool.charged == charged_by_entries(engine, pool_id)
                if pool.max_size is not None and pool.charged > pool.max_size:
                    # Only a frontswap pool whose .max was lowered under what it held,
                    # and it did not grow.
                    assert pool.persistent and pool.charged <= before[pool_id]
            if engine.max_pool_per_user is not None:
                for uid in (ALICE, BOB):
                    now = used_by(engine, uid)
                    assert now <= engine.max_pool_per_user or now <= users[uid]
            assert engine.pool_total_size() <= engine.max_pool

        for op in ops:
            before = {p: engine.pool(p).charged for p in POOL_IDS}
            users = {uid: used_by(engine, uid) for uid in (ALICE, BOB)}
            kind, pool_id = op[0], op[1]
            obj = SWAP_OBJECT if pool_id.kind is PoolKind.PERSISTENT else OBJ
            key = PageKey(pool_id, obj, op[2]) if kind in ("store", "invalidate", "run") else None
            if kind == "store":
                assert key is not None
                data = content(pool_id, op[2], op[3])
                try:
                    await engine.store(key, data)
                except StoreRejected:
                    model.pop(key, None)  # a refused store drops the old copy
                else:
                    if pool_id.kind is PoolKind.PERSISTENT:
                        model[key] = data
                check_after_store(before, users)
            elif kind == "run":
                first, count = op[2], op[3]
                pages = [content(pool_id, first + i, first * 7 + i) for i in range(count)]
                stored = await engine.store_run(pool_id, obj, first, b"".join(pages))
                for i, data in enumerate(pages):
                    k = PageKey(pool_id, obj, first + i)
                    if engine.entry(k) is not None:
                        model[k] = data
                    else:
                        assert not stored
                        model.pop(k, None)
                check_after_store(before, users)
            elif kind == "invalidate":
                assert key is not None
                await engine.invalidate_page(key)
                model.pop(key, None)
            elif kind == "max":
                engine.set_max_size(pool_id, op[2])
            else:
                engine.set_weight(pool_id, op[2])
            for k in model:
                assert engine.entry(k) is not None, f"frontswap page {k} was dropped"
            for pool_id in POOL_IDS:
                assert engine.pool(pool_id).charged == charged_by_entries(engine, pool_id)
        for k, data in model.items():
            assert await engine.load(k) == data

    trio.run(main)
