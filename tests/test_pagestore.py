"""The compiled page store against a pure-Python model of the same format.

The model keeps what a user of the store may rely on: a kept page loads back byte for
byte until its last reference is released; same-filled pages keep only their word;
identical pages share one payload, counted once; and memory follows: slots are the
payloads rounded to their size class, and when nothing is kept, no chunk is held.
Hypothesis drives both with the same batches of stores, loads, releases, range
releases, flushes and compactions over same-filled, duplicate, incompressible and
ordinary pages, and through background recompression: sweeps that begin, run (the
worker's part, forced to happen between other steps) and commit in any interleaving
with stores, loads and releases of the same pages; with and without the store's zstd
dictionary, training new ones (also while another batch is out, whose commit must then
change nothing), and old ones given back once no page uses them.
"""

from __future__ import annotations

import random
import resource
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lz4.block
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from tmemfs._pagestore import (
    CLASS_STEP,
    RECORD_OVERHEAD,
    REFS_LIMIT,
    RecompressBatch,
    SlabStore,
)

PAGE = 4096
LIMIT = PAGE * 7 // 8
GRAIN = CLASS_STEP


def same_filled(word: int) -> bytes:
    return word.to_bytes(8, "little") * (PAGE // 8)


def ordinary(seed: int) -> bytes:
    """Text-like pages that compress to anything from a few hundred bytes to most of a page."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 6)).hex() for _ in range(rng.randint(2, 200))]
    text = b" ".join(w.encode() for w in rng.choices(words, k=2000))
    return text[:PAGE].ljust(PAGE, b".")


def incompressible(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE)


# Same-filled words: a record keeps the low half in its hash field and the high half in
# its slot field, so words that agree in one half must still be told apart.
WORDS = [
    0,
    1,
    0xFFFFFFFFFFFFFFFF,
    0x0101,
    0xFFFFFFFF,
    0xFFFFFFFF00000000,
    1 << 32,
    0x0123456789ABCDEF,
]

pages = st.one_of(
    st.sampled_from(WORDS).map(same_filled),
    st.integers(0, 40).map(ordinary),
    st.integers(0, 5).map(incompressible),
    # Two pages that differ in one byte must never share a payload.
    st.integers(0, 40).map(lambda s: ordinary(s)[:-1] + b"!"),
)


@dataclass
class Model:
    """The format, in Python: each distinct page kept once, with its references."""

    refs: dict[bytes, int] = field(default_factory=dict)

    def keep(self, page: bytes) -> None:
        self.refs[page] = self.refs.get(page, 0) + 1

    def release(self, page: bytes) -> None:
        self.refs[page] -= 1
        if not self.refs[page]:
            del self.refs[page]

    @staticmethod
    def word_page(page: bytes) -> bool:
        return page == page[:8] * (PAGE // 8)

    def same_filled_pages(self) -> int:
        return sum(n for p, n in self.refs.items() if self.word_page(p))

    def dedup_pages(self) -> int:
        return sum(n for p, n in self.refs.items() if n > 1 and not self.word_page(p))

    def payloads(self) -> int:
        return sum(1 for p in self.refs if not self.word_page(p))


def check_payload(store: SlabStore, handle: int, page: bytes) -> None:
    """A kept payload is the codec's: the word, the raw page, or an lz4 block of it; a
    recompressed page gives the very payload it had before."""
    payload = store.payload(handle)
    if store.codec(handle).startswith("zstd"):
        assert payload == store.encode(page).payload(0)
    if Model.word_page(page):
        assert payload == page[:8]
    elif len(payload) == PAGE:
        assert payload == page
    else:
        assert len(payload) <= LIMIT
        assert lz4.block.decompress(payload, uncompressed_size=PAGE) == page


class StoreMachine(RuleBasedStateMachine):
    #: References a record holds; None: the store's own (REFS_LIMIT).
    refs_limit: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.store = SlabStore(PAGE, LIMIT, 2)
        if self.refs_limit is not None:
            self.store._limit_refs(self.refs_limit)
        self.cap = self.refs_limit or REFS_LIMIT
        self.model = Model()
        self.keys: dict[int, tuple[int, bytes]] = {}  # key -> (handle, page)
        # A recompression batch begun, maybe run, not yet committed; and the handles
        # loaded or stored since it began, which its commit must leave alone.
        self.pending: RecompressBatch | None = None
        self.pending_ran = False
        self.touched: set[int] = set()
        # A dictionary was installed while the pending batch was out.
        self.stale = False

    def _keep(self, batch: list[bytes]) -> list[int]:
        handles = self.store.keep_all(self.store.encode(b"".join(batch)))
        self._check_sharing(batch, handles)
        return handles

    def _check_sharing(self, batch: list[bytes], handles: list[int]) -> None:
        """Pages just kept (not yet put): each shares a record of the same page that
        has room for one more reference, and takes a new one only when all are full."""
        held = Counter(h for h, _ in self.keys.values())
        page_of = {h: p for h, p in self.keys.values()}
        for handle, page in zip(handles, batch, strict=True):
            if handle in held:
                assert page_of[handle] == page
                assert held[handle] < self.cap
            else:
                full = [h for h, p in page_of.items() if p == page]
                assert all(held[h] == self.cap for h in full)
                if full:
                    event("a page past its records' full counts")
                page_of[handle] = page
            held[handle] += 1

    def _put(self, key: int, handle: int, page: bytes) -> None:
        old = self.keys.pop(key, None)
        if old is not None:
            self.store.release(old[0])
            self.model.release(old[1])
        self.keys[key] = (handle, page)
        self.model.keep(page)
        self.touched.add(handle)

    @rule(first=st.integers(0, 200), batch=st.lists(pages, min_size=1, max_size=40))
    def store_batch(self, first: int, batch: list[bytes]) -> None:
        encoded = self.store.encode(b"".join(batch))
        assert encoded.count == len(batch)
        for i, page in enumerate(batch):
            assert encoded.is_same_filled(i) == Model.word_page(page)
        handles = self._keep(batch)
        for i, (handle, page) in enumerate(zip(handles, batch, strict=True)):
            self._put(first + i, handle, page)
            check_payload(self.store, handle, page)

    @rule(key=st.integers(0, 240), page=pages)
    def store_one_from_payload(self, key: int, page: bytes) -> None:
        """A page coming back up from a tier arrives as a payload, and dedups alike."""
        payload = self.store.encode(page).payload(0)
        handle = self.store.keep(self.store.encode_payload(payload), 0)
        self._check_sharing([page], [handle])
        self._put(key, handle, page)

    @rule(first=st.integers(0, 240), count=st.integers(1, 40))
    def load_run(self, first: int, count: int) -> None:
        handles = [self.keys[k][0] if k in self.keys else -1 for k in range(first, first + count)]
        out = bytearray(count * PAGE)
        self.store.load_into(handles, out)
        for n, k in enumerate(range(first, first + count)):
            want = self.keys[k][1] if k in self.keys else bytes(PAGE)
            assert out[n * PAGE : (n + 1) * PAGE] == want
        self.touched.update(h for h in handles if h != -1)

    # Recompression, in the three steps the engine takes: begin on the store's thread,
    # run in a worker (here: whenever hypothesis says), commit on the store's thread.
    @precondition(lambda self: self.pending is None)
    @rule(
        max_pages=st.integers(1, 64),
        level=st.sampled_from([1, 3, 9]),
        settle=st.booleans(),
        dictionary=st.booleans(),
        train=st.sampled_from([0, 0, 1024, 8192]),
    )
    def recompress_begin(
        self, max_pages: int, level: int, settle: bool, dictionary: bool, train: int
    ) -> None:
        if settle:
            # A sweep whose batches are dropped: it only marks every page idle.
            while not self.store.recompress_begin(64, 1).sweep_done:
                pass
        # Any dictionary that trains is taken (min_saving -1): the point is to use them.
        self.pending = self.store.recompress_begin(
            max_pages, level, scan_limit=97, dictionary=dictionary, train=train, min_saving=-1.0
        )
        self.pending_ran = False
        self.touched = set()

    @precondition(lambda self: self.pending is not None)
    @rule()
    def train_while_a_batch_is_out(self) -> None:
        """Another batch trains and installs a new dictionary: the one out, if it used
        the old dictionary, must change nothing when it commits."""
        # Enough distinct pages for ZDICT to train from (16), at keys of their own.
        fresh = [ordinary(1000 + i) for i in range(20)]
        for key, handle in enumerate(self._keep(fresh), start=220):
            self._put(key, handle, fresh[key - 220])
        for _ in range(2):  # the rest of the sweep under way, then a whole one: all idle
            while not self.store.recompress_begin(64, 1).sweep_done:
                pass
        batch = self.store.recompress_begin(64, 3, train=2048, min_saving=-1.0)
        batch.run()
        self.store.recompress_commit(batch)
        if batch.trained:
            self.stale = True

    def _pending_keys(self) -> list[int]:
        assert self.pending is not None
        taken = set(self.pending.handles())
        return sorted(k for k, (h, _) in self.keys.items() if h in taken)

    @precondition(lambda self: self.pending is not None and self._pending_keys())
    @rule(data=st.data(), how=st.sampled_from(["load", "store again", "release"]))
    def use_a_pending_page(self, data: st.DataObject, how: str) -> None:
        """While a batch is out, one of its pages is loaded, stored again or released."""
        key = data.draw(st.sampled_from(self._pending_keys()))
        handle, page = self.keys[key]
        if how == "load":
            assert self.store.load(handle) == page
            self.touched.add(handle)
        elif how == "store again":
            self._put(key, self._keep([page])[0], page)
        else:
            self.store.release(handle)
            self.model.release(self.keys.pop(key)[1])

    @precondition(lambda self: self.pending is not None and not self.pending_ran)
    @rule()
    def recompress_run(self) -> None:
        assert self.pending is not None
        assert 0 <= self.pending.run() <= self.pending.count
        self.pending_ran = True

    @precondition(lambda self: self.pending is not None and self.pending_ran)
    @rule()
    def recompress_commit(self) -> None:
        assert self.pending is not None
        before = {h: self.store.codec(h) for h, _ in self.keys.values()}
        recompressed = self.store.recompress_commit(self.pending)
        after = {h: self.store.codec(h) for h, _ in self.keys.values()}
        changed = {h for h in before if before[h] != after[h]}
        assert all(before[h] in ("lz4", "raw") and after[h].startswith("zstd") for h in changed)
        # A page used since the batch began stays as it is.
        assert not changed & self.touched
        assert recompressed == sum(self.store.refs(h) for h in changed)
        batch = self.pending
        if batch.dictionary is not None and batch.dict_slot >= 0 and self.stale:
            # Its dictionary is no longer the current one.
            assert not changed
        for h in changed:
            slot = self.store.dictionary_of(h)
            assert after[h] == ("zstd+dict" if slot >= 0 else "zstd")
            if slot >= 0:
                assert slot == self.store.current_dict
                assert batch.dictionary is not None
        self.pending = None
        self.stale = False

    @rule(dictionary=st.booleans(), train=st.booleans())
    def recompress_sweeps(self, dictionary: bool, train: bool) -> None:
        """Whole sweeps, as the background task runs them: idle pages end up in zstd."""
        self.pending = None
        self.stale = False
        # The first finishes the sweep that a begun batch left half done.
        for n in range(3):
            while True:
                batch = self.store.recompress_begin(
                    64,
                    3,
                    dictionary=dictionary,
                    train=4096 if train and n == 1 else 0,
                    min_saving=-1.0,
                )
                train = train and n != 1
                batch.run()
                self.store.recompress_commit(batch)
                if batch.sweep_done:
                    break
        # What is left in lz4 or raw was tried, and zstd would not take a smaller slot.
        while True:
            batch = self.store.recompress_begin(64, 3)
            assert batch.count == 0
            if batch.sweep_done:
                break

    @precondition(lambda self: self.keys)
    @rule(data=st.data())
    def release_one(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.keys)))
        handle, page = self.keys.pop(key)
        assert self.store.load(handle) == page
        self.store.release(handle)
        self.model.release(page)

    @rule(start=st.integers(0, 240), count=st.integers(1, 120))
    def release_range(self, start: int, count: int) -> None:
        gone = [k for k in self.keys if start <= k < start + count]
        self.store.release_many([self.keys[k][0] for k in gone])
        for k in gone:
            self.model.release(self.keys.pop(k)[1])

    @rule()
    def flush(self) -> None:
        self.store.release_many([h for h, _ in self.keys.values()])
        for _, page in self.keys.values():
            self.model.release(page)
        self.keys.clear()
        self.store.compact()
        assert self.store.chunk_bytes == 0
        # Empty classes give back their chunk tables and arenas too.
        assert self.store.arena_count == 0

    @rule()
    def compact(self) -> None:
        self.store.compact()
        handles = [h for h, _ in self.keys.values()]
        assert_fewest_chunks(self.store, handles)
        for handle, page in self.keys.values():
            assert self.store.load(handle) == page

    @invariant()
    def counters_agree(self) -> None:
        store, model = self.store, self.model
        assert store.same_filled_pages == model.same_filled_pages()
        assert store.payload_pages == sum(
            n for p, n in model.refs.items() if not Model.word_page(p)
        )
        if self.cap >= REFS_LIMIT:
            assert store.dedup_pages == model.dedup_pages()
        # Each handle counts the keys that hold it, up to the cap; past the cap a page
        # has more than one record (the cap is only reached with a lowered one).
        held = Counter(h for h, _ in self.keys.values())
        for handle, n in held.items():
            assert store.refs(handle) == n <= self.cap
        handles = {h for h, p in self.keys.values() if not Model.word_page(p)}
        assert store.dedup_pages == sum(held[h] for h in handles if held[h] > 1)
        if self.cap >= REFS_LIMIT:  # one record per page
            assert len(handles) == model.payloads()
            for handle in handles:
                assert store.refs(handle) == model.refs[self.page_of(handle)]
        lengths = [store.length(h) for h in handles]
        assert store.payload_bytes == sum(lengths)
        assert store.slot_bytes == sum(-(-n // GRAIN) * GRAIN for n in lengths)
        assert store.memory_used() == (
            store.slot_bytes + len(handles) * RECORD_OVERHEAD + store.dictionary_bytes
        )
        assert store.chunk_bytes >= store.slot_bytes
        if not handles:
            assert store.chunk_bytes == 0
        zstd = [h for h in handles if store.codec(h).startswith("zstd")]
        assert store.recompressed_pages == sum(store.refs(h) for h in zstd)
        # Dictionaries: each kept one is used by the records that say so, or current;
        # they are counted in memory_used.
        slots = {slot: (records, size) for slot, records, size in store.dictionary_slots()}
        by_slot = [store.dictionary_of(h) for h in zstd]
        for slot, (records, _) in slots.items():
            assert records == by_slot.count(slot)
            assert records or slot == store.current_dict
        assert set(by_slot) - {-1} <= set(slots)
        assert store.current_dict == -1 or store.current_dict in slots
        assert (store.dictionary_bytes > sum(size for _, size in slots.values())) == bool(slots)
        dict_handles = [h for h in zstd if store.dictionary_of(h) >= 0]
        assert store.dict_pages == sum(store.refs(h) for h in dict_handles)
        assert store.dict_payload_bytes == sum(store.length(h) for h in dict_handles)
        assert store.zstd_payload_bytes == sum(store.length(h) for h in zstd)
        assert store.recompress_saved_bytes == sum(
            store.encode(self.page_of(h)).length(0) - store.length(h) for h in zstd
        )

    def page_of(self, handle: int) -> bytes:
        return next(p for h, p in self.keys.values() if h == handle)

    def teardown(self) -> None:
        for key in sorted(self.keys):
            handle, page = self.keys[key]
            assert self.store.load(handle) == page
            check_payload(self.store, handle, page)


StoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_matches_model = StoreMachine.TestCase


class SaturatingStoreMachine(StoreMachine):
    """The same with records that hold three references: what happens past a full
    count (a new record, found by the next identical page) is reached all the time."""

    refs_limit = 3


SaturatingStoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_matches_model_past_full_counts = SaturatingStoreMachine.TestCase


def sweep(store: SlabStore, level: int = 3) -> int:
    """One whole recompression sweep; the pages recompressed."""
    pages = 0
    while True:
        batch = store.recompress_begin(256, level)
        batch.run()
        pages += store.recompress_commit(batch)
        if batch.sweep_done:
            return pages


def test_pages_are_recompressed_once_idle_for_a_whole_sweep() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    batch = [ordinary(seed) for seed in range(100)]
    handles = store.keep_all(store.encode(b"".join(batch)))
    lz4_bytes = store.payload_bytes
    assert sweep(store) == 0  # the first visit only marks them idle
    store.load_into(handles[:10], bytearray(10 * PAGE))  # ten are used again
    assert sweep(store) == 90
    assert {store.codec(h) for h in handles[:10]} == {"lz4"}
    assert {store.codec(h) for h in handles[10:]} == {"zstd"}
    assert sweep(store) == 10
    assert store.recompressed_pages == 100
    assert store.payload_bytes == lz4_bytes - store.recompress_saved_bytes
    assert store.payload_bytes < lz4_bytes * 0.95
    out = bytearray(100 * PAGE)
    store.load_into(handles, out)
    assert bytes(out) == b"".join(batch)
    # Stored again, a recompressed page is found by dedup and shared, still in zstd.
    again = store.keep_all(store.encode(b"".join(batch)))
    assert again == handles
    assert store.recompressed_pages == 200
    store.release_many(handles + again)
    assert store.recompressed_pages == store.recompress_saved_bytes == store.payload_bytes == 0


@pytest.mark.parametrize("use", ["load", "store again", "release and reuse", "compact"])
def test_a_page_used_while_its_batch_is_out_is_left_alone(use: str) -> None:
    """The worker's part runs between the store's steps; what happened meanwhile wins."""
    store = SlabStore(PAGE, LIMIT, 2)
    batch = [ordinary(seed) for seed in range(8)]
    handles = store.keep_all(store.encode(b"".join(batch)))
    sweep(store)
    out = store.recompress_begin(256, 3)
    assert out.handles() == handles
    if use == "load":
        assert store.load(handles[0]) == batch[0]
    elif use == "store again":
        assert store.keep_all(store.encode(batch[0])) == [handles[0]]
        store.release(handles[0])
    elif use == "release and reuse":
        store.release(handles[0])
        assert store.keep_all(store.encode(ordinary(99))) == [handles[0]]
        batch[0] = ordinary(99)
    else:
        store.release_many(handles[1:4])
        store.compact()
    assert out.run() == 8
    store.recompress_commit(out)
    live = [i for i in range(8) if use != "compact" or not 1 <= i < 4]
    # A compaction moved payloads, but not what they hold: those are recompressed.
    assert [store.codec(handles[i]) for i in live] == (
        ["zstd"] * len(live) if use == "compact" else ["lz4"] + ["zstd"] * 7
    )
    for i in live:
        assert store.load(handles[i]) == batch[i]


def settle(store: SlabStore) -> None:
    """Finish the sweep under way and make a whole one: every untouched page is idle."""
    for _ in range(2):
        while not store.recompress_begin(64, 1).sweep_done:
            pass


def train(store: SlabStore, pages: list[bytes], min_saving: float = -1.0) -> list[int]:
    """Keep pages, and recompress them with a dictionary trained from them."""
    handles = store.keep_all(store.encode(b"".join(pages)))
    settle(store)
    batch = store.recompress_begin(len(pages), 3, train=4096, min_saving=min_saving)
    batch.run()
    assert batch.trained
    store.recompress_commit(batch)
    return handles


def test_dictionary_pages_load_dedup_and_give_their_lz4_payload() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    pages = [ordinary(seed) for seed in range(64)]
    handles = train(store, pages)
    codecs = [store.codec(h) for h in handles]
    # Every 4th page was held out and judged both ways: it keeps the smaller.
    assert codecs.count("zstd+dict") >= 40 and set(codecs) <= {"zstd", "zstd+dict"}
    assert store.dict_pages == codecs.count("zstd+dict")
    ((slot, records, size),) = store.dictionary_slots()
    assert slot == store.current_dict and records == store.dict_pages and size <= 4096
    assert store.memory_used() == (store.slot_bytes + 64 * RECORD_OVERHEAD + store.dictionary_bytes)
    out = bytearray(64 * PAGE)
    store.load_into(handles, out)
    assert bytes(out) == b"".join(pages)
    for h, page in zip(handles, pages, strict=True):
        assert store.payload(h) == store.encode(page).payload(0)
    # Stored again (as a page, or as a tier's payload), each is found by dedup.
    assert store.keep_all(store.encode(b"".join(pages))) == handles
    assert [store.keep(store.encode_payload(store.encode(p).payload(0)), 0) for p in pages] == (
        handles
    )
    assert store.dict_pages == 3 * codecs.count("zstd+dict")
    for _ in range(3):
        store.release_many(handles)
    assert store.payload_bytes == store.dict_pages == 0
    # The current dictionary stays, counted, for the next batches.
    assert store.dictionary_slots() == [(slot, 0, size)]
    assert store.memory_used() == store.dictionary_bytes > size


def test_an_old_dictionary_lives_while_pages_use_it() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    first = train(store, [ordinary(seed) for seed in range(40)])
    one = store.current_dict
    one_bytes = store.dictionary_bytes
    second = train(store, [ordinary(seed) for seed in range(100, 140)])
    two = store.current_dict
    assert two != one
    assert [s for s, _, _ in store.dictionary_slots()] == sorted([one, two])
    assert {store.dictionary_of(h) for h in first} <= {one, -1}
    assert {store.dictionary_of(h) for h in second} <= {two, -1}
    two_bytes = store.dictionary_bytes - one_bytes
    assert two_bytes > 0
    # The first one's pages still load after the second one came.
    for h, seed in zip(first, range(40), strict=True):
        assert store.load(h) == ordinary(seed)
    store.release_many(first)
    assert [s for s, _, _ in store.dictionary_slots()] == [two]
    assert store.dictionary_bytes == two_bytes
    for h, seed in zip(second, range(100, 140), strict=True):
        assert store.load(h) == ordinary(seed)
    # A third takes the freed slot; the second is given back with its last page.
    third = train(store, [ordinary(seed) for seed in range(200, 240)])
    store.release_many(second)
    assert [s for s, _, _ in store.dictionary_slots()] == [store.current_dict]
    store.release_many(third)
    assert store.memory_used() == store.dictionary_bytes


def test_a_batch_whose_dictionary_was_replaced_changes_nothing() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    train(store, [ordinary(seed) for seed in range(40)])
    pages = [ordinary(seed) for seed in range(100, 140)]
    handles = store.keep_all(store.encode(b"".join(pages)))
    settle(store)
    out = store.recompress_begin(64, 3, dictionary=True)
    assert out.dictionary is not None and out.dict_slot == store.current_dict
    out.run()
    train(store, [ordinary(seed) for seed in range(200, 240)])
    before = [store.codec(h) for h in handles]
    assert store.recompress_commit(out) == 0
    assert [store.codec(h) for h in handles] == before
    # Taken again by the next sweep, with the new dictionary.
    settle(store)
    batch = store.recompress_begin(64, 3, dictionary=True)
    batch.run()
    assert store.recompress_commit(batch) > 0
    assert {store.dictionary_of(h) for h in handles} <= {store.current_dict, -1}
    for h, page in zip(handles, pages, strict=True):
        assert store.load(h) == page


def test_a_dictionary_that_does_not_pay_is_dropped() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    pages = [incompressible(seed) for seed in range(8)] + [ordinary(s) for s in range(24)]
    store.keep_all(store.encode(b"".join(pages)))
    settle(store)
    batch = store.recompress_begin(64, 3, train=4096, min_saving=0.5)
    batch.run()
    assert not batch.trained and batch.dictionary is None
    assert batch.probe_plain > 0
    store.recompress_commit(batch)
    assert store.current_dict == -1 and store.dictionary_bytes == 0
    assert store.recompressed_pages > 0 and store.dict_pages == 0


def test_a_batch_that_did_not_run_cannot_be_committed() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    store.keep_all(store.encode(ordinary(1)))
    sweep(store)
    batch = store.recompress_begin(256, 3)
    with pytest.raises(ValueError):
        store.recompress_commit(batch)
    assert sweep(store) == 1


def test_a_committed_batch_can_be_neither_run_nor_committed_again() -> None:
    """A commit hands the batch's buffers to the next batch of the sweep."""
    store = SlabStore(PAGE, LIMIT, 2)
    pages = [ordinary(seed) for seed in range(600)]
    handles = store.keep_all(store.encode(b"".join(pages)))
    sweep(store)
    first = store.recompress_begin(256, 3)
    first.run()
    assert store.recompress_commit(first) == 256
    with pytest.raises(ValueError, match="committed"):
        first.run()
    with pytest.raises(ValueError, match="committed"):
        store.recompress_commit(first)
    # The next batches run in the buffers the first one gave back, and hold their own
    # pages, not its.
    assert sweep(store) == 344
    out = bytearray(600 * PAGE)
    store.load_into(handles, out)
    assert bytes(out) == b"".join(pages)


def test_incompressible_pages_are_tried_once() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    handles = store.keep_all(store.encode(b"".join(incompressible(s) for s in range(20))))
    sweep(store)
    sweep(store)
    assert {store.codec(h) for h in handles} == {"raw"}
    batch = store.recompress_begin(256, 3)
    assert batch.count == 0  # not copied out again: zstd did not pay for them


def test_compaction_frees_sparse_chunks_and_keeps_every_page() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    batch = [ordinary(seed) for seed in range(2000)]
    handles = store.keep_all(store.encode(b"".join(batch)))
    full = store.chunk_bytes
    keep = set(range(0, 2000, 10))
    store.release_many([h for i, h in enumerate(handles) if i not in keep])
    assert store.chunk_bytes > full // 4  # survivors are spread over most chunks
    freed = store.compact()
    assert freed > 0
    assert store.chunk_bytes <= store.slot_bytes * 1.3 + 128 * 8 * 4096
    for i in keep:
        assert store.load(handles[i]) == batch[i]


def test_compaction_waits_until_it_would_give_back_enough() -> None:
    """compact(min_gain): the pass over the records is made only when the chunks it
    would empty hold at least min_gain bytes (the periodic compaction asks 1/64 of the
    chunk memory); until then nothing moves and every page stays."""
    batch = [ordinary(seed) for seed in range(2000)]
    keep = set(range(0, 2000, 10))

    def sparse() -> tuple[SlabStore, list[int]]:
        store = SlabStore(PAGE, LIMIT, 2)
        handles = store.keep_all(store.encode(b"".join(batch)))
        store.release_many([h for i, h in enumerate(handles) if i not in keep])
        return store, handles

    reference, _ = sparse()
    gain = reference.compact()
    assert gain > 0
    store, handles = sparse()
    spread = store.chunk_bytes
    assert store.compact(min_gain=gain + 1) == 0
    assert store.chunk_bytes == spread
    assert all(store.load(handles[i]) == batch[i] for i in keep)
    assert store.compact(min_gain=gain) == gain
    assert all(store.load(handles[i]) == batch[i] for i in keep)


def fewest_chunks(store: SlabStore, handles: list[int]) -> tuple[dict[int, int], int]:
    """As few chunks per size class (by slot size) as hold the distinct payloads, and
    their memory if every one were faulted in whole."""
    slots: Counter[int] = Counter()
    for h in set(handles):
        if not store.is_same_filled(h):
            slots[store.length(h)] += 1
    per_class: Counter[tuple[int, int, int]] = Counter()
    for length, n in slots.items():
        size, chunk_bytes, per_chunk, _ = store.class_geometry(length)
        per_class[size, chunk_bytes, per_chunk] += n
    chunks = {size: -(-n // per) for (size, _, per), n in per_class.items()}
    whole = sum(-(-n // per) * chunk for (_, chunk, per), n in per_class.items())
    return chunks, whole


def assert_fewest_chunks(store: SlabStore, handles: list[int]) -> None:
    """Compaction left as few chunks per class as hold the payloads. A chunk is faulted
    in as its slots are first used, so they hold at most their whole size."""
    chunks, whole = fewest_chunks(store, handles)
    assert store.chunks_held() == chunks
    assert store.chunk_bytes <= whole


def test_compaction_across_classes_moves_every_record_it_must() -> None:
    """No slot knows its record: compaction finds the records of the chunks it empties
    in one pass over the records. Over many classes at once, with shared, same-filled
    and zstd records and free records among them, every page comes back byte for byte,
    each class ends in as few chunks as hold its payloads, and the freed slots and
    records are used again by later stores (the free lists survive the moves)."""
    store = SlabStore(PAGE, LIMIT, 2)
    rng = random.Random(11)

    def mixed(seed: int) -> bytes:
        r = random.Random(seed)
        kind = r.random()
        if kind < 0.05:
            return same_filled(r.choice(WORDS))
        if kind < 0.1:
            return incompressible(seed)
        # Compressible to anything from a few dozen bytes to most of a page: many classes.
        cut = r.randint(16, PAGE)
        return r.randbytes(cut // 4) + bytes(PAGE - cut // 4) if cut % 2 else ordinary(seed)

    pages = [mixed(s) for s in range(3000)] + [ordinary(s) for s in range(200)]  # shared
    handles = store.keep_all(store.encode(b"".join(pages)))
    sweep(store)
    sweep(store)  # idle a whole sweep: some records are now zstd, in other classes
    assert any(store.codec(h).startswith("zstd") for h in handles)
    for round_ in range(3):
        order = list(range(len(pages)))
        rng.shuffle(order)
        gone = set(order[: len(order) * 4 // 5])
        store.release_many([handles[i] for i in gone])
        kept = [i for i in range(len(pages)) if i not in gone]
        pages = [pages[i] for i in kept]
        handles = [handles[i] for i in kept]
        before = store.chunk_bytes
        freed = store.compact()
        assert freed == before - store.chunk_bytes > 0
        assert_fewest_chunks(store, handles)
        out = bytearray(len(pages) * PAGE)
        store.load_into(handles, out)
        assert bytes(out) == b"".join(pages)
        # New pages fill the freed records and slots; the old ones stay intact.
        more = [mixed(10_000 * (round_ + 1) + s) for s in range(2000)]
        handles += store.keep_all(store.encode(b"".join(more)))
        pages += more
        out = bytearray(len(pages) * PAGE)
        store.load_into(handles, out)
        assert bytes(out) == b"".join(pages)
    store.release_many(handles)
    store.compact()
    assert store.chunk_bytes == store.slot_bytes == store.arena_count == 0


def test_chunks_pack_tightly_and_are_faulted_in_as_they_fill() -> None:
    """Chunks of up to 32 pages leave on average under 0.5% of their bytes past the
    last slot (2% with chunks of at most 8 pages), and a chunk holds memory only for
    the 16 KiB steps its slots have reached, so a class holding one payload costs one
    step, not a whole chunk."""
    store = SlabStore(PAGE, LIMIT, 2)
    waste = []
    for length in range(GRAIN, PAGE + 1, GRAIN):
        size, chunk_bytes, per_chunk, _ = store.class_geometry(length)
        waste.append((chunk_bytes - per_chunk * size) / chunk_bytes)
    assert sum(waste) / len(waste) < 0.005
    size, chunk_bytes, per_chunk, _ = store.class_geometry(1000)
    assert chunk_bytes > 16384
    rng = random.Random(5)
    handles = [store.keep(store.encode_payload(rng.randbytes(1000)), 0)]
    assert store.chunk_bytes == 16384
    handles += [
        store.keep(store.encode_payload(rng.randbytes(1000)), 0) for _ in range(per_chunk - 1)
    ]
    assert store.chunk_bytes == chunk_bytes
    store.release_many(handles)
    assert store.chunk_bytes == 0


def test_flushed_memory_goes_back_to_the_system() -> None:
    """RSS, not counters: 80 MiB of payloads kept and released leaves no chunk resident."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    store = SlabStore(PAGE, LIMIT, 2)
    before = rss()
    handles = []
    rng = random.Random(7)
    for _ in range(160):
        # Half random, half zeros: about 2 KiB each, so 80 MiB of payload in all.
        batch = b"".join(rng.randbytes(2048) + bytes(2048) for _ in range(256))
        handles += store.keep_all(store.encode(batch))
    grown = rss() - before
    assert grown > 64 << 20
    assert abs(grown - store.chunk_bytes) < 0.05 * grown + (4 << 20)
    store.release_many(handles)
    store.compact()
    assert store.chunk_bytes == 0
    assert rss() - before < 4 << 20


@pytest.mark.parametrize("size", [1, 15, 16, 17, 256])
def test_batches_of_any_size_round_trip(size: int) -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    batch = [ordinary(i) if i % 3 else same_filled(i) for i in range(size)]
    handles = store.keep_all(store.encode(b"".join(batch)))
    out = bytearray(size * PAGE)
    store.load_into(handles, out)
    assert bytes(out) == b"".join(batch)


def test_large_batches_one_after_another_keep_their_own_pages() -> None:
    """A large batch's scratch is reused by the next one: pages kept from the first
    stay right while the second is encoded into the same memory, and a batch still
    alive keeps its own scratch."""
    store = SlabStore(PAGE, LIMIT, 2)
    first = [ordinary(i) for i in range(256)]
    handles = store.keep_all(store.encode(b"".join(first)))  # its scratch goes back
    second = [ordinary(1000 + i) for i in range(300)]  # larger: a new scratch
    alive = store.encode(b"".join(first[:128]))
    third = store.encode(b"".join(second))
    more = store.keep_all(third)
    del third
    kept_alive = store.keep_all(alive)
    for pages, hs in ((first, handles), (second, more), (first[:128], kept_alive)):
        out = bytearray(len(pages) * PAGE)
        store.load_into(hs, out)
        assert bytes(out) == b"".join(pages)


def test_bad_arguments_are_errors_not_crashes() -> None:
    store = SlabStore(PAGE, LIMIT, 2)
    with pytest.raises(ValueError):
        store.encode(bytes(PAGE + 1))
    with pytest.raises(KeyError):
        store.release(12345)
    with pytest.raises(KeyError):
        store.load(-5)
    with pytest.raises(ValueError):
        store.load_into([-1, -1], bytearray(PAGE))
    with pytest.raises(ValueError):
        store.encode_payload(bytes(PAGE + 1))
    with pytest.raises(ValueError):
        SlabStore(100, 100)


def test_summarize_agrees_with_each_handle() -> None:
    """What .stats and the image's st_blocks sum in one call, page by page."""
    store = SlabStore(PAGE, LIMIT, 2)
    batch = [ordinary(i % 7) if i % 5 else same_filled(i % 2) for i in range(60)]
    handles = store.keep_all(store.encode(b"".join(batch)))
    same, shared, charged, zstd = store.summarize(handles)
    assert same == sum(store.is_same_filled(h) for h in handles)
    assert shared == sum(not store.is_same_filled(h) and store.refs(h) > 1 for h in handles)
    assert charged == pytest.approx(sum(store.length(h) / store.refs(h) for h in handles))
    assert charged == pytest.approx(store.payload_bytes)
    assert zstd == 0
    for _ in range(2):  # the first sweep marks pages idle, the second recompresses them
        batch = store.recompress_begin(1000, 3)
        batch.run()
        store.recompress_commit(batch)
    same, shared, charged, zstd = store.summarize(handles)
    assert zstd == sum(store.codec(h) == "zstd" for h in handles) > 0
    assert charged == pytest.approx(sum(store.length(h) / store.refs(h) for h in handles))
    # The same over native int64s, as a page table hands them out (handle_bytes).
    packed = b"".join(h.to_bytes(8, "little", signed=True) for h in handles)
    assert store.summarize(packed) == (same, shared, charged, zstd)
    with pytest.raises(KeyError):
        store.summarize([-1])
    with pytest.raises(KeyError):
        store.summarize((-1).to_bytes(8, "little", signed=True))


def test_a_missing_compiled_store_is_one_clear_line(tmp_path: Path) -> None:
    """No silent slow fallback: without the module, `tmemfs mount` refuses in one line."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # A package directory that shadows tmemfs._pagestore with a module that fails.
    (shadow / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tmemfs._pagestore':\n"
        "            raise ImportError('No module named tmemfs._pagestore')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "tmemfs", "mount", str(mountpoint)],
        env={"PYTHONPATH": str(shadow), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "compiled page store is missing" in lines[0]


@pytest.mark.parametrize("length", [16, 17, 1000, PAGE])
def test_every_slot_of_a_chunk_holds_its_payload_until_chunk_numbers_run_out(length: int) -> None:
    """A record packs its chunk and slot in 32 bits, with just the slot bits its class
    needs: the last slot of a chunk and the chunks past the first come back intact,
    through a compaction too, and a class whose chunk numbers ran out fails a keep
    cleanly (MemoryError, nothing changed) instead of wrapping around."""
    store = SlabStore(PAGE, LIMIT, 2)
    size, chunk_bytes, per_chunk, most_chunks = store.class_geometry(length)
    assert size == -(-length // GRAIN) * GRAIN
    assert per_chunk * size <= chunk_bytes < (per_chunk + 1) * size + 4096
    assert most_chunks * per_chunk >= 1 << 31
    store._limit_chunks(2)
    rng = random.Random(length)
    payloads = [rng.randbytes(length) for _ in range(2 * per_chunk + 1)]

    def keep(payload: bytes) -> int:
        return store.keep(store.encode_payload(payload), 0)

    handles = [keep(p) for p in payloads[:-1]]
    assert store.chunk_bytes == 2 * chunk_bytes
    used = store.memory_used()
    with pytest.raises(MemoryError):
        keep(payloads[-1])
    with pytest.raises(MemoryError):
        store.keep_all(store.encode_payload(payloads[-1]))
    assert store.memory_used() == used and store.payload_pages == 2 * per_chunk
    assert [store.payload(h) for h in handles] == payloads[:-1]
    # Empty the first chunk but for its last slot and thin the second: compaction moves
    # payloads between them.
    gone = handles[: per_chunk - 1] + handles[per_chunk : per_chunk + 3]
    store.release_many(gone)
    store.compact()
    assert store.chunk_bytes == chunk_bytes
    live = [h for h in handles if h not in gone]
    assert [store.payload(h) for h in live] == [payloads[handles.index(h)] for h in live]
    if length == PAGE:
        assert [store.load(h) for h in live] == [store.payload(h) for h in live]
    # The freed slots (and chunk numbers) are used again.
    again = [keep(p) for p in payloads[-1:] + [rng.randbytes(length) for _ in gone[1:]]]
    assert store.payload(again[0]) == payloads[-1]
    store.release_many(live + again)
    store.compact()
    assert store.chunk_bytes == 0 and store.slot_bytes == 0


def test_a_full_reference_count_starts_a_new_record() -> None:
    """Past REFS_LIMIT references (24 bits) an identical page gets a record of its own,
    and the next identical pages fill whichever record has room."""
    assert REFS_LIMIT == (1 << 24) - 1
    assert RECORD_OVERHEAD == 16 + 8
    for page in (same_filled(0xFFFFFFFF00000001), ordinary(3)):
        store = SlabStore(PAGE, LIMIT, 2)
        store._limit_refs(2)
        a, a2, b, b2, c = store.keep_all(store.encode(page * 5))
        assert a == a2 and b == b2 and len({a, b, c}) == 3
        assert [store.refs(h) for h in (a, b, c)] == [2, 2, 1]
        store.release(a)
        assert store.keep_all(store.encode(page * 2)) == [a, c]
        assert store.dedup_pages == (0 if Model.word_page(page) else 6)
        for h in (a, a, b, b, c, c):
            assert store.load(h) == page
            store.release(h)
        assert store.live_records == 0
