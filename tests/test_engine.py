"""Engine unit tests: tmem semantics, the budget, eviction and statistics, no FUSE.

These check the promises of SPEC sections 2, 3 and 5 at the engine's own interface:
a persistent page is kept byte for byte until invalidated; an ephemeral page may
vanish but is never wrong; ephemeral pages go (least recently used first) before a
persistent store is refused; the budget is never exceeded; counters add up.
"""

from __future__ import annotations

import inspect
import random
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing
from engine_testlib import PAGE, SWAP0, make_backend, make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmemfs.backends import Encoded, open_backend
from tmemfs.backends.lz4 import Lz4Backend
from tmemfs.backends.raw import RawBackend
from tmemfs.backends.store import Location
from tmemfs.engine import (
    ENTRY_OVERHEAD,
    SWAP_OBJECT,
    BadName,
    Engine,
    NoSuchObject,
    NoSuchPool,
    PageKey,
    PoolExists,
    PoolId,
    PoolKind,
    StoreRejected,
    is_shared_pool_name,
    parse_decimal,
    parse_name,
)
from tmemfs.engine.keys import MAX_INDEX
from tmemfs.engine.stats import ALL_COUNTERS

WORDS = ("put", "get", "flush", "pool", "object", "index", "page", "swap")

FS = PoolId(PoolKind.EPHEMERAL, "fs")
SHARED = PoolId(PoolKind.EPHEMERAL, "6f1c2b8e-3d4a-4b5c-9e8f-0a1b2c3d4e5f")
OBJ = "ino"


def _raw_cost() -> int:
    """What one page costs under the raw backend: its memory plus its index entry."""
    backend = make_backend("raw", tokens=1)
    backend.store(Encoded(bytes(PAGE), PAGE))
    return backend.memory_used() + ENTRY_OVERHEAD


RAW_COST = _raw_cost()


def with_pools(engine: Engine, *ephemeral: PoolId) -> Engine:
    """Create frontswap pool 0 and the given cleancache pools, each with object OBJ."""
    engine.create_pool(SWAP0)
    for pool_id in ephemeral:
        engine.create_pool(pool_id)
        engine.create_object(pool_id, OBJ)
    return engine


def swap(index: int) -> PageKey:
    return PageKey(SWAP0, SWAP_OBJECT, index)


def eph(index: int, pool: PoolId = FS, obj: str = OBJ) -> PageKey:
    return PageKey(pool, obj, index)


def page(seed: int) -> bytes:
    """A distinct page for every seed, which lz4 compresses well."""
    rng = random.Random(seed)
    text = " ".join(f"{rng.choice(WORDS)}:{rng.randrange(100)}" for _ in range(PAGE // 4))
    return f"<{seed}> {text}".encode()[:PAGE]


def noise(seed: int) -> bytes:
    """A page lz4 cannot compress (poor)."""
    return random.Random(seed).randbytes(PAGE)


def check_invariants(engine: Engine) -> None:
    """What must hold after any sequence of operations."""
    stats = engine.stats()
    assert stats["pool_total_size"] <= engine.max_pool
    held = sum(pool.page_count() for pool in engine.pools.values())
    assert stats["stored_pages"] == held
    assert stats["orig_data_size"] == held * PAGE
    assert stats["stores"] - stats["invalidates"] - stats["evicted_pages"] == held
    assert stats["pool_total_size"] == engine.backend.memory_used() + held * ENTRY_OVERHEAD
    # The index counts its own bytes: every object's table adds up to the engine's figure.
    assert engine.index_size == sum(
        tobj.pages.nbytes for pool in engine.pools.values() for tobj in pool.objects.values()
    )
    for pool_id in engine.pools:
        ps = engine.pool_stats(pool_id)
        assert ps["stores"] - ps["invalidates"] - ps["evicted_pages"] == ps["stored_pages"]
    if held == 0:
        assert stats["pool_total_size"] == 0
        assert stats["compr_data_size"] == 0


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [(b"0", 0), (b"7", 7), (b"4711", 4711), (b"10", 10), (str(MAX_INDEX).encode(), MAX_INDEX)],
)
def test_parse_decimal_accepts(name: bytes, value: int) -> None:
    assert parse_decimal(name) == value


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"01",
        b"00",
        b"-1",
        b"+1",
        b"a",
        b"1a",
        b"0x10",
        b" 1",
        b"1 ",
        b"1\n",
        b"1.0",
        b"1_000",
        "\u0661".encode(),
        str(MAX_INDEX + 1).encode(),
        b"9" * 20,
        b"1" * 300,
    ],
)
def test_parse_decimal_rejects(name: bytes) -> None:
    with pytest.raises(BadName):
        parse_decimal(name)


@pytest.mark.parametrize(
    "name", [b"a", b"x.y", b"fs-1", b"_", b"-", b"A_b-9.z", b"x" * 255, b"0", b"x.."]
)
def test_parse_name_accepts(name: bytes) -> None:
    assert parse_name(name) == name.decode()


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b".",
        b"..",
        b".x",
        b"a b",
        b"a/b",
        b"x" * 256,
        b"caf\xc3\xa9",
        b"a\n",
        b"a\x00",
        b"a:b",
        b"*",
    ],
)
def test_parse_name_rejects(name: bytes) -> None:
    with pytest.raises(BadName):
        parse_name(name)


