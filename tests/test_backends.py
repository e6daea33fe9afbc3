"""Backend unit tests: the lz4 and raw stores on their own and under the engine, no FUSE.

What the contract (SPEC section 3) promises of the lz4 backend: same-filled pages cost
no compressed storage; poorly compressing pages are kept raw (or refused with
--reject-poor); identical pages are kept once and their cost is shared, so the page
costs add up to compr_data_size. Everything must round-trip byte for byte.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import lz4.block
import pytest
from engine_testlib import PAGE, SWAP0, make_backend, make_engine
from tmemfs._pagestore import SlabStore

from tmemfs.backends import BACKEND_NAMES, BackendError
from tmemfs.backends.lz4 import Lz4Backend
from tmemfs.engine import (
    ENTRY_OVERHEAD,
    SWAP_OBJECT,
    Engine,
    PageKey,
    PoolId,
    PoolKind,
    StoreRejected,
)

WORDS = ("alpha", "beta", "gamma", "delta", "tmem", "frontswap", "cleancache", "zswap")


# -- pages of every kind -----------------------------------------------------------------


def same_filled(word: bytes, size: int = PAGE) -> bytes:
    """One 8-byte word repeated over the page (a zero page when the word is zero)."""
    assert len(word) == 8
    return word * (size // 8)


def compressible(seed: int, size: int = PAGE) -> bytes:
    """Text-like data, different for every seed, that lz4 shrinks well below a page."""
    rng = random.Random(seed)
    text = " ".join(f"{rng.choice(WORDS)}-{rng.randrange(100)}" for _ in range(size // 4))
    page = f"[{seed}] {text}".encode()[:size]
    assert len(page) == size
    return page


def incompressible(seed: int, size: int = PAGE) -> bytes:
    """Random bytes: lz4 makes them a little bigger, so they are poor."""
    return random.Random(seed).randbytes(size)


def lz4_size(page: bytes) -> int:
    """The payload the lz4 backend keeps for a page: the system liblz4's block (a
    different lz4 release, such as python-lz4's, may differ by a byte)."""
    return SlabStore(PAGE, PAGE, 1).encode(page).length(0)


# Every engine here has frontswap pool 0; the backend is lz4 unless named.
backend_engine = functools.partial(make_engine, pools=(SWAP0,))


def key(index: int) -> PageKey:
    return PageKey(SWAP0, SWAP_OBJECT, index)


def cost_sum(engine: Engine, indexes: Sequence[int]) -> float:
    total = 0.0
    for index in indexes:
        entry = engine.entry(key(index))
        assert entry is not None
        total += engine.page_cost(entry)
    return total


def assert_budget_consistent(engine: Engine) -> None:
    """The engine's memory figure is the backend's plus one index entry per page."""
    stats = engine.stats()
    assert stats["pool_total_size"] == (
        engine.backend.memory_used() + stats["stored_pages"] * ENTRY_OVERHEAD
    )
    assert stats["pool_total_size"] <= engine.max_pool


# -- opening -----------------------------------------------------------------------------


def test_registry_names() -> None:
    assert "lz4" in BACKEND_NAMES
    assert "raw" in BACKEND_NAMES
    assert isinstance(make_backend("lz4"), Lz4Backend)
    assert make_backend("raw").name == "raw"


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("zpool-of-dreams")


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.01, 2.0])
def test_reject_ratio_out_of_range(ratio: float) -> None:
    with pytest.raises(ValueError):
        make_backend("lz4", reject_ratio=ratio)


def test_test_pages_are_what_they_claim() -> None:
    """Guard the helpers: compressible pages compress, random pages do not."""
    assert lz4_size(compressible(1)) < PAGE * 0.875
    assert lz4_size(incompressible(1)) > PAGE * 0.875
    assert compressible(1) != compressible(2)


# -- lz4: same-filled pages --------------------------------------------------------------


@pytest.mark.parametrize(
    "word",
    [bytes(8), b"\xff" * 8, bytes(range(1, 9)), b"ABCDEFGH", b"\x00" * 7 + b"\x01"],
    ids=["zero", "ones", "counting", "ascii", "high-bit"],
)
async def test_same_filled_pages_cost_nothing_and_round_trip(word: bytes) -> None:
    engine = backend_engine("lz4")
    page = same_filled(word)
    await engine.store(key(0), page)
    await engine.store(key(1), page)
    assert await engine.load(key(0)) == page
    assert await engine.load(key(1)) == page
    stats = engine.stats()
    assert stats["same_filled_pages"] == 2
    assert stats["compr_data_size"] == 0
    assert stats["dedup_pages"] == 0
    assert engine.backend.memory_used() == 0
    assert cost_sum(engine, [0, 1]) == 0
    assert engine.pool_stats(SWAP0)["same_filled_pages"] == 2
    assert_budget_consistent(engine)
    assert await engine.invalidate_page(key(0))
    assert engine.stats()["same_filled_pages"] == 1
    assert await engine.load(key(1)) == page


