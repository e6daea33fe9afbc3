"""FileStore, the --writeback FILE tier, on its own: no engine, no FUSE.

What it promises: payloads round-trip byte for byte; a replacement stays in its slot;
freed slots are reused lowest first before the file grows; a failed write raises
StoreUnavailable and never leaves a location pointing at a slot that holds someone
else's or a half-written payload; a slot being read is never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmemfs.backends.filestore import FileStore
from tmemfs.backends.store import Location, StoreUnavailable

PAGE = 4096


def loc(index: int, pool: str = "frontswap/0", generation: int = 1, obj: str = "") -> Location:
    return Location(pool, generation, obj, index)


def payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


@contextlib.asynccontextmanager
async def opened(path: Path, page_size: int = PAGE) -> AsyncIterator[FileStore]:
    store = FileStore(path, page_size, trio.CapacityLimiter(4))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FileStore]:
    async with opened(tmp_path / "tier") as store:
        yield store


def slot_bytes(store: FileStore, slot: int, length: int) -> bytes:
    """What the file holds at a slot, read behind the store's back."""
    with open(store.path, "rb") as f:
        f.seek(slot * store.page_size)
        return f.read(length)


def file_slots(store: FileStore) -> float:
    return os.path.getsize(store.path) / store.page_size


def check_index(store: FileStore) -> None:
    """Every slot below the end is used by exactly one location or free, never both."""
    used = [
        packed >> store._shift for pages in store._objects.values() for packed in pages.values()
    ]
    assert len(used) == len(set(used)) == store._entries
    assert not set(used) & store._free
    assert set(used) | store._free | store._zombies == set(range(store._end))


# -- the ordinary paths ---------------------------------------------------------------------


async def test_round_trip_in_batches(store: FileStore) -> None:
    rng = random.Random(1)
    lengths = [1, PAGE, PAGE - 1, *(rng.randrange(1, PAGE + 1) for _ in range(597))]
    items = [(loc(i), payload(i, n)) for i, n in enumerate(lengths)]
    for start in range(0, len(items), 64):
        await store.put_many(items[start : start + 64])
    order = list(range(len(items)))
    rng.shuffle(order)
    for start in range(0, len(order), 100):
        wanted = order[start : start + 100]
        assert await store.get_many([items[i][0] for i in wanted]) == [items[i][1] for i in wanted]
    assert file_slots(store) <= len(items)
    check_index(store)


async def test_replace_stays_in_its_slot(store: FileStore) -> None:
    await store.put_many([(loc(i), payload(i, PAGE)) for i in range(3)])
    size = os.path.getsize(store.path)
    shorter = payload(99, 100)
    await store.put_many([(loc(1), shorter)])
    assert os.path.getsize(store.path) == size
    assert slot_bytes(store, 1, 100) == shorter
    assert await store.get_many([loc(0), loc(1), loc(2)]) == [
        payload(0, PAGE),
        shorter,
        payload(2, PAGE),
    ]
    # Longer again, and twice in one batch: the last payload wins.
    await store.put_many([(loc(1), payload(5, 50)), (loc(1), payload(6, 3000))])
    assert await store.get_many([loc(1)]) == [payload(6, 3000)]
    assert slot_bytes(store, 1, 3000) == payload(6, 3000)
    assert os.path.getsize(store.path) == size


async def test_freed_slots_are_reused_lowest_first(store: FileStore) -> None:
    await store.put_many([(loc(i), payload(i, PAGE)) for i in range(10)])
    size = os.path.getsize(store.path)
    await store.delete_many([loc(7), loc(3)])
    await store.put_many([(loc(100), payload(100, 200))])
    assert slot_bytes(store, 3, 200) == payload(100, 200)
    await store.put_many([(loc(101), payload(101, 300))])
    assert slot_bytes(store, 7, 300) == payload(101, 300)
    assert os.path.getsize(store.path) == size
    await store.put_many([(loc(102), payload(102, PAGE))])
    assert os.path.getsize(store.path) == size + PAGE
    expected = {loc(i): payload(i, PAGE) for i in range(10) if i not in (3, 7)}
    expected |= {
        loc(100): payload(100, 200),
        loc(101): payload(101, 300),
        loc(102): payload(102, PAGE),
    }
    assert await store.get_many(list(expected)) == list(expected.values())
    check_index(store)


async def test_free_end_is_cut_off_at_the_next_put(store: FileStore) -> None:
    await store.put_many([(loc(i), payload(i, PAGE)) for i in range(10)])
    await store.delete_many([loc(i) for i in range(4, 10)])
    await store.put_many([(loc(4), payload(44, PAGE))])
    assert file_slots(store) == 5
    assert await store.get_many([loc(i) for i in range(5)]) == [
        *(payload(i, PAGE) for i in range(4)),
        payload(44, PAGE),
    ]