def test_shared_pool_names() -> None:
    name = str(uuid.uuid4())
    assert is_shared_pool_name(name)
    assert is_shared_pool_name(name.upper())
    assert not is_shared_pool_name("fs")
    assert not is_shared_pool_name(name.replace("-", ""))
    assert not is_shared_pool_name("{" + name + "}")
    assert not is_shared_pool_name("urn:uuid:" + name)
    engine = with_pools(make_engine(), FS, SHARED)
    assert engine.pool(SHARED).shared
    assert not engine.pool(FS).shared
    assert not engine.pool(SWAP0).shared


# -- pools and objects -------------------------------------------------------------------


async def test_pool_and_object_errors() -> None:
    engine = with_pools(make_engine(), FS)
    with pytest.raises(PoolExists):
        engine.create_pool(SWAP0)
    with pytest.raises(PoolExists):
        engine.create_object(FS, OBJ)
    with pytest.raises(PoolExists):  # a frontswap pool has exactly one object
        engine.create_object(SWAP0, "x")
    with pytest.raises(NoSuchPool):
        engine.create_object(PoolId(PoolKind.EPHEMERAL, "nope"), "x")
    with pytest.raises(NoSuchPool):
        await engine.flush_pool(PoolId(PoolKind.PERSISTENT, "1"))
    with pytest.raises(NoSuchObject):
        await engine.invalidate_object(FS, "nope")
    with pytest.raises(NoSuchObject):
        await engine.invalidate_object(SWAP0, SWAP_OBJECT)
    assert list(engine.pool(SWAP0).objects) == [SWAP_OBJECT]
    assert engine.stats()["pools"] == 2


async def test_operations_on_missing_pools_and_objects() -> None:
    engine = with_pools(make_engine(), FS)
    with pytest.raises(NoSuchPool):
        await engine.store(PageKey(PoolId(PoolKind.PERSISTENT, "9"), SWAP_OBJECT, 0), page(0))
    with pytest.raises(NoSuchObject):
        await engine.store(eph(0, obj="other"), page(0))
    with pytest.raises(NoSuchPool):
        await engine.load(PageKey(PoolId(PoolKind.EPHEMERAL, "x"), OBJ, 0))
    with pytest.raises(NoSuchObject):
        await engine.load(eph(0, obj="other"))
    with pytest.raises(NoSuchObject):
        await engine.invalidate_page(eph(0, obj="other"))
    assert engine.entry(eph(0, obj="other")) is None
    assert engine.entry(PageKey(PoolId(PoolKind.EPHEMERAL, "x"), OBJ, 0)) is None
    check_invariants(engine)


# -- store, load, invalidate -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["raw", "lz4"])
async def test_store_load_invalidate(backend: str) -> None:
    engine = with_pools(make_engine(backend), FS)
    for key in (swap(0), swap(MAX_INDEX), eph(0), eph(12345)):
        assert await engine.load(key) is None
        await engine.store(key, page(key.index))
        assert await engine.load(key) == page(key.index)
        assert await engine.load(key) == page(key.index)  # not exclusive: still there
        assert await engine.invalidate_page(key)
        assert not await engine.invalidate_page(key)
        assert await engine.load(key) is None
    stats = engine.stats()
    assert stats["stores"] == 4
    assert stats["loads"] == 8
    assert stats["load_misses"] == 8
    assert stats["invalidates"] == 4
    check_invariants(engine)
    assert engine.pool_total_size() == 0


async def test_entry_records_the_store_time() -> None:
    engine = with_pools(make_engine())
    await engine.store(swap(1), page(1))
    first = engine.entry(swap(1))
    assert first is not None
    await engine.store(swap(1), page(2))
    second = engine.entry(swap(1))
    assert second is not None and second is not first
    assert second.mtime_ns >= first.mtime_ns > 0
    assert engine.page_cost(second) == PAGE


async def test_duplicate_store_replaces() -> None:
    engine = with_pools(make_engine("lz4"), FS)
    for key in (swap(3), eph(3)):
        await engine.store(key, page(1))
        await engine.store(key, page(2))
        assert await engine.load(key) == page(2)
    stats = engine.stats()
    assert stats["duplicate_entry"] == 2
    assert stats["stored_pages"] == 2
    assert engine.pool_stats(SWAP0)["duplicate_entry"] == 1
    assert engine.pool_stats(FS)["duplicate_entry"] == 1
    check_invariants(engine)


async def test_duplicate_store_within_one_batch() -> None:
    engine = with_pools(make_engine("lz4"))
    result = await engine.store_many(SWAP0, SWAP_OBJECT, [(0, page(1)), (0, page(2)), (1, page(3))])
    assert result == [True, True, True]
    assert await engine.load_many(SWAP0, SWAP_OBJECT, [0, 1]) == [page(2), page(3)]
    assert engine.stats()["duplicate_entry"] == 1
    check_invariants(engine)


