"""The compiled page index (tmemfs/_pagetable.pyx) against a dict, its model.

Hypothesis drives a PageTable and a plain dict with the same puts, pops, deletes,
handle changes, runs and clears, over dense and sparse indexes (leaf edges, the
largest index) and every kind of handle the engine keeps (record ids, bytes, markers).
They must agree entry for entry, in index order; and the bytes the table reports must
be what its leaves and buckets really hold, summed exactly in the engine's meter.
"""

from __future__ import annotations

import gc
import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tmemfs._pagetable import (
    BUCKET_BYTES,
    LEAF_BYTES,
    MAX_INLINE_HANDLE,
    PAGE_BYTES,
    Entry,
    IndexMemory,
    PageTable,
)

MAX_INDEX = 2**63 - 1
LEAF = 32
NS = 10**9
SENTINEL = 2**32 - 1  # handles from here up go to the side dict
NOW = 1_700_000_000 * NS  # a stamp of the engine's kind, in nanoseconds


class Marker:
    """A handle that is not an int, as the engine's Lowered and Lost are."""


MARKER = Marker()

indexes = st.one_of(
    st.integers(0, 3 * LEAF),  # dense, across leaf edges
    st.integers(0, 10**6),  # sparse
    st.sampled_from([MAX_INDEX, MAX_INDEX - 31, 2**40]),
)
handles = st.one_of(
    st.integers(0, 2**40),
    st.binary(min_size=0, max_size=8),
    st.just(MARKER),
    st.sampled_from([SENTINEL - 1, SENTINEL, 2**63 - 2, -5]),
)
# How far the engine's clock moves between two stores: often within one second.
steps = st.one_of(st.integers(1, 1000), st.integers(1, 3 * NS))


