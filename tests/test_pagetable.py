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
from tmemfs._pagetable import BUCKET_BYTES, LEAF_BYTES, PAGE_BYTES, Entry, IndexMemory, PageTable

MAX_INDEX = 2**63 - 1
LEAF = 32


class Marker:
    """A handle that is not an int, as the engine's Lowered and Lost are."""


MARKER = Marker()

indexes = st.one_of(
    st.integers(0, 3 * LEAF),                      # dense, across leaf edges
    st.integers(0, 10**6),                         # sparse
    st.sampled_from([MAX_INDEX, MAX_INDEX - 31, 2**40]),
)
handles = st.one_of(st.integers(0, 2**40), st.binary(min_size=0, max_size=8),
                    st.just(MARKER), st.just(2**63 - 2))


class TableModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.meter = IndexMemory()
        self.table = PageTable(self.meter)
        self.other = PageTable(self.meter)   # a second table sharing the meter
        self.model: dict[int, tuple[object, int]] = {}
        self.stamp = 0

    def next_stamp(self) -> int:
        self.stamp += 1
        return self.stamp

    @rule(index=indexes, handle=handles)
    def put(self, index: int, handle: object) -> None:
        stamp = self.next_stamp()
        self.table.put(index, handle, stamp)
        self.model[index] = (handle, stamp)

    @rule(index=indexes, handle=handles)
    def set_item(self, index: int, handle: object) -> None:
        stamp = self.next_stamp()
        self.table[index] = Entry(handle, stamp)
        self.model[index] = (handle, stamp)

    @rule(index=indexes)
    def pop(self, index: int) -> None:
        got = self.table.pop(index, None)
        want = self.model.pop(index, None)
        assert got == (None if want is None else Entry(*want))

    @rule(index=indexes)
    def delete(self, index: int) -> None:
        if index in self.model:
            del self.table[index]
            del self.model[index]
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
            self.table.set_handle(index, handle)
            self.model[index] = (handle, self.model[index][1])

    @rule(first=st.integers(0, 4 * LEAF), count=st.integers(0, 80),
          base=st.integers(0, 2**32))
    def put_run(self, first: int, count: int, base: int) -> None:
        stamp = self.next_stamp()
        run = [base + n for n in range(count)]
        self.table.put_run(first, run, stamp)
        for n, handle in enumerate(run):
            self.model[first + n] = (handle, stamp)

    @rule(first=st.integers(0, 4 * LEAF), count=st.integers(0, 80))
    def pop_run(self, first: int, count: int) -> None:
        got = self.table.pop_run(first, count)
        want = [self.model.pop(i)[0] for i in range(first, first + count) if i in self.model]
        assert got == want

    @rule(first=st.integers(0, 4 * LEAF), count=st.integers(0, 80))
    def run_handles(self, first: int, count: int) -> None:
        want = [self.model[i][0] if i in self.model else -1
                for i in range(first, first + count)]
        assert self.table.run_handles(first, count) == want

    @rule(index=indexes)
    def other_table(self, index: int) -> None:
        self.other.put(index, 1, self.next_stamp())

    @rule()
    def clear(self) -> None:
        self.table.clear()
        self.model.clear()

    @invariant()
    def agrees(self) -> None:
        assert len(self.table) == len(self.model)
        assert self.table.keys() == sorted(self.model)
        assert self.table.items() == [(i, Entry(*self.model[i])) for i in sorted(self.model)]
        assert self.table.handles() == [self.model[i][0] for i in sorted(self.model)]
        handles = [h for h, _ in self.model.values()]
        if all(type(h) is int for h in handles):
            packed = self.table.handle_bytes()
            assert sorted(struct.unpack(f"<{len(handles)}q", packed)) == sorted(handles)
        else:
            with pytest.raises(TypeError):
                self.table.handle_bytes()
        for index in list(self.model)[:8]:
            assert index in self.table
            assert self.table[index] == Entry(*self.model[index])

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


def test_a_full_leaf_costs_about_sixteen_bytes_a_page() -> None:
    meter = IndexMemory()
    table = PageTable(meter)
    table.put_run(0, list(range(LEAF * 1000)), 1)
    assert 16 <= table.nbytes / len(table) <= PAGE_BYTES + 1
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
    """An entry compares equal to the table's only while the same store is there."""
    table = PageTable()
    table.put(3, 7, 100)
    taken = table[3]
    assert table.get(3) == taken
    table.put(3, 7, 101)                  # the same handle, stored anew
    assert table.get(3) != taken
    assert table.get(4) is None and table.pop(4, "absent") == "absent"