async def test_refused_store_of_existing_page_invalidates_it() -> None:
    """frontswap's rule: a refused duplicate store must not leave the stale page readable."""
    engine = with_pools(make_engine("lz4"))
    await engine.store(swap(0), page(1))  # small: compressible
    await engine.store(swap(1), noise(1))  # a full raw page
    engine.max_pool = engine.pool_total_size()  # now the budget is exactly full
    with pytest.raises(StoreRejected):
        await engine.store(swap(0), noise(2))  # needs more room than page(1) gave back
    assert await engine.load(swap(0)) is None
    assert engine.entry(swap(0)) is None
    assert await engine.load(swap(1)) == noise(1)
    stats = engine.stats()
    assert stats["pool_limit_hit"] == 1
    assert stats["duplicate_entry"] == 1
    check_invariants(engine)


async def test_refused_page_in_batch_does_not_stop_the_rest() -> None:
    engine = with_pools(make_engine("lz4", reject_poor=True))
    batch = [(0, bytes(PAGE)), (1, noise(1)), (2, b"\x01" * PAGE), (3, noise(2))]
    assert await engine.store_many(SWAP0, SWAP_OBJECT, batch) == [True, False, True, False]
    assert engine.stats()["reject_compress_poor"] == 2
    assert await engine.load_many(SWAP0, SWAP_OBJECT, range(4)) == [
        bytes(PAGE),
        None,
        b"\x01" * PAGE,
        None,
    ]
    check_invariants(engine)


async def test_invalidate_range() -> None:
    engine = with_pools(make_engine(), FS)
    await engine.store_many(FS, OBJ, [(i, page(i)) for i in range(10)])
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i)) for i in range(10)])
    assert await engine.invalidate_range(FS, OBJ, 5) == 5
    assert await engine.invalidate_range(SWAP0, SWAP_OBJECT, 8) == 2
    assert await engine.invalidate_range(SWAP0, SWAP_OBJECT, 100) == 0
    assert sorted(engine.get_object(FS, OBJ).pages) == list(range(5))
    assert sorted(engine.get_object(SWAP0, SWAP_OBJECT).pages) == list(range(8))
    assert await engine.load(eph(4)) == page(4)
    assert await engine.load(eph(5)) is None
    check_invariants(engine)
    assert await engine.invalidate_range(FS, OBJ, 0) == 5
    assert await engine.invalidate_range(SWAP0, SWAP_OBJECT, 0) == 8
    assert engine.pool_total_size() == 0
    check_invariants(engine)


async def test_discard_invalidates_a_run_of_pages_as_one_batch() -> None:
    """A discard of an image range: exactly the stored pages in it go, each an invalidate."""
    engine = with_pools(make_engine())
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i)) for i in (1, 2, 5, 9, 100)])
    before = engine.pool_stats(SWAP0)["invalidates"]
    assert await engine.discard(SWAP0, SWAP_OBJECT, range(2, 10)) == 3
    assert sorted(engine.get_object(SWAP0, SWAP_OBJECT).pages) == [1, 100]
    assert engine.pool_stats(SWAP0)["invalidates"] == before + 3
    # A range far larger than what is stored walks the stored pages, not the range.
    assert await engine.discard(SWAP0, SWAP_OBJECT, range(0, 1 << 40)) == 2
    assert await engine.discard(SWAP0, SWAP_OBJECT, range(0, 1 << 40)) == 0
    assert engine.pool_total_size() == 0
    check_invariants(engine)


# -- the budget and eviction -------------------------------------------------------------


async def test_budget_is_exact_for_raw_pages() -> None:
    engine = with_pools(make_engine(max_pool=3 * RAW_COST))
    for i in range(3):
        await engine.store(swap(i), page(i))
    assert engine.pool_total_size() == 3 * RAW_COST
    with pytest.raises(StoreRejected):
        await engine.store(swap(3), page(3))
    assert engine.stats()["pool_limit_hit"] == 1
    check_invariants(engine)


async def test_ephemeral_pages_evicted_lru_first() -> None:
    engine = with_pools(make_engine(max_pool=3 * RAW_COST), FS)
    for i in range(3):
        await engine.store(eph(i), page(i))
    assert await engine.load(eph(0)) == page(0)  # 0 is now the most recently used
    await engine.store(eph(3), page(3))  # evicts 1, the least recently used
    assert engine.entry(eph(1)) is None
    assert engine.entry(eph(0)) is not None
    await engine.store(eph(4), page(4))  # evicts 2
    assert engine.entry(eph(2)) is None
    assert await engine.load(eph(0)) == page(0)
    assert await engine.load(eph(1)) is None
    stats = engine.stats()
    assert stats["evicted_pages"] == 2
    assert stats["pool_limit_hit"] == 0
    assert engine.pool_stats(FS)["evicted_pages"] == 2
    check_invariants(engine)


