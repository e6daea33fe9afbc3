"""The image view without a mount: range arithmetic, and reads and writes of N.img
as byte ranges over a real engine (SPEC section 4's image semantics)."""

from __future__ import annotations

import random

import pytest
from engine_testlib import PAGE, SWAP0, make_engine
from hypothesis import given
from hypothesis import strategies as st
from tmemfs_testlib import text_page

from tmemfs.engine import SWAP_OBJECT, BadValue
from tmemfs.image import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ImageView,
    UnsupportedMode,
    check_fallocate,
    edge_pages,
    partial_pages,
    whole_pages,
    zero_batches,
)

PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE

ranges = st.tuples(st.integers(0, 40 * PAGE), st.integers(1, 20 * PAGE)).map(
    lambda r: (r[0], r[0] + r[1])
)


@given(ranges)
def test_page_arithmetic_matches_a_byte_by_byte_model(r: tuple[int, int]) -> None:
    off, end = r
    touched = sorted({b // PAGE for b in range(off, end)})
    covered = [i for i in touched if off <= i * PAGE and (i + 1) * PAGE <= end]
    assert list(whole_pages(off, end, PAGE)) == covered
    assert edge_pages(off, end, PAGE) == [i for i in touched if i not in covered]
    assert partial_pages(off, end, PAGE) == edge_pages(off, end, PAGE)


def test_zero_batches_cut_at_batch_boundaries() -> None:
    assert zero_batches(0, 0, 100) == []
    assert zero_batches(50, 250, 100) == [(50, 100), (100, 200), (200, 250)]
    assert zero_batches(100, 200, 100) == [(100, 200)]


@pytest.mark.parametrize(
    ("mode", "offset", "length", "error"),
    [
        (0, 0, PAGE, None),
        (FALLOC_FL_KEEP_SIZE, 0, PAGE, None),
        (PUNCH, 0, PAGE, None),
        (FALLOC_FL_ZERO_RANGE, 0, PAGE, None),
        (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, PAGE, None),
        (FALLOC_FL_PUNCH_HOLE, 0, PAGE, UnsupportedMode),  # punch needs KEEP_SIZE
        (0x08, 0, PAGE, UnsupportedMode),  # COLLAPSE_RANGE
        (PUNCH, -1, PAGE, BadValue),
        (PUNCH, 0, 0, BadValue),
        (0x08, -1, 0, UnsupportedMode),  # the mode is judged first
    ],
)
def test_check_fallocate(mode: int, offset: int, length: int, error: type | None) -> None:
    if error is None:
        check_fallocate(mode, offset, length)
    else:
        with pytest.raises(error):
            check_fallocate(mode, offset, length)


async def _view(size: int) -> ImageView:
    engine = make_engine(pools=[SWAP0])
    await engine.resize_image(SWAP0, size)
    return ImageView(engine)


async def test_reads_and_writes_match_a_bytearray() -> None:
    size = 16 * PAGE
    view = await _view(size)
    model = bytearray(size)
    rng = random.Random(5)
    for _ in range(60):
        off = rng.randrange(size)
        data = rng.randbytes(rng.randrange(1, 3 * PAGE))
        data = data[: size - off]
        assert await view.write(SWAP0, off, data) == len(data)
        model[off : off + len(data)] = data
        lo = rng.randrange(size)
        n = rng.randrange(1, 4 * PAGE)
        assert bytes(await view.read(SWAP0, lo, n)) == bytes(model[lo : lo + n])
    assert bytes(await view.read(SWAP0, size, PAGE)) == b""


async def test_holes_read_as_zeros_and_writes_past_the_end_grow_it() -> None:
    view = await _view(4 * PAGE)
    await view.write(SWAP0, PAGE + 10, b"x" * 20)
    assert bytes(await view.read(SWAP0, 0, 4 * PAGE)) == (
        bytes(PAGE + 10) + b"x" * 20 + bytes(3 * PAGE - 30)
    )
    # Only the page written is stored: a partial write does not store its neighbours.
    assert set(view.engine.pool(SWAP0).objects[SWAP_OBJECT].pages) == {1}
    await view.write(SWAP0, 5 * PAGE, b"y")
    assert view.engine.pool(SWAP0).image_size == 5 * PAGE + 1


async def test_punch_discards_whole_pages_and_zeroes_the_edges() -> None:
    view = await _view(8 * PAGE)
    data = bytes(range(256)) * (8 * PAGE // 256)
    await view.write(SWAP0, 0, data)
    await view.fallocate(SWAP0, PUNCH, PAGE // 2, 3 * PAGE + 100)
    pages = set(view.engine.pool(SWAP0).objects[SWAP_OBJECT].pages)
    assert pages == {0, 3, 4, 5, 6, 7}
    expect = bytearray(data)
    expect[PAGE // 2 : 3 * PAGE + 100] = bytes(3 * PAGE + 100 - PAGE // 2)
    assert bytes(await view.read(SWAP0, 0, 8 * PAGE)) == bytes(expect)
    # KEEP_SIZE: a hole past the end changes nothing, and the size stays.
    await view.fallocate(SWAP0, PUNCH, 8 * PAGE, PAGE)
    assert view.engine.pool(SWAP0).image_size == 8 * PAGE


async def test_zero_range_and_allocation_grow_the_image() -> None:
    view = await _view(PAGE)
    await view.write(SWAP0, 0, b"z" * PAGE)
    await view.fallocate(SWAP0, FALLOC_FL_ZERO_RANGE, 10, 3 * PAGE)
    assert view.engine.pool(SWAP0).image_size == 3 * PAGE
    assert bytes(await view.read(SWAP0, 0, 3 * PAGE)) == b"z" * 10 + bytes(3 * PAGE - 10)
    await view.fallocate(SWAP0, 0, 0, 5 * PAGE)
    assert view.engine.pool(SWAP0).image_size == 5 * PAGE


async def test_write_now_takes_only_what_fits_however_it_compresses() -> None:
    """The fast path (ImageView.write_now) stores a batch only if it would fit even raw;
    a batch it declines changes nothing, and `write` then stores it as before."""
    engine = make_engine("lz4", max_pool=128 << 10, pools=[SWAP0])
    await engine.resize_image(SWAP0, 4 << 20)
    view = ImageView(engine)
    text = b"".join(text_page(i) for i in range(64))
    assert view.write_now(SWAP0, 0, memoryview(text[: 16 * PAGE])) == 16 * PAGE
    assert view.write_now(SWAP0, 100, text[:PAGE]) is None  # not page-aligned
    # Past the image's end: the image grows (a local backend saves no size).
    assert view.write_now(SWAP0, 4 << 20, text[:PAGE]) == PAGE
    assert engine.pool(SWAP0).image_size == (4 << 20) + PAGE
    assert view.read_now(SWAP0, 4 << 20, PAGE) == text[:PAGE]
    assert await engine.resize_image(SWAP0, 4 << 20) is None
    # 256 KiB compresses to far less than the room left, but raw it would not fit.
    before = engine.stats()
    assert view.write_now(SWAP0, 16 * PAGE, text[16 * PAGE :]) is None
    assert engine.stats() == before
    assert await view.write(SWAP0, 16 * PAGE, text[16 * PAGE :]) == 48 * PAGE
    assert view.read_now(SWAP0, 0, 64 * PAGE) == text
    assert engine.stats()["stores"] == 1 + 64  # the page past the end, then the text


async def test_each_read_now_is_right_though_the_reply_buffer_is_reused() -> None:
    """read_now answers from one reply buffer (no fresh 1 MiB per request): each answer
    is right when it is used, smaller and larger reads alike, and after the buffer is
    dropped (the last image closed)."""
    engine = make_engine("lz4", pools=[SWAP0])
    await engine.resize_image(SWAP0, 1 << 20)
    view = ImageView(engine)
    text = b"".join(text_page(i) for i in range(256))
    await view.write(SWAP0, 0, text)
    for off, size in ((0, 256 * PAGE), (PAGE, 8 * PAGE), (100, 5000), (0, 256 * PAGE)):
        assert bytes(view.read_now(SWAP0, off, size)) == text[off : off + size]
    view.drop_reply_buffer()
    assert bytes(view.read_now(SWAP0, 3 * PAGE, 32 * PAGE)) == text[3 * PAGE : 35 * PAGE]