def seconds(stamp: int) -> int:
    """A stamp's mtime as the table keeps it: whole seconds, 0 up to 2**32 - 1."""
    return min(max(stamp // NS, 0), SENTINEL) if stamp > 0 else 0


def inline(handle: object) -> bool:
    return type(handle) is int and 0 <= handle < SENTINEL


class TableModel(RuleBasedStateMachine):
    """The table as a dict of index -> (handle, mtime in seconds), and the `changed`
    value of each leaf in use: every store into a leaf gives it the next value of the
    meter (the store's stamp, or one more than the last value if that is larger)."""

    def __init__(self) -> None:
        super().__init__()
        self.meter = IndexMemory()
        self.table = PageTable(self.meter)
        self.other = PageTable(self.meter)  # a second table sharing the meter
        self.model: dict[int, tuple[object, int]] = {}
        self.changed: dict[int, int] = {}  # leaf number -> its `changed`
        self.clock = NOW
        self.last = 0  # the meter's last `changed` value

    def next_stamp(self, step: int, late: bool = False) -> int:
        """The engine's next stamp; `late`: one taken before an await, older than the
        last store's."""
        self.clock += step
        return self.clock - 5 * NS if late else self.clock

    def change(self, stamp: int) -> int:
        self.last = stamp if stamp > self.last else self.last + 1
        return self.last

    def expected(self, index: int) -> Entry:
        handle, mtime = self.model[index]
        return Entry(handle, mtime * NS, self.changed[index // LEAF])

    def forget(self, index: int) -> Entry:
        entry = self.expected(index)
        del self.model[index]
        if not any(i // LEAF == index // LEAF for i in self.model):
            del self.changed[index // LEAF]
        return entry

    @rule(index=indexes, handle=handles, step=steps, late=st.booleans())
    def put(self, index: int, handle: object, step: int, late: bool) -> None:
        stamp = self.next_stamp(step, late)
        self.table.put(index, handle, stamp)
        self.model[index] = (handle, seconds(stamp))
        self.changed[index // LEAF] = self.change(stamp)

    @rule(
        index=indexes,
        handle=handles,
        mtime=st.integers(-NS, 2**63 - 1),
        changed=st.integers(-1, 2**62),
    )
    def set_item(self, index: int, handle: object, mtime: int, changed: int) -> None:
        self.table[index] = Entry(handle, mtime, changed)
        self.model[index] = (handle, seconds(mtime))
        self.changed[index // LEAF] = self.change(changed)

    @rule(index=indexes)
    def pop(self, index: int) -> None:
        got = self.table.pop(index, None)
        want = self.forget(index) if index in self.model else None
        assert got == want

    @rule(index=indexes)
    def delete(self, index: int) -> None:
        if index in self.model:
            del self.table[index]
            self.forget(index)
        else:
            try:
                del self.table[index]
            except KeyError:
                pass
            else:
                raise AssertionError(f"deleted {index}, which was not there")

    @rule(index=indexes, handle=handles)
    def set_handle(self, index: int, handle: object) -> None:
        if index in self.model:
            before = self.table[index]
            self.table.set_handle(index, handle)
            self.model[index] = (handle, self.model[index][1])  # not a store
            assert (self.table[index] == before) == (handle == before.handle)

    @rule(
        first=st.integers(0, 4 * LEAF),
        count=st.integers(0, 80),
        base=st.integers(0, 2**32 + 40),
        step=steps,
        late=st.booleans(),
    )
    def put_run(self, first: int, count: int, base: int, step: int, late: bool) -> None:
        stamp = self.next_stamp(step, late)
        run = [base + n for n in range(count)]
        self.table.put_run(first, run, stamp)
        if count:
            changed = self.change(stamp)
            for n, handle in enumerate(run):
                self.model[first + n] = (handle, seconds(stamp))
                self.changed[(first + n) // LEAF] = changed

    @rule(first=st.integers(0, 4 * LEAF), count=st.integers(0, 80))
    def pop_run(self, first: int, count: int) -> None:
        got = self.table.pop_run(first, count)
        want = [self.forget(i).handle for i in range(first, first + count) if i in self.model]
        assert got == want

    @rule(first=st.integers(0, 4 * LEAF), count=st.integers(0, 80))
    def run_handles(self, first: int, count: int) -> None:
        want = [self.model[i][0] if i in self.model else -1 for i in range(first, first + count)]
        assert self.table.run_handles(first, count) == want

    @rule(index=indexes, step=steps)
    def other_table(self, index: int, step: int) -> None:
        stamp = self.next_stamp(step)
        self.other.put(index, 1, stamp)
        self.change(stamp)

    @rule()
    def clear(self) -> None:
        self.table.clear()
        self.model.clear()
        self.changed.clear()

    @invariant()
    def agrees(self) -> None:
        assert len(self.table) == len(self.model)
        assert self.table.keys() == sorted(self.model)
        assert self.table.items() == [(i, self.expected(i)) for i in sorted(self.model)]
        assert self.table.handles() == [self.model[i][0] for i in sorted(self.model)]
        handles = [h for h, _ in self.model.values()]
        if all(inline(h) for h in handles):
            packed = self.table.handle_bytes()
            assert sorted(struct.unpack(f"<{len(handles)}q", packed)) == sorted(handles)
        else:
            with pytest.raises(TypeError):
                self.table.handle_bytes()
        for index in list(self.model)[:8]:
            assert index in self.table
            assert self.table[index] == self.expected(index)
        assert self.meter.changed == self.last
        assert set(self.changed) == {i // LEAF for i in self.model}

    @invariant()
    def counts_its_bytes(self) -> None:
        leaves = len({i // LEAF for i in self.model})
        if not leaves:
            assert self.table.nbytes == 0
        else:
            # One leaf per run of 32 indexes in use, and buckets (a power of two) kept at
            # most three quarters full.
            rest = self.table.nbytes - leaves * LEAF_BYTES
            buckets, odd = divmod(rest, BUCKET_BYTES)
            assert odd == 0 and buckets & (buckets - 1) == 0
            assert leaves * 4 <= buckets * 3 or buckets == 2
        assert self.meter.nbytes == self.table.nbytes + self.other.nbytes
        assert self.meter.pages == len(self.table) + len(self.other)


TestTableModel = TableModel.TestCase
TestTableModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


def test_a_full_leaf_costs_about_nine_bytes_a_page() -> None:
    meter = IndexMemory()
    table = PageTable(meter)
    table.put_run(0, list(range(LEAF * 1000)), NOW)
    assert LEAF_BYTES == 288 and PAGE_BYTES == 10
    assert 9 <= table.nbytes / len(table) <= PAGE_BYTES + 1
    assert meter.pages == LEAF * 1000


def test_memory_goes_back_when_pages_go() -> None:
    meter = IndexMemory()
    table = PageTable(meter)
    table.put_run(0, list(range(10_000)), 1)
    table.put(10**12, b"raw", 2)
    assert table.pop_run(0, 10_000) == list(range(10_000))
    del table[10**12]
    assert len(table) == 0 and table.nbytes == 0 and meter.nbytes == 0
    table.put(5, 5, 3)
    del table
    gc.collect()
    assert meter.nbytes == 0 and meter.pages == 0


def test_entries_tell_stores_apart() -> None:
    """An entry compares equal to the table's only while the same store is there, even
    with the same handle within the same second."""
    table = PageTable()
    table.put(3, 7, NOW)
    taken = table[3]
    assert table.get(3) == taken
    table.put(3, 7, NOW + 1)  # the same handle, stored anew
    assert table.get(3) != taken
    assert table.get(3).mtime_ns == taken.mtime_ns == NOW
    assert table.get(4) is None and table.pop(4, "absent") == "absent"


def test_the_mtime_is_the_store_in_whole_seconds() -> None:
    table = PageTable()
    table.put(0, 1, NOW + 999_999_999)
    table.put_run(1, [2, 3], NOW + 2 * NS + 1)
    assert [table[i].mtime_ns for i in range(3)] == [NOW, NOW + 2 * NS, NOW + 2 * NS]
    table.put(4, 1, -1)
    table.put(5, 1, 2**63 - 1)  # past 2106: the last second a uint32 holds
    assert table[4].mtime_ns == 0 and table[5].mtime_ns == SENTINEL * NS


def test_a_neighbours_store_makes_an_older_entry_unequal() -> None:
    """Conservative: page 1 was not stored anew, but a page of its leaf was."""
    table = PageTable()
    table.put_run(0, [10, 11, 12], NOW)
    taken = table[1]
    table.put(LEAF, 5, NOW + 1)  # another leaf: no effect
    assert table[1] == taken
    table.put(2, 12, NOW + 2)  # a neighbour in the same leaf
    assert table[1] != taken
    assert (table[1].handle, table[1].mtime_ns) == (taken.handle, taken.mtime_ns)
    again = table[1]
    table.put_run(LEAF - 2, [1, 2, 3], NOW + 3)  # a run reaching into the leaf
    assert table[1] != again


def test_set_handle_keeps_the_neighbours_entries_equal() -> None:
    """A writeback batch marks neighbouring pages Lowered one by one: every Entry of
    the batch taken before must still equal its page's until that page moves."""
    table = PageTable()
    table.put_run(0, list(range(LEAF)), NOW)
    batch = [table[i] for i in range(LEAF)]
    for i, entry in enumerate(batch):
        assert table[i] == entry, i
        table.set_handle(i, b"lowered")
        assert table[i] != entry  # the handle changed
        assert table[i].changed == entry.changed and table[i].mtime_ns == entry.mtime_ns
    assert table[0] == table[0]


def test_handles_at_and_above_the_sentinel_go_aside() -> None:
    table = PageTable()
    big = [SENTINEL - 1, SENTINEL, SENTINEL + 1, 2**63 - 1, 2**64, -1]
    table.put_run(0, big, NOW)
    assert table.handles() == big
    assert table.run_handles(0, len(big)) == big
    assert [table[i].handle for i in range(len(big))] == big
    assert MAX_INLINE_HANDLE == SENTINEL - 1
    with pytest.raises(TypeError):
        table.handle_bytes()  # ints kept aside are not packed
    table.set_handle(0, SENTINEL)  # inline -> aside
    table.set_handle(1, 5)  # aside -> inline
    assert table.pop_run(0, len(big)) == [SENTINEL, 5, *big[2:]]
    assert len(table) == 0
    table.put(0, SENTINEL - 1, NOW)
    assert struct.unpack("<q", table.handle_bytes()) == (SENTINEL - 1,)


def test_a_leaf_dropped_and_made_again_gives_no_old_entry_back() -> None:
    """The same page with the same handle and mtime, in a leaf freed and made anew
    (even by a store whose stamp is older), is another store."""
    meter = IndexMemory()
    table = PageTable(meter)
    table.put(7, 3, NOW + 5)
    taken = table[7]
    nbytes = table.nbytes
    del table[7]
    assert table.nbytes == 0
    table.put(7, 3, NOW + 5)  # the same stamp again
    assert table.nbytes == nbytes and table[7] != taken
    del table[7]
    table.put_run(7, [3], NOW)  # an older stamp (taken before an await)
    assert table[7] != taken and table[7].changed > taken.changed


def test_putting_an_entry_back_is_a_store_into_its_leaf() -> None:
    table = PageTable()
    table.put_run(0, [1, 2], NOW)
    neighbour = table[1]
    taken = table.pop(0)
    table[0] = taken
    assert (table[0].handle, table[0].mtime_ns) == (taken.handle, taken.mtime_ns)
    assert table[0] != taken and table[1] != neighbour


def test_an_entry_made_by_hand_equals_no_stored_one() -> None:
    table = PageTable()
    table.put(0, 0, 0)
    assert Entry(0, 0) == Entry(0, 0, 0) != table[0]
    assert table[0].changed > 0


def test_an_empty_or_negative_run_does_nothing() -> None:
    table = PageTable()
    table.put_run(0, [1, 2], NOW)
    assert table.pop_run(0, 0) == [] and table.pop_run(1, -3) == []
    assert table.run_handles(0, -1) == [] and len(table) == 2