async def test_restore_refreshes_lru_position() -> None:
    engine = with_pools(make_engine(max_pool=2 * RAW_COST), FS)
    await engine.store(eph(0), page(0))
    await engine.store(eph(1), page(1))
    await engine.store(eph(0), page(10))  # a put is a use: 1 is now the oldest
    await engine.store(eph(2), page(2))
    assert await engine.load(eph(0)) == page(10)
    assert await engine.load(eph(1)) is None
    check_invariants(engine)


async def test_ephemeral_evicted_before_persistent_store_is_refused() -> None:
    engine = with_pools(make_engine(max_pool=3 * RAW_COST), FS)
    for i in range(3):
        await engine.store(eph(i), page(i))
    for i in range(3):
        await engine.store(swap(i), page(100 + i))  # each evicts one ephemeral page
    stats = engine.stats()
    assert stats["evicted_pages"] == 3
    assert stats["pool_limit_hit"] == 0
    assert engine.pool(FS).page_count() == 0
    # Now only persistent pages are held: the next persistent store is refused.
    with pytest.raises(StoreRejected):
        await engine.store(swap(3), page(103))
    assert engine.stats()["pool_limit_hit"] == 1
    check_invariants(engine)


async def test_persistent_pages_are_never_evicted() -> None:
    engine = with_pools(make_engine(max_pool=2 * RAW_COST), FS)
    await engine.store(swap(0), page(0))
    await engine.store(swap(1), page(1))
    for i in range(5):
        with pytest.raises(StoreRejected):
            await engine.store(eph(i), page(i))
    assert engine.stats()["pool_limit_hit"] == 5
    assert engine.pool_stats(FS)["pool_limit_hit"] == 5
    assert await engine.load_many(SWAP0, SWAP_OBJECT, [0, 1]) == [page(0), page(1)]
    assert engine.stats()["evicted_pages"] == 0
    check_invariants(engine)


async def test_ephemeral_store_evicts_other_pools_too() -> None:
    engine = with_pools(make_engine(max_pool=2 * RAW_COST), FS, SHARED)
    await engine.store(eph(0, SHARED), page(0))
    await engine.store(eph(1, SHARED), page(1))
    await engine.store(eph(0), page(2))
    assert engine.pool_stats(SHARED)["evicted_pages"] == 1
    assert await engine.load(eph(0, SHARED)) is None
    assert await engine.load(eph(1, SHARED)) == page(1)
    check_invariants(engine)


async def test_page_larger_than_budget_is_refused() -> None:
    engine = with_pools(make_engine(max_pool=RAW_COST - 1), FS)
    with pytest.raises(StoreRejected):
        await engine.store(swap(0), page(0))
    with pytest.raises(StoreRejected):
        await engine.store(eph(0), page(0))
    assert engine.pool_total_size() == 0
    check_invariants(engine)


@pytest.mark.parametrize("backend", ["raw", "lz4"])
async def test_budget_never_exceeded(backend: str) -> None:
    rng = random.Random(5)
    engine = with_pools(make_engine(backend, max_pool=40_000), FS)
    kinds = [page, noise, lambda s: bytes(PAGE), lambda s: s.to_bytes(8, "little") * 512]
    for step in range(300):
        make = rng.choice(kinds)
        key = swap(rng.randrange(12)) if rng.random() < 0.3 else eph(rng.randrange(40))
        try:
            await engine.store(key, make(rng.randrange(20)))
        except StoreRejected:
            # Refused only once every ephemeral page has been evicted.
            assert engine.pool(FS).page_count() == 0
        if step % 7 == 0:
            await engine.invalidate_page(key)
        check_invariants(engine)
    assert engine.stats()["evicted_pages"] > 0


# -- exclusive gets ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["raw", "lz4"])
async def test_exclusive_gets_invalidate_persistent_and_private(backend: str) -> None:
    engine = with_pools(make_engine(backend, exclusive_gets=True), FS)
    for key in (swap(0), eph(0)):
        await engine.store(key, page(7))
        assert await engine.load(key) == page(7)
        assert await engine.load(key) is None
        assert engine.entry(key) is None
    stats = engine.stats()
    assert stats["loads"] == 2
    assert stats["load_misses"] == 2
    assert stats["invalidates"] == 2
    assert engine.pool_total_size() == 0
    check_invariants(engine)


async def test_exclusive_gets_leave_shared_pools_alone() -> None:
    engine = with_pools(make_engine("lz4", exclusive_gets=True), SHARED)
    await engine.store(eph(0, SHARED), page(8))
    for _ in range(3):
        assert await engine.load(eph(0, SHARED)) == page(8)
    assert engine.pool_stats(SHARED)["invalidates"] == 0
    check_invariants(engine)


async def test_exclusive_load_many_takes_each_page_once() -> None:
    engine = with_pools(make_engine("lz4", exclusive_gets=True))
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i)) for i in range(40)])
    got = await engine.load_many(SWAP0, SWAP_OBJECT, [0, 0, 39, 40, 1])
    assert got == [page(0), None, page(39), None, page(1)]
    assert engine.pool(SWAP0).page_count() == 37
    check_invariants(engine)