async def test_nearly_same_filled_page_is_compressed() -> None:
    """One byte off in the last word: not same-filled, and it still round-trips."""
    engine = backend_engine("lz4")
    page = bytes(PAGE - 1) + b"\x01"
    await engine.store(key(0), page)
    assert engine.stats()["same_filled_pages"] == 0
    assert engine.stats()["compr_data_size"] > 0
    assert await engine.load(key(0)) == page


async def test_word_with_period_shorter_than_eight_bytes() -> None:
    """A 4-byte pattern is an 8-byte word repeated too."""
    engine = backend_engine("lz4")
    page = b"\xde\xad\xbe\xef" * (PAGE // 4)
    await engine.store(key(0), page)
    assert engine.stats()["same_filled_pages"] == 1
    assert await engine.load(key(0)) == page


# -- lz4: deduplication ------------------------------------------------------------------


async def test_identical_pages_share_one_payload() -> None:
    engine = backend_engine("lz4")
    page = compressible(7)
    await engine.store(key(0), page)
    single = engine.stats()
    await engine.store(key(1), page)
    stats = engine.stats()
    assert stats["dedup_pages"] == 2
    assert stats["compr_data_size"] == single["compr_data_size"] == lz4_size(page)
    # The second reference costs only its index entry, not another payload.
    assert stats["pool_total_size"] - single["pool_total_size"] == ENTRY_OVERHEAD
    # The cost is split between the references, so `du` adds up.
    e0, e1 = engine.entry(key(0)), engine.entry(key(1))
    assert e0 is not None and e1 is not None
    assert engine.page_cost(e0) == engine.page_cost(e1) == lz4_size(page) / 2
    assert cost_sum(engine, [0, 1]) == stats["compr_data_size"]
    assert engine.pool_stats(SWAP0)["dedup_pages"] == 2
    assert engine.pool_stats(SWAP0)["compr_data_size"] == stats["compr_data_size"]
    assert_budget_consistent(engine)


async def test_dedup_counts_every_reference() -> None:
    engine = backend_engine("lz4")
    page = compressible(8)
    for i in range(5):
        await engine.store(key(i), page)
    assert engine.stats()["dedup_pages"] == 5
    assert cost_sum(engine, range(5)) == pytest.approx(lz4_size(page))
    for remaining in (4, 3, 2):
        await engine.invalidate_page(key(remaining))
        assert engine.stats()["dedup_pages"] == remaining
    await engine.invalidate_page(key(1))
    # One reference left: nothing is shared any more, and it bears the whole cost.
    assert engine.stats()["dedup_pages"] == 0
    assert cost_sum(engine, [0]) == lz4_size(page)
    assert await engine.load(key(0)) == page


async def test_invalidating_one_reference_keeps_the_other() -> None:
    engine = backend_engine("lz4")
    page = compressible(9)
    await engine.store(key(0), page)
    await engine.store(key(1), page)
    assert await engine.invalidate_page(key(0))
    assert await engine.load(key(0)) is None
    assert await engine.load(key(1)) == page
    assert engine.stats()["compr_data_size"] == lz4_size(page)
    assert await engine.invalidate_page(key(1))
    assert engine.stats()["compr_data_size"] == 0
    assert engine.pool_total_size() == 0


async def test_overwriting_a_shared_page_leaves_the_other_reference() -> None:
    engine = backend_engine("lz4")
    a, b = compressible(10), compressible(11)
    await engine.store(key(0), a)
    await engine.store(key(1), a)
    await engine.store(key(1), b)
    assert await engine.load(key(0)) == a
    assert await engine.load(key(1)) == b
    assert engine.stats()["dedup_pages"] == 0


async def test_dedup_across_pools_and_objects() -> None:
    engine = backend_engine("lz4")
    eph = PoolId(PoolKind.EPHEMERAL, "fs")
    engine.create_pool(eph)
    engine.create_object(eph, "ino")
    page = compressible(12)
    await engine.store(key(0), page)
    await engine.store(PageKey(eph, "ino", 3), page)
    assert engine.stats()["dedup_pages"] == 2
    await engine.flush_pool(eph)
    assert await engine.load(key(0)) == page
    assert engine.stats()["dedup_pages"] == 0


async def test_different_pages_are_never_shared() -> None:
    """The dedup table compares payloads in full, so near-identical pages stay apart."""
    engine = backend_engine("lz4")
    base = compressible(13)
    pages = [base]
    for pos in (0, 1, PAGE // 2, PAGE - 1):
        flipped = bytearray(base)
        flipped[pos] ^= 0x01
        pages.append(bytes(flipped))
    # A poor page and a compressible one, and a same-filled page whose word is a prefix.
    pages += [incompressible(13), same_filled(base[:8])]
    assert len(set(pages)) == len(pages)
    await engine.store_many(SWAP0, SWAP_OBJECT, list(enumerate(pages)))
    assert engine.stats()["dedup_pages"] == 0
    assert await engine.load_many(SWAP0, SWAP_OBJECT, range(len(pages))) == pages


async def test_payload_equal_to_another_page_is_not_shared() -> None:
    """A page whose bytes equal another page's lz4 payload (zero-padded) is its own page."""
    engine = backend_engine("lz4")
    page = compressible(14)
    payload = lz4.block.compress(page, store_size=False)
    twin = payload + bytes(PAGE - len(payload))
    await engine.store(key(0), page)
    await engine.store(key(1), twin)
    assert await engine.load(key(0)) == page
    assert await engine.load(key(1)) == twin


# -- lz4: poor compression ---------------------------------------------------------------


async def test_poor_pages_are_kept_raw() -> None:
    engine = backend_engine("lz4")
    page = incompressible(20)
    await engine.store(key(0), page)
    stats = engine.stats()
    assert stats["reject_compress_poor"] == 0
    assert stats["compr_data_size"] == PAGE  # kept raw, like zram's huge pages
    entry = engine.entry(key(0))
    assert entry is not None
    assert engine.page_cost(entry) == PAGE
    assert await engine.load(key(0)) == page
    assert_budget_consistent(engine)


async def test_poor_pages_refused_with_reject_poor() -> None:
    engine = backend_engine("lz4", reject_poor=True)
    good = compressible(21)
    await engine.store(key(0), good)
    with pytest.raises(StoreRejected):
        await engine.store(key(1), incompressible(21))
    stats = engine.stats()
    assert stats["reject_compress_poor"] == 1
    assert stats["pool_limit_hit"] == 0
    assert stats["stored_pages"] == 1
    assert await engine.load(key(1)) is None
    # Same-filled and compressible pages are unaffected.
    await engine.store(key(2), bytes(PAGE))
    assert await engine.load(key(0)) == good
    assert engine.pool_stats(SWAP0)["reject_compress_poor"] == 1


async def test_reject_poor_invalidates_the_old_copy() -> None:
    engine = backend_engine("lz4", reject_poor=True)
    await engine.store(key(0), compressible(22))
    with pytest.raises(StoreRejected):
        await engine.store(key(0), incompressible(22))
    assert await engine.load(key(0)) is None
    assert engine.entry(key(0)) is None
    assert engine.pool_total_size() == 0


async def test_reject_ratio_sets_the_bar() -> None:
    """A page that compresses to half a page is poor at ratio 0.25, fine at 0.875."""
    half = compressible(23)[: PAGE // 2] + incompressible(23)[: PAGE // 2]
    ratio = lz4_size(half) / PAGE
    assert 0.25 < ratio < 0.875
    strict = backend_engine("lz4", reject_poor=True, reject_ratio=0.25)
    with pytest.raises(StoreRejected):
        await strict.store(key(0), half)
    lenient = backend_engine("lz4", reject_poor=True, reject_ratio=0.875)
    await lenient.store(key(0), half)
    assert await lenient.load(key(0)) == half


def _page_compressing_to_exactly_a_page() -> bytes:
    """A page whose lz4 block is exactly PAGE bytes: a zero run, then random bytes.

    Random bytes are literals (a 4096-byte literal run is 4114 bytes in the block
    format); a run of z zeros is one literal and one match, so each zero saves about
    a byte and z near 22 lands on PAGE exactly. The block format fixes this, so the
    search always finds one: it fails rather than skips if it does not.
    """
    for seed in range(8):
        tail = random.Random(seed).randbytes(PAGE)
        for zeros in range(64):
            page = bytes(zeros) + tail[: PAGE - zeros]
            if len(lz4.block.compress(page, store_size=False)) == PAGE:
                return page
    raise AssertionError("no page compresses to exactly PAGE bytes")


async def test_reject_ratio_one_round_trips_a_page_of_exact_size() -> None:
    page = _page_compressing_to_exactly_a_page()
    engine = backend_engine("lz4", reject_ratio=1.0)
    await engine.store(key(0), page)
    assert await engine.load(key(0)) == page


# -- lz4: round trips and batches ---------------------------------------------------------


async def test_random_pages_round_trip() -> None:
    engine = backend_engine("lz4")
    rng = random.Random(30)
    pages: list[bytes] = []
    for i in range(64):
        kind = i % 4
        if kind == 0:
            pages.append(incompressible(rng.randrange(1 << 30)))
        elif kind == 1:
            pages.append(compressible(rng.randrange(1 << 30)))
        elif kind == 2:
            pages.append(same_filled(rng.randbytes(8)))
        else:  # random bytes from a tiny alphabet: somewhere in between
            pages.append(bytes(rng.choice(b"ab\x00") for _ in range(PAGE)))
    for i, page in enumerate(pages):
        await engine.store(key(i), page)
    for i, page in enumerate(pages):
        assert await engine.load(key(i)) == page
    assert_budget_consistent(engine)


@pytest.mark.parametrize("name", ["lz4", "raw"])
async def test_batch_of_256_pages_round_trips_in_order(name: str) -> None:
    engine = backend_engine(name)
    pages = [
        compressible(i) if i % 3 else (incompressible(i) if i % 2 else same_filled(b"%8d" % i))
        for i in range(256)
    ]
    assert await engine.store_many(SWAP0, SWAP_OBJECT, list(enumerate(pages))) == [True] * 256
    assert engine.stats()["stores"] == 256
    indexes = list(reversed(range(256)))
    got = await engine.load_many(SWAP0, SWAP_OBJECT, indexes)
    assert got == [pages[i] for i in indexes]
    assert engine.stats()["loads"] == 256
    assert_budget_consistent(engine)


async def test_lz4_backend_accounting_directly() -> None:
    """store/invalidate keep the backend's own figures exact, with no engine."""
    backend = make_backend("lz4")
    page = compressible(40)
    enc = await backend.encode_many([page, page, bytes(PAGE), incompressible(40)])
    assert [e.poor for e in enc] == [False, False, False, True]
    assert enc[2].cost == 0
    handles = [backend.store(e) for e in enc]
    assert backend.stats() == {
        "compr_data_size": lz4_size(page) + PAGE,
        "same_filled_pages": 1,
        "dedup_pages": 2,
        "recompressed_pages": 0,
        "recompress_saved_bytes": 0,
        "codec_lz4_pages": 3,
        "codec_lz4_data_size": lz4_size(page) + PAGE,
        "codec_zstd_pages": 0,
        "codec_zstd_data_size": 0,
        "codec_zstd_dict_pages": 0,
        "codec_zstd_dict_data_size": 0,
        "codec_zstd_dict_dictionary_size": 0,
        "recompressed_loads": 0,
    }
    assert backend.is_shared(handles[0]) and backend.is_shared(handles[1])
    assert backend.is_same_filled(handles[2]) and not backend.is_shared(handles[2])
    assert await backend.load_many([], handles) == [page, page, bytes(PAGE), incompressible(40)]
    # What encode said a new payload costs is exactly what memory_used grows by.
    used = backend.memory_used()
    assert used == enc[0].cost + enc[3].cost
    for handle in handles:
        backend.invalidate(handle)
    assert backend.memory_used() == 0
    assert set(backend.stats().values()) == {0}


# -- raw ---------------------------------------------------------------------------------


async def test_raw_backend_costs_a_full_page_each() -> None:
    engine = backend_engine("raw")
    pages = [bytes(PAGE), bytes(PAGE), compressible(50), incompressible(50)]
    await engine.store_many(SWAP0, SWAP_OBJECT, list(enumerate(pages)))
    stats = engine.stats()
    assert stats["compr_data_size"] == 4 * PAGE
    assert stats["same_filled_pages"] == 0
    assert stats["dedup_pages"] == 0
    assert cost_sum(engine, range(4)) == 4 * PAGE
    assert await engine.load_many(SWAP0, SWAP_OBJECT, range(4)) == pages
    assert_budget_consistent(engine)
    await engine.flush_pool(SWAP0)
    assert engine.pool_total_size() == 0
    assert engine.backend.stats()["compr_data_size"] == 0


async def test_raw_backend_keeps_a_copy() -> None:
    """A caller's buffer changing after the store must not change the stored page."""
    engine = backend_engine("raw")
    buf = bytearray(compressible(51))
    await engine.store(key(0), bytes(buf))
    await engine.store_many(SWAP0, SWAP_OBJECT, [(1, buf)])  # type: ignore[list-item]
    expected = bytes(buf)
    buf[:4] = b"XXXX"
    assert await engine.load(key(0)) == expected
    assert await engine.load(key(1)) == expected


async def test_lz4_backend_keeps_a_copy() -> None:
    engine = backend_engine("lz4")
    buf = bytearray(incompressible(52))
    await engine.store_many(SWAP0, SWAP_OBJECT, [(0, buf)])  # type: ignore[list-item]
    expected = bytes(buf)
    buf[:4] = b"XXXX"
    assert await engine.load(key(0)) == expected