async def test_unknown_locations_give_none(store: FileStore) -> None:
    assert await store.get_many([]) == []
    assert await store.get_many([loc(1)]) == [None]
    await store.put_many([(loc(1), b"one"), (loc(1, generation=2), b"two")])
    assert await store.get_many(
        [loc(2), loc(1), loc(1, pool="frontswap/1"), loc(1, generation=2), loc(1, obj="x")]
    ) == [None, b"one", None, b"two", None]
    await store.delete_many([loc(1), loc(1), loc(5), loc(1, obj="nothing")])
    assert await store.get_many([loc(1), loc(1, generation=2)]) == [None, b"two"]
    check_index(store)


async def test_payload_longer_than_a_slot_is_refused(store: FileStore) -> None:
    await store.put_many([(loc(0), b"kept")])
    with pytest.raises(ValueError, match="does not fit"):
        await store.put_many([(loc(1), b"new"), (loc(0), b"x" * (PAGE + 1))])
    assert await store.get_many([loc(0), loc(1)]) == [b"kept", None]


async def test_memory_used_follows_the_index(store: FileStore) -> None:
    assert store.memory_used() == 0
    await store.put_many([(loc(i), b"p") for i in range(1000)])
    full = store.memory_used()
    assert 1000 * 50 < full < 1000 * 500
    await store.put_many([(loc(i, obj=f"file{i}"), b"p") for i in range(100)])
    assert store.memory_used() > full + 100 * 300  # objects of their own cost more
    await store.delete_many([loc(i) for i in range(1000)])
    await store.delete_many([loc(i, obj=f"file{i}") for i in range(100)])
    assert store.memory_used() < 100 * 100  # at most stale free-list entries


# -- open and close -------------------------------------------------------------------------


async def test_open_truncates_and_restricts_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "tier"
    path.write_bytes(b"old contents" * 1000)
    path.chmod(0o644)
    async with opened(path) as store:
        assert os.path.getsize(path) == 0
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await store.get_many([loc(0)]) == [None]
        assert store.description == f"file {path}"
    assert path.exists()  # close removes nothing


async def test_open_refuses_a_directory(tmp_path: Path) -> None:
    store = FileStore(tmp_path, PAGE, trio.CapacityLimiter(1))
    with pytest.raises(StoreUnavailable, match="is a directory"):
        await store.open()


async def test_open_refuses_what_cannot_be_opened(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "missing" / "tier", PAGE, trio.CapacityLimiter(1))
    with pytest.raises(StoreUnavailable, match="cannot open"):
        await store.open()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StoreUnavailable, match="not a regular file"):
        await FileStore(fifo, PAGE, trio.CapacityLimiter(1)).open()


async def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "tier", PAGE, trio.CapacityLimiter(1))
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.put_many([(loc(0), b"x")])
    await store.open()
    await store.put_many([(loc(0), b"x")])
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get_many([loc(0)])
    assert (tmp_path / "tier").exists()


async def test_close_from_a_cancelled_scope_still_closes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "tier", PAGE, trio.CapacityLimiter(1))
    await store.open()
    fd = store._fd
    assert fd is not None
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


# -- write failures -------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a 64k tmpfs to fill up needs root")
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


async def test_full_disk_raises_and_keeps_what_was_stored(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "tiny") as tiny:
        async with opened(tiny / "tier") as store:
            old = [(loc(i), payload(i, PAGE)) for i in range(8)]
            await store.put_many(old)
            # 64k is 16 pages: replacements first (in place, already allocated), then
            # 12 new pages of which at most 8 fit.
            replaced = [(loc(i), payload(50 + i, PAGE)) for i in (0, 2)]
            new = [(loc(100 + i), payload(100 + i, PAGE)) for i in range(12)]
            with pytest.raises(StoreUnavailable, match="No space left"):
                await store.put_many([*new, *replaced])
            check_index(store)
            expected = dict(old) | dict(replaced)
            assert await store.get_many(list(expected)) == list(expected.values())
            got = await store.get_many([location for location, _ in new])
            assert None in got
            for (_, data), back in zip(new, got, strict=True):
                assert back in (data, None)
            # Space comes back when pages are deleted: slots are reused, nothing grows.
            stored_new = [location for (location, _), back in zip(new, got, strict=True) if back]
            await store.delete_many(stored_new)
            size = os.path.getsize(store.path)
            again = new[: len(stored_new)]
            await store.put_many(again)
            assert os.path.getsize(store.path) <= size
            assert await store.get_many([location for location, _ in again]) == [
                data for _, data in again
            ]
            check_index(store)