async def test_exclusive_get_of_a_deduplicated_page_keeps_the_twin() -> None:
    engine = with_pools(make_engine("lz4", exclusive_gets=True))
    await engine.store(swap(0), page(9))
    await engine.store(swap(1), page(9))
    assert await engine.load(swap(0)) == page(9)
    assert engine.stats()["dedup_pages"] == 0
    assert await engine.load(swap(1)) == page(9)
    assert engine.pool_total_size() == 0
    check_invariants(engine)


async def test_non_exclusive_gets_by_default() -> None:
    engine = with_pools(make_engine("lz4"), FS)
    await engine.store(swap(0), page(1))
    await engine.store(eph(0), page(2))
    for _ in range(2):
        assert await engine.load(swap(0)) == page(1)
        assert await engine.load(eph(0)) == page(2)
    assert engine.stats()["invalidates"] == 0


async def test_cancelled_exclusive_load_loses_nothing() -> None:
    engine = with_pools(make_engine("lz4", exclusive_gets=True))
    await engine.store(swap(0), page(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        await engine.load(swap(0))
    # Either the page is still there, or (if it was handed out) its memory is gone.
    assert engine.entry(swap(0)) is not None or engine.pool_total_size() == 0
    check_invariants(engine)


# -- flush and invalidate_object -----------------------------------------------------------


@pytest.mark.parametrize("backend", ["raw", "lz4"])
async def test_flush_pool_releases_everything(backend: str) -> None:
    engine = with_pools(make_engine(backend), FS)
    engine.create_object(FS, "other")
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i)) for i in range(20)])
    await engine.store_many(FS, OBJ, [(i, page(i)) for i in range(20)])
    await engine.store_many(FS, "other", [(i, noise(i)) for i in range(5)])
    assert await engine.flush_pool(FS) == 25
    with pytest.raises(NoSuchPool):
        await engine.load(eph(0))
    assert FS not in engine.pools
    assert engine.stats()["invalidates"] == 25
    assert engine.stats()["pools"] == 1
    check_invariants(engine)
    assert await engine.flush_pool(SWAP0) == 20
    assert engine.pool_total_size() == 0
    assert engine.stats()["stored_pages"] == 0
    check_invariants(engine)
    # The pool can be made anew, empty.
    engine.create_pool(SWAP0)
    assert await engine.load(swap(0)) is None


async def test_flushed_ephemeral_pages_leave_the_lru() -> None:
    """After a flush, eviction must not trip over pages of the dead pool."""
    engine = with_pools(make_engine(max_pool=4 * RAW_COST), FS)
    engine.create_object(FS, "other")
    await engine.store_many(FS, OBJ, [(i, page(i)) for i in range(2)])
    await engine.store_many(FS, "other", [(i, page(i)) for i in range(2)])
    assert await engine.invalidate_object(FS, "other") == 2
    await engine.flush_pool(FS)
    engine.create_pool(FS)
    engine.create_object(FS, OBJ)
    for i in range(10):  # forces six evictions of live pages
        await engine.store(eph(i), page(i))
    assert engine.stats()["evicted_pages"] == 6
    check_invariants(engine)


async def test_invalidate_object_drops_only_that_object() -> None:
    engine = with_pools(make_engine("lz4"), FS)
    engine.create_object(FS, "other")
    await engine.store_many(FS, OBJ, [(i, page(i)) for i in range(8)])
    await engine.store_many(FS, "other", [(i, page(100 + i)) for i in range(3)])
    before = engine.pool_total_size()
    assert await engine.invalidate_object(FS, OBJ) == 8
    assert engine.pool_total_size() < before
    with pytest.raises(NoSuchObject):
        await engine.load(eph(0))
    assert await engine.load(eph(2, obj="other")) == page(102)
    check_invariants(engine)
    assert await engine.invalidate_object(FS, "other") == 3
    assert engine.pool_total_size() == 0
    assert engine.pool_stats(FS)["stored_pages"] == 0
    check_invariants(engine)


# -- statistics --------------------------------------------------------------------------


async def test_stats_names_and_gauges() -> None:
    engine = with_pools(make_engine("lz4"), FS)
    await engine.store_many(SWAP0, SWAP_OBJECT, [(0, bytes(PAGE)), (1, page(1)), (2, page(1))])
    await engine.store(eph(0), noise(0))
    stats = engine.stats()
    for name in ALL_COUNTERS:
        assert name in stats
        assert name in engine.pool_stats(SWAP0)
    assert stats["max_pool_size"] == engine.max_pool
    assert stats["page_size"] == PAGE
    assert stats["stored_pages"] == 4
    assert stats["same_filled_pages"] == 1
    assert stats["dedup_pages"] == 2
    swap_stats, fs_stats = engine.pool_stats(SWAP0), engine.pool_stats(FS)
    assert swap_stats["stored_pages"] == 3
    assert fs_stats["stored_pages"] == 1
    assert fs_stats["compr_data_size"] == PAGE
    for name in (
        "stored_pages",
        "orig_data_size",
        "compr_data_size",
        "same_filled_pages",
        "dedup_pages",
        "stores",
    ):
        assert swap_stats[name] + fs_stats[name] == stats[name], name
    # Per-pool totals share the backend's overhead pro rata; they add up to within rounding.
    assert (
        abs(swap_stats["pool_total_size"] + fs_stats["pool_total_size"] - stats["pool_total_size"])
        <= 1
    )
    check_invariants(engine)


