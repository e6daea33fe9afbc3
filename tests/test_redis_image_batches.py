"""The redis backend's image path, a batch per request, against the page-by-page path.

An image write on a remote backend is kept as one batch (`Engine.store_run`: one
compiled encode, the batch's payloads sent as they are) and an image read decodes the
whole reply into one buffer (`Engine.load_run_into`). What they keep and return must
be what the page-by-page path (`store_many`, `load_many`) keeps and returns, byte for
byte, and a Redis that cannot answer must give the same errors: a refused write
leaves no page (the old copies go too), a read of a persistent page is PageLost.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import lz4.block
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_servers import RedisFactory
from tmemfs._pagestore import SlabStore, decode_payloads
from tmemfs_testlib import random_page

from tmemfs.backends import open_backend
from tmemfs.engine import (
    ENTRY_OVERHEAD,
    SWAP_OBJECT,
    Engine,
    PageLost,
    PoolId,
    PoolKind,
    StoreRejected,
)
from tmemfs.engine.inspection import page_cost
from tmemfs.image import ImageView

pytest_plugins = ["redis_servers"]

PAGE = 4096
SWAP0 = PoolId(PoolKind.PERSISTENT, "0")
SWAP1 = PoolId(PoolKind.PERSISTENT, "1")

# A page of each kind the codec tells apart: same-filled, compressible, incompressible.
page_kinds = st.one_of(
    st.binary(min_size=8, max_size=8).map(lambda word: word * (PAGE // 8)),
    st.tuples(st.binary(min_size=1, max_size=64), st.integers(0, 255)).map(
        lambda t: (t[0] * (PAGE // len(t[0]) + 1))[: PAGE - 1] + bytes([t[1]])
    ),
    st.integers(0, 2**32).map(random_page),
)


def reference_page(payload: bytes | None) -> bytes:
    """The codec's format, decoded page by page in Python (None: zeros)."""
    if payload is None:
        return bytes(PAGE)
    if len(payload) == 8:
        return payload * (PAGE // 8)
    if len(payload) == PAGE:
        return payload
    return lz4.block.decompress(payload, uncompressed_size=PAGE)


@settings(max_examples=60, deadline=None)
@given(pages=st.lists(page_kinds, min_size=1, max_size=40), holes=st.data())
def test_a_batch_of_payloads_is_each_pages_payload(
    pages: list[bytes], holes: st.DataObject
) -> None:
    batch = SlabStore(PAGE, PAGE * 7 // 8).encode(b"".join(pages))
    payloads = batch.payloads()
    assert payloads == [batch.payload(i) for i in range(batch.count)]
    missing = holes.draw(st.sets(st.integers(0, len(pages) - 1)))
    reply: list[bytes | None] = [None if i in missing else p for i, p in enumerate(payloads)]
    out = bytearray(b"\xaa" * (len(pages) * PAGE))  # every byte must be written
    decode_payloads(reply, PAGE, out)
    assert bytes(out) == b"".join(reference_page(p) for p in reply)
    assert bytes(out) == b"".join(bytes(PAGE) if i in missing else p for i, p in enumerate(pages))


async def redis_engine(url: str, *, max_pool: int = 64 << 20, timeout: float = 2.0) -> Engine:
    backend = open_backend(
        url, page_size=PAGE, limiter=trio.CapacityLimiter(2), reject_ratio=0.875, timeout=timeout
    )
    engine = Engine(backend, max_pool=max_pool)
    await engine.open()
    return engine


@contextlib.asynccontextmanager
async def swap_image(url: str, pages: int, *, timeout: float = 2.0) -> AsyncIterator[ImageView]:
    """A redis engine with pool SWAP0's image of `pages` pages, closed on the way out."""
    engine = await redis_engine(url, timeout=timeout)
    try:
        engine.create_pool(SWAP0)
        await engine.resize_image(SWAP0, pages * PAGE)
        yield ImageView(engine)
    finally:
        await engine.close()


def image_data(pages: int, seed: int) -> bytes:
    """Pages of each kind, as an image holds them."""
    kinds = (lambda i: bytes(PAGE), lambda i: bytes([i % 256]) * PAGE, random_page)
    text = b"".join(b"line %d of a text file\n" % i for i in range(200))[:PAGE]
    return b"".join(text if i % 5 == 4 else kinds[i % 3](seed * 100_000 + i) for i in range(pages))


async def test_batched_image_path_keeps_and_returns_what_the_page_path_does(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    engine = await redis_engine(server.url)
    try:
        view = ImageView(engine)
        pages = 300  # more than a chunk of 256: a request across two hashes
        data = image_data(pages, 1)
        for pool_id in (SWAP0, SWAP1):
            engine.create_pool(pool_id)
            await engine.resize_image(pool_id, 2 * pages * PAGE)
        # The batch path on pool 0, page by page on pool 1 (store_many, as a setup
        # with --reject-poor or a tier would).
        await view.write(SWAP0, PAGE, data)
        stored = await engine.store_many(
            SWAP1, SWAP_OBJECT, [(1 + i, data[i * PAGE : (i + 1) * PAGE]) for i in range(pages)]
        )
        assert all(stored)
        for pool_id in (SWAP0, SWAP1):
            got = await view.read(pool_id, 0, (pages + 10) * PAGE)
            assert bytes(got) == bytes(PAGE) + data + bytes(9 * PAGE)
            # The same pages, page by page.
            loaded = await engine.load_many(pool_id, SWAP_OBJECT, range(pages + 2))
            assert loaded[0] is None and loaded[-1] is None
            assert b"".join(p for p in loaded if p is not None) == data
        # Same payloads in Redis, same accounting, whichever path kept them.
        assert (
            engine.pool_stats(SWAP0)["compr_data_size"]
            == (engine.pool_stats(SWAP1)["compr_data_size"])
        )
        assert (
            engine.pool_stats(SWAP0)["same_filled_pages"]
            == (engine.pool_stats(SWAP1)["same_filled_pages"])
        )
        assert engine.pool_stats(SWAP0)["stored_pages"] == pages
        # Summed in one call as the page-by-page look would.
        entries = list(engine.get_object(SWAP0, SWAP_OBJECT).pages.values())
        assert engine.pool_stats(SWAP0)["compr_data_size"] == sum(
            page_cost(engine, e) for e in entries
        )
        assert engine.pool_stats(SWAP0)["same_filled_pages"] == sum(
            engine.backend.is_same_filled(e.handle) for e in entries
        )
        # An overwrite replaces every page: the old copies are not counted twice.
        again = image_data(pages, 2)
        await view.write(SWAP0, PAGE, again)
        assert bytes(await view.read(SWAP0, PAGE, pages * PAGE)) == again
        assert engine.pool_stats(SWAP0)["stored_pages"] == pages
        assert engine.pool_stats(SWAP0)["duplicate_entry"] == pages
    finally:
        await engine.close()


async def test_a_write_into_a_hung_redis_leaves_no_page_and_a_read_is_lost(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    async with swap_image(server.url, 64, timeout=0.5) as view:
        engine = view.engine
        first = image_data(64, 3)
        await view.write(SWAP0, 0, first)
        server.pause()
        try:
            with pytest.raises(StoreRejected):
                await view.write(SWAP0, 0, image_data(32, 4))
            with pytest.raises(PageLost):
                await view.read(SWAP0, 32 * PAGE, 32 * PAGE)
        finally:
            server.resume()
        # The refused pages are gone, old copies included; the others are as written.
        assert engine.pool_stats(SWAP0)["stored_pages"] == 32
        assert engine.pool_stats(SWAP0)["reject_alloc_fail"] == 32
        got = await view.read(SWAP0, 0, 64 * PAGE)
        assert bytes(got) == bytes(32 * PAGE) + first[32 * PAGE :]


async def test_a_page_redis_lost_makes_the_image_read_lost(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    async with swap_image(server.url, 16) as view:
        engine = view.engine
        await view.write(SWAP0, 0, image_data(16, 5))
        server.cli("flushall")
        with pytest.raises(PageLost):
            await view.read(SWAP0, 0, 16 * PAGE)
        assert engine.pool_stats(SWAP0)["lost_pages"] == 16
        with pytest.raises(PageLost):  # lost stays lost
            await view.read(SWAP0, 0, PAGE)


async def test_a_batch_that_does_not_fit_is_decided_page_by_page(
    redis_factory: RedisFactory,
) -> None:
    """Under a budget too small for the whole batch, store_many keeps what fits."""
    server = redis_factory()
    async with swap_image(server.url, 64) as view:
        engine = view.engine
        engine.max_pool = engine.pool_total_size() + 10 * ENTRY_OVERHEAD  # room for 10 pages
        with pytest.raises(StoreRejected):
            await view.write(SWAP0, 0, image_data(64, 6))
        assert engine.pool_stats(SWAP0)["stored_pages"] == 10
        assert engine.pool_stats(SWAP0)["pool_limit_hit"] == 54