def failing_pwrite(monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """os.pwrite writes half of its data and fails with EIO on the `fail_at`-th call."""
    real = os.pwrite
    calls = iter(range(1, 1 << 30))

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if next(calls) == fail_at:
            real(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


async def test_write_error_forgets_only_the_half_written_slot(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put_many([(loc(i), payload(i, 1000)) for i in range(6)])  # slots 0..5
    # Written in slot order: loc 1 (in place), loc 3 (in place, fails half way),
    # loc 5 (in place, never written), then new ones in slots 6 and 7 (never written).
    batch = [(loc(i), payload(10 + i, 2000)) for i in (5, 3, 1)]
    batch += [(loc(20), payload(20, 2000)), (loc(21), payload(21, 2000))]
    failing_pwrite(monkeypatch, fail_at=2)
    with pytest.raises(StoreUnavailable, match="Input/output error"):
        await store.put_many(batch)
    monkeypatch.undo()
    check_index(store)
    assert await store.get_many([loc(i) for i in (0, 1, 2, 3, 4, 5, 20, 21)]) == [
        payload(0, 1000),
        payload(11, 2000),
        payload(2, 1000),
        None,
        payload(4, 1000),
        payload(5, 1000),
        None,
        None,
    ]
    # The half-written slot is free again and is the first one reused.
    await store.put_many([(loc(30), b"reuse")])
    assert slot_bytes(store, 3, 5) == b"reuse"


async def test_cancelled_put_changes_nothing(store: FileStore) -> None:
    await store.put_many([(loc(0), b"zero")])
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.put_many([(loc(0), b"new zero"), (loc(1), b"one")])
    assert await store.get_many([loc(0), loc(1)]) == [b"zero", None]
    check_index(store)


# -- reads and writes at the same time ------------------------------------------------------


def blocking(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[threading.Event, Callable[[], None]]:
    """Make os.<name> wait, once, until released; returns (entered, release)."""
    real = getattr(os, name)
    entered, go = threading.Event(), threading.Event()
    first = [True]

    def wrapper(*args: object) -> object:
        if first[0]:
            first[0] = False
            entered.set()
            assert go.wait(5), "the test never released the blocked call"
        return real(*args)

    monkeypatch.setattr(os, name, wrapper)
    return entered, go.set


async def test_read_waits_for_an_in_place_rewrite(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put_many([(loc(0), payload(0, PAGE))])
    entered, release = blocking(monkeypatch, "pwrite")
    got: list[bytes | None] = []

    async def read() -> None:
        got.extend(await store.get_many([loc(0)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.put_many, [(loc(0), payload(1, PAGE))])
        await trio.to_thread.run_sync(entered.wait, 5)
        nursery.start_soon(read)
        await trio.sleep(0.05)
        assert got == []  # neither a torn page nor the old one
        release()
    assert got == [payload(1, PAGE)]
    check_index(store)

    # A delete waits too: had it freed the slot under the write, the write would have
    # brought the location back, pointing at a free slot.
    entered, release = blocking(monkeypatch, "pwrite")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.put_many, [(loc(0), payload(2, PAGE))])
        await trio.to_thread.run_sync(entered.wait, 5)
        nursery.start_soon(store.delete_many, [loc(0)])
        await trio.sleep(0.05)
        assert store._entries == 1
        release()
    assert await store.get_many([loc(0)]) == [None]
    check_index(store)


async def test_slot_being_read_is_neither_overwritten_nor_reused(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put_many([(loc(0), payload(0, PAGE)), (loc(1), payload(1, PAGE))])
    entered, release = blocking(monkeypatch, "pread")
    got: list[bytes | None] = []

    async def read() -> None:
        got.extend(await store.get_many([loc(0)]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.to_thread.run_sync(entered.wait, 5)
        # Slot 0 is being read: the replacement goes elsewhere, and once loc 0 is
        # deleted its old slot still is not handed out.
        await store.put_many([(loc(0), payload(2, PAGE))])
        await store.delete_many([loc(0)])
        await store.put_many([(loc(5), payload(5, PAGE))])
        assert slot_bytes(store, 0, PAGE) == payload(0, PAGE)
        release()
    assert got == [payload(0, PAGE)]
    check_index(store)
    await store.put_many([(loc(6), payload(6, 10))])
    assert slot_bytes(store, 0, 10) == payload(6, 10)  # free again once the read ended


# -- against a model ------------------------------------------------------------------------

SMALL_PAGE = 64
locations = st.builds(
    Location,
    st.sampled_from(["frontswap/0", "cleancache/a"]),
    st.integers(0, 1),
    st.sampled_from(["", "obj"]),
    st.integers(0, 7),
)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.lists(st.tuples(locations, st.binary(max_size=SMALL_PAGE)), max_size=8),
        ),
        st.tuples(st.just("get"), st.lists(locations, max_size=8)),
        st.tuples(st.just("delete"), st.lists(locations, max_size=8)),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
async def test_behaves_like_a_dict(ops: list[tuple[str, list[Any]]]) -> None:
    model: dict[Location, bytes] = {}
    peak = 0
    with tempfile.TemporaryDirectory() as tmp:
        async with opened(Path(tmp) / "tier", SMALL_PAGE) as store:
            for op, args in ops:
                if op == "put":
                    await store.put_many(args)
                    model.update(args)
                    peak = max(peak, len(model))
                elif op == "get":
                    assert await store.get_many(args) == [model.get(x) for x in args]
                else:
                    await store.delete_many(args)
                    for x in args:
                        model.pop(x, None)
                check_index(store)
                assert store._entries == len(model)
                # Slots are reused before the file grows.
                assert os.path.getsize(store.path) <= peak * SMALL_PAGE
            assert await store.get_many(list(model)) == list(model.values())