async def test_a_pool_holding_most_pages_reads_its_gauges_from_what_the_others_leave() -> None:
    """The store's counters are sums over every page, so the gauges of a pool holding
    most pages are the totals less the other pools' (the `.stats` of a 10^6-page image
    then costs the small pools' pages): they must equal its own pages' sums, with pages
    shared within and across pools, same-filled pages and pages recompressed in zstd."""
    engine = with_pools(make_engine("lz4"), FS)
    swap_pages = [(i, bytes(PAGE) if i % 7 == 0 else page(i % 40)) for i in range(120)]
    await engine.store_many(SWAP0, SWAP_OBJECT, swap_pages)
    for i in range(10):  # shares pages 0-4 with the image, and one same-filled page
        await engine.store(eph(i), page(i % 5) if i < 5 else bytes(PAGE) if i == 5 else noise(i))
    backend = engine.backend
    assert isinstance(backend, Lz4Backend)
    backend.recompress_after = 1.0
    await backend.recompress_sweep()
    assert await backend.recompress_sweep() > 0
    await engine.store_many(SWAP0, SWAP_OBJECT, [(200 + i, page(i)) for i in range(3)])
    for pool_id in (SWAP0, FS):
        pool = engine.pool(pool_id)
        handles = [e.handle for tobj in pool.objects.values() for e in tobj.pages.values()]
        same, shared, compressed, zstd = backend.summarize(handles)
        stats = engine.pool_stats(pool_id)
        assert stats["stored_pages"] == len(handles)
        assert stats["same_filled_pages"] == same > 0
        assert stats["dedup_pages"] == shared > 0
        assert stats["compr_data_size"] == round(compressed)
        assert stats["recompressed_pages"] == zstd
    assert engine.pool(SWAP0).page_count() * 2 > engine.stats()["stored_pages"]
    assert engine.pool_stats(FS)["recompressed_pages"] > 0


async def test_single_pool_total_equals_global() -> None:
    engine = with_pools(make_engine("lz4"))
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i % 5)) for i in range(20)])
    assert engine.pool_stats(SWAP0)["pool_total_size"] == engine.pool_total_size()
    assert engine.pool_stats(SWAP0)["compr_data_size"] == engine.stats()["compr_data_size"]


async def test_counters_count_pages_not_calls() -> None:
    engine = with_pools(make_engine("lz4"))
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i)) for i in range(256)])
    await engine.load_many(SWAP0, SWAP_OBJECT, range(300))
    stats = engine.stats()
    assert stats["stores"] == 256
    assert stats["loads"] == 256
    assert stats["load_misses"] == 44
    check_invariants(engine)


async def test_counters_survive_a_flushed_pool() -> None:
    engine = with_pools(make_engine())
    await engine.store(swap(0), page(0))
    await engine.flush_pool(SWAP0)
    stats = engine.stats()
    assert stats["stores"] == 1
    assert stats["invalidates"] == 1
    engine.create_pool(SWAP0)
    assert engine.pool_stats(SWAP0)["stores"] == 0
    check_invariants(engine)


# -- concurrency: what may change while a request awaits its worker thread -------------------


class ThreadedRaw(RawBackend):
    """A backend that awaits worker threads to encode and decode, as remote ones await the
    network: what may change in the engine while a request waits. (lz4 encodes in
    compiled code without awaiting, so these races cannot happen to it.)"""

    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        return await trio.to_thread.run_sync(
            lambda: [Encoded(bytes(p), len(p) + 33) for p in pages], limiter=self.limiter
        )

    async def load_many(
        self, locations: Sequence[Location], handles: Sequence[bytes]
    ) -> list[bytes | None]:
        return await trio.to_thread.run_sync(lambda: list(handles), limiter=self.limiter)


def make_threaded_engine(*, exclusive_gets: bool = False) -> Engine:
    backend = ThreadedRaw(PAGE, trio.CapacityLimiter(2))
    return Engine(backend, max_pool=64 << 20, exclusive_gets=exclusive_gets)


class HeldLimiter:
    """Hold every token of the backend's limiter, so encode/decode wait until released."""

    def __init__(self, engine: Engine) -> None:
        self.limiter = engine.backend.limiter
        self.borrowers = [object() for _ in range(int(self.limiter.total_tokens))]
        for borrower in self.borrowers:
            self.limiter.acquire_on_behalf_of_nowait(borrower)

    def release(self) -> None:
        for borrower in self.borrowers:
            self.limiter.release_on_behalf_of(borrower)


async def run_store_during(
    engine: Engine,
    pool_id: PoolId,
    obj: str,
    pages: Sequence[tuple[int, bytes]],
    meanwhile: Callable[[], object],  # may return an awaitable
) -> list[bool] | Exception:
    """Start store_many, run `meanwhile()` while it awaits its encode, then let it finish."""
    outcome: list[list[bool] | Exception] = []

    async def storer() -> None:
        try:
            outcome.append(await engine.store_many(pool_id, obj, pages))
        except (NoSuchPool, NoSuchObject) as exc:
            outcome.append(exc)

    held = HeldLimiter(engine)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storer)
        await trio.testing.wait_all_tasks_blocked()
        assert not outcome, "the store should be waiting for a worker thread"
        pending = meanwhile()
        if inspect.isawaitable(pending):
            await pending
        held.release()
    return outcome[0]


@pytest.mark.parametrize("pool_id", [SWAP0, FS])
async def test_flush_while_store_many_encodes(pool_id: PoolId) -> None:
    engine = with_pools(make_threaded_engine(), FS)
    obj = SWAP_OBJECT if pool_id == SWAP0 else OBJ
    batch = [(i, page(i)) for i in range(256)]
    result = await run_store_during(engine, pool_id, obj, batch, lambda: engine.flush_pool(pool_id))
    assert isinstance(result, NoSuchPool) or not any(result)
    assert pool_id not in engine.pools
    assert engine.stats()["stored_pages"] == 0
    assert engine.pool_total_size() == 0
    check_invariants(engine)


async def test_flush_and_recreate_while_store_many_encodes() -> None:
    engine = with_pools(make_threaded_engine())
    first = engine.pool(SWAP0)

    async def flush_and_recreate() -> None:
        await engine.flush_pool(SWAP0)
        engine.create_pool(SWAP0)

    batch = [(i, page(i)) for i in range(64)]
    result = await run_store_during(engine, SWAP0, SWAP_OBJECT, batch, flush_and_recreate)
    # The store finished after the flush, so it may land in the new pool; never the old one.
    assert first.page_count() == 0
    if isinstance(result, list) and all(result):
        assert await engine.load_many(SWAP0, SWAP_OBJECT, range(64)) == [p for _, p in batch]
    check_invariants(engine)
    await engine.flush_pool(SWAP0)
    assert engine.pool_total_size() == 0


async def test_invalidate_object_while_store_many_encodes() -> None:
    engine = with_pools(make_threaded_engine(), FS)
    result = await run_store_during(
        engine,
        FS,
        OBJ,
        [(i, page(i)) for i in range(32)],
        lambda: engine.invalidate_object(FS, OBJ),
    )
    assert isinstance(result, NoSuchObject) or not any(result)
    assert OBJ not in engine.pool(FS).objects
    assert engine.pool_total_size() == 0
    check_invariants(engine)


async def test_invalidate_while_load_decodes() -> None:
    """A load that began before an invalidate still returns the right bytes."""
    engine = with_pools(make_threaded_engine(), FS)
    await engine.store_many(FS, OBJ, [(i, page(i)) for i in range(32)])
    got: list[list[bytes | None]] = []

    async def loader() -> None:
        got.append(await engine.load_many(FS, OBJ, range(32)))

    held = HeldLimiter(engine)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader)
        await trio.testing.wait_all_tasks_blocked()
        await engine.flush_pool(FS)
        engine.create_pool(FS)
        engine.create_object(FS, OBJ)
        held.release()
        # New pages, some with the same contents, must not confuse the pending load.
        await engine.store_many(FS, OBJ, [(i, page(i + 1)) for i in range(4)])
    assert got == [[page(i) for i in range(32)]]
    check_invariants(engine)


async def test_exclusive_load_racing_a_flush_frees_memory_once() -> None:
    engine = with_pools(make_threaded_engine(exclusive_gets=True))
    await engine.store_many(SWAP0, SWAP_OBJECT, [(i, page(i)) for i in range(32)])
    got: list[list[bytes | None]] = []

    async def loader() -> None:
        got.append(await engine.load_many(SWAP0, SWAP_OBJECT, range(16)))

    held = HeldLimiter(engine)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loader)
        await trio.testing.wait_all_tasks_blocked()
        assert await engine.flush_pool(SWAP0) == 16  # the 16 being loaded are no longer indexed
        held.release()
    assert got == [[page(i) for i in range(16)]]
    assert engine.pool_total_size() == 0
    check_invariants(engine)


async def test_concurrent_store_many_batches() -> None:
    engine = with_pools(make_threaded_engine(), FS)

    async def store(base: int) -> None:
        batch = [(base + i, page(base + i)) for i in range(64)]
        assert await engine.store_many(FS, OBJ, batch) == [True] * 64

    async with trio.open_nursery() as nursery:
        for base in range(0, 512, 64):
            nursery.start_soon(store, base)
    assert await engine.load_many(FS, OBJ, range(512)) == [page(i) for i in range(512)]
    check_invariants(engine)


# -- a model-based property test ---------------------------------------------------------

PALETTE = [
    bytes(PAGE),
    b"\x5a\xa5\x00\xff\x10\x20\x30\x40" * (PAGE // 8),
    page(1),
    page(2),
    page(3),
    noise(1),
    noise(2),
    b"x" * (PAGE - 1) + b"y",
]
POOLS = ["swap", "eph"]
indexes = st.integers(0, 7)
ops = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(POOLS), indexes, st.integers(0, len(PALETTE) - 1)),
    st.tuples(
        st.just("store_many"),
        st.sampled_from(POOLS),
        st.lists(st.tuples(indexes, st.integers(0, len(PALETTE) - 1)), max_size=6),
    ),
    st.tuples(st.just("load"), st.sampled_from(POOLS), st.lists(indexes, min_size=1, max_size=6)),
    st.tuples(st.just("invalidate"), st.sampled_from(POOLS), indexes),
    st.tuples(st.just("invalidate_range"), st.sampled_from(POOLS), indexes),
    st.tuples(st.just("flush"), st.sampled_from(POOLS)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backend=st.sampled_from(["raw", "lz4"]),
    max_pool=st.integers(0, 30_000),
    exclusive=st.booleans(),
    reject_poor=st.booleans(),
    shared=st.booleans(),
    program=st.lists(ops, max_size=40),
)
async def test_engine_matches_a_dict_model(
    backend: str,
    max_pool: int,
    exclusive: bool,
    reject_poor: bool,
    shared: bool,
    program: list[tuple[object, ...]],
) -> None:
    """Persistent pages behave exactly like a dict; ephemeral ones may miss, never lie."""
    eph_pool = SHARED if shared else FS
    engine = with_pools(
        make_engine(backend, max_pool=max_pool, exclusive_gets=exclusive, reject_poor=reject_poor),
        eph_pool,
    )
    where = {"swap": (SWAP0, SWAP_OBJECT), "eph": (eph_pool, OBJ)}
    models: dict[str, dict[int, bytes]] = {"swap": {}, "eph": {}}

    for op, name, *args in program:
        assert isinstance(name, str)
        pool_id, obj = where[name]
        model = models[name]
        taken_on_get = exclusive and not (name == "eph" and shared)
        if op in ("store", "store_many"):
            batch = [(args[0], args[1])] if op == "store" else args[0]
            pages = [(i, PALETTE[p]) for i, p in batch]  # type: ignore[index, union-attr]
            kept = await engine.store_many(pool_id, obj, pages)
            for (i, data), ok in zip(pages, kept, strict=True):
                if ok:
                    model[i] = data
                else:
                    model.pop(i, None)  # a refused store drops the old copy too
        elif op == "load":
            wanted: list[int] = args[0]  # type: ignore[assignment]
            got = await engine.load_many(pool_id, obj, wanted)
            for i, data in zip(wanted, got, strict=True):
                if name == "swap":
                    assert data == model.get(i)
                else:
                    assert data is None or data == model.get(i)
                if data is None or taken_on_get:
                    model.pop(i, None)  # after a miss, gets keep missing until a put
        elif op == "invalidate":
            index: int = args[0]  # type: ignore[assignment]
            present = await engine.invalidate_page(PageKey(pool_id, obj, index))
            if name == "swap":
                assert present == (index in model)
            elif present:
                assert index in model
            model.pop(index, None)
        elif op == "invalidate_range":
            start: int = args[0]  # type: ignore[assignment]
            await engine.invalidate_range(pool_id, obj, start)
            for i in [i for i in model if i >= start]:
                del model[i]
        else:
            await engine.flush_pool(pool_id)
            engine.create_pool(pool_id)
            if name == "eph":
                engine.create_object(pool_id, obj)
            model.clear()
        check_invariants(engine)

    # Everything the persistent model holds is still there, byte for byte.
    swap_model = models["swap"]
    if not exclusive:
        got = await engine.load_many(SWAP0, SWAP_OBJECT, sorted(swap_model))
        assert got == [swap_model[i] for i in sorted(swap_model)]
    assert set(engine.get_object(SWAP0, SWAP_OBJECT).pages) == set(swap_model)
    assert set(engine.get_object(eph_pool, OBJ).pages) <= set(models["eph"])
    await engine.flush_pool(SWAP0)
    await engine.flush_pool(eph_pool)
    assert engine.pool_total_size() == 0
    check_invariants(engine)


# -- writeback tier -----------------------------------------------------------------------


async def test_a_page_stored_twice_into_the_tier_keeps_the_second_copy(tmp_path: Path) -> None:
    """The old copy's delete must not run after the new copy took its place in the tier."""
    from tmemfs.backends.filestore import FileStore

    limiter = trio.CapacityLimiter(2)
    engine = Engine(
        open_backend("lz4", page_size=PAGE, limiter=limiter, reject_ratio=0.875),
        max_pool=1,
        writeback=FileStore(tmp_path / "tier", PAGE, limiter),
    )
    await engine.open()
    try:
        engine.create_pool(SWAP0)
        for seed in (1, 2):
            await engine.store(swap(5), noise(seed))
        assert await engine.load(swap(5)) == noise(2)
        assert engine.stats()["written_back_pages"] == 2
    finally:
        await engine.close()
