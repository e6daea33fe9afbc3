"""`lz4`: compressed pages in RAM, as zswap and zram keep them.

The per-page work is compiled (tmemfs/_pagestore.pyx): a request's pages are
compressed in one call with the GIL released, on both cores when there are many, and
kept in size-class slabs whose empty chunks go back to the system at once. Three
rules, in the order a store meets them (as in zswap_store): same-filled pages (one
8-byte word repeated, zero pages included) keep just the word; other pages are
lz4-compressed, and kept raw when they compress worse than the reject ratio (zram's
huge pages); identical payloads are kept once with a reference count.

A handle is an int: the id of the page's record in the store.

Cold pages are recompressed with zstd in the background (zram's `recompress`, done by
itself): a sweep over the store's records every --recompress-after seconds takes the
pages neither loaded nor stored since the previous sweep (so idle for one to two
intervals), 256 at a time; a sweep is put off while the mount is busy (see
BUSY_PAGES_PER_SECOND). Each batch is copied out on the trio thread (well under a
millisecond), recompressed in a thread of its own at nice 19 with the GIL released,
and swapped in on the trio thread; the task yields between batches, so a FUSE request
waits at most for one copy-out or one swap-in.

With --recompress-dict (off by default: see the man page) zstd uses a dictionary
trained on the store's own idle pages (one per store, not per pool: the store is
mount-wide and payloads are shared across pools). Once the store holds DICT_MIN_PAGES
pages, a sweep starts with a training batch: TRAIN_BATCH idle pages spread evenly over
the store, from which the recompression thread trains a DICT_BYTES dictionary; it is
kept only if it saves 1% of plain zstd's slots on the pages held out of its sample
(every 4th). Every batch after tries some pages without it too; when a whole sweep's
saving falls under half of what the held-out pages showed, the next sweep retrains.
Pages keep the dictionary they were compressed with, which lives until its last page
goes. A training that did not pay waits twice as many sweeps as the last before the
next (at most MAX_TRAIN_WAIT).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import trio

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.codec import encoded_values
from tmemfs.backends.store import Location

# OpenMP's threads otherwise spin after each batch, taking the core that swap and the
# kernel's FUSE side need; under load a spinning team made a 1 MiB batch 4-8x slower
# (measured: 69-134 MB/s against 543 on one thread; 470-490 with passive waiting).
# libgomp reads this once, when it is loaded with the module below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from tmemfs._pagestore import RECORD_OVERHEAD, EncodedBatch, RecompressBatch, SlabStore
except ImportError as exc:  # a broken install: `tmemfs mount` says so in one line
    MISSING: str | None = (
        f"tmemfs's compiled page store is missing ({exc}); reinstall with `pip install .` "
        "(it needs Cython, gcc, liblz4-dev and libzstd-dev)"
    )
    RECORD_OVERHEAD = 0
else:
    MISSING = None

log = logging.getLogger(__name__)
T = TypeVar("T")

# Compaction runs once this many pages were released since the last one.
_COMPACT_AFTER = 4096
# ... and moves payloads only if that gives back this share of the chunks' memory.
_COMPACT_SHARE = 64
# Pages recompressed per batch: 256 take about 6 ms of one core at level 3, and the
# copy-out and swap-in on the trio thread a fraction of a millisecond each.
RECOMPRESS_BATCH = 256
# Seconds a page must go unused before it is recompressed (--recompress-after). Swap
# reloads most of what it will reload within seconds; after a minute what is left
# is what the swapped-out process does not touch (see the issue note for figures).
DEFAULT_RECOMPRESS_AFTER = 60.0
# A sweep is put off while the mount is busy, more than BUSY_PAGES_PER_SECOND pages
# stored and loaded a second over the last interval, at most MAX_PUT_OFF times in a row
# (so a mount that is never idle still recompresses). Under swap the pages it would
# take come back before long: in the bench's swap experiment (512 MiB in 256 MiB,
# some 40,000 pages a second) at --recompress-after 2, 107,771 pages were
# recompressed and 79,617-82,979 of the 250,000 loads then met one, each paying
# zstd's decode on a page fault, while the sweep took 2.4-3.2 s of CPU beside it. Wall
# time, median of 6 runs: 12.4 s without recompression, 14.35 s with it (1.16x), and
# 12.7 s with the sweep put off (3 runs; it recompressed nothing while swapping).
BUSY_PAGES_PER_SECOND = 1000
MAX_PUT_OFF = 8
# zstd's own default: on the bench's files corpus it kept 2% less than level 1 for
# 1.4x its CPU; level 5 kept 1.7% less again for twice the CPU (23 against 45 us/page).
DEFAULT_RECOMPRESS_LEVEL = 3
# Dictionaries (bench/dict_measure.py, distinct pages in 32-byte slots, the store's step
# when measured, zstd-3, the dictionary's bytes included): on the anon corpus a 64 KiB
# dictionary from a 4 MiB sample keeps 0.969x of plain zstd (16 KiB: 0.989x, 112 KiB:
# 0.967x; a 1 MiB sample 0.977x, 16 MiB 0.964x); on files 0.986x (112 KiB: 0.981x); on
# random pages nothing.
DICT_BYTES = 64 * 1024
TRAIN_BATCH = 1024  # pages of the training batch: a 3 MiB sample, 1/4 held out
# A dictionary costs its bytes and decompression tables (about 92 KiB for 64 KiB); at
# the 3% (30 B a page) it saves on anon it pays for itself from some 3000 pages.
DICT_MIN_PAGES = 8192
MAX_TRAIN_WAIT = 64  # sweeps
# Plain zstd's slots over the pages a sweep probed (every 8th it took) below which
# its saving is too noisy to call a drift: some 40 pages of a process's memory.
PROBE_MIN_BYTES = 32 * 1024


class Lz4Backend(Backend):
    """Compressed RAM with same-filled detection and deduplication, in compiled slabs."""

    name = "lz4"
    #: Whole runs of pages go through `encode_run`/`keep_run`/`load_into` (the image path).
    batches = True

    def __init__(
        self,
        *args: object,
        reject_ratio: float = 0.875,
        threads: int = 2,
        recompress_after: float | None = DEFAULT_RECOMPRESS_AFTER,
        recompress_level: int = DEFAULT_RECOMPRESS_LEVEL,
        recompress_dict: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not 0 < reject_ratio <= 1:
            raise ValueError("reject ratio must be in (0, 1]")
        if recompress_after is not None and recompress_after <= 0:
            raise ValueError("recompress-after must be positive")
        self.reject_ratio = reject_ratio
        if MISSING:
            raise RuntimeError(MISSING)
        self.slabs = SlabStore(self.page_size, int(self.page_size * reject_ratio), threads)
        self._released = 0
        #: Seconds between recompression sweeps; None: never recompress.
        self.recompress_after = recompress_after
        self.recompress_level = recompress_level
        #: Train zstd dictionaries from the store's idle pages and recompress with them.
        self.recompress_dict = recompress_dict
        # The current dictionary's saving over plain zstd on its held-out pages (0: none
        # yet), whether the next sweep retrains, and how many sweeps to wait before then.
        self._dict_saving = 0.0
        self._retrain = False
        self._train_wait = 0
        self._train_backoff = 1
        self._idle_thread: ThreadPoolExecutor | None = None

    # -- batches: one call per request ---------------------------------------------------

    def encode_run(self, data: bytes | bytearray | memoryview) -> EncodedBatch:
        """Compress whole pages from one buffer. It runs right here: the call releases the
        GIL and uses both cores for a large batch, and a small one takes microseconds,
        less than a hop to a worker thread would."""
        return self.slabs.encode(data)

    def run_cost(self, batch: EncodedBatch) -> int:
        """What keeping every page of a batch would cost at most (no dedup assumed)."""
        return self.slabs.batch_cost(batch)

    def charge_many(self, handles: Sequence[int]) -> int:
        """The sum of page_charge over handles, in one call."""
        return self.slabs.charge_of(handles)

    def max_page_charge(self) -> int:
        """A page kept raw: no payload is longer (one that compresses worse is kept raw)."""
        return self.slabs.cost_of(self.page_size)

    def keep_run(self, batch: EncodedBatch) -> list[int]:
        """Keep every page of a batch; their handles."""
        return self.slabs.keep_all(batch)

    def load_into(self, handles: Sequence[int], out: bytearray | memoryview) -> None:
        """Decompress pages into one buffer (-1 gives a zero page)."""
        self.slabs.load_into(handles, out)

    # -- one Encoded per page: page files, and the general store path --------------------

    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        return encoded_values(self.slabs.encode(b"".join(pages)), self.slabs.cost_of)

    def store(self, encoded: Encoded) -> int:
        value = encoded.value
        payload = value.to_bytes(8, "little") if isinstance(value, int) else value
        return self.slabs.keep(self.slabs.encode_payload(payload), 0)

    async def load_many(
        self, locations: Sequence[Location], handles: Sequence[int]
    ) -> list[bytes | None]:
        ps = self.page_size
        out = bytearray(len(handles) * ps)
        self.slabs.load_into(handles, out)
        view = memoryview(out)
        return [bytes(view[i * ps : (i + 1) * ps]) for i in range(len(handles))]

    def invalidate(self, handle: int) -> None:
        self.slabs.release(handle)
        self._released += 1

    def invalidate_many(self, handles: Sequence[int]) -> None:
        """Release many handles in one call."""
        self.slabs.release_many(handles)
        self._released += len(handles)

    def trim(self) -> None:
        """After many releases: compact the slabs so sparse chunks go back to the system."""
        if self._released >= _COMPACT_AFTER or self.slabs.live_records == 0:
            self._released = 0
            # At 10^6 records the pass over them takes about 5 ms: it is made when it
            # gives back at least 1/64 of the chunk memory (fragmentation stays below
            # that), not for a few chunks.
            self.slabs.compact(self.slabs.chunk_bytes // _COMPACT_SHARE)

    def summarize(self, handles: Sequence[int] | bytes) -> tuple[int, int, float, int]:
        """Same-filled pages, shared pages, payload bytes charged to them and pages held
        in zstd, in one call."""
        return self.slabs.summarize(handles)

    # -- recompression, in the background ----------------------------------------------

    async def run_recompress(self, activity: Callable[[], int] | None = None) -> None:
        """Sweep the store every `recompress_after` seconds, recompressing idle pages;
        while `activity` (pages stored and loaded) says the mount is busy, the sweep is
        put off (see BUSY_PAGES_PER_SECOND)."""
        if self.recompress_after is None:
            return
        log.info(
            "recompressing pages idle for %gs with zstd level %d%s",
            self.recompress_after,
            self.recompress_level,
            " and a trained dictionary" if self.recompress_dict else "",
        )
        interval = self.recompress_after
        moved, since, put_off = activity() if activity else 0, trio.current_time(), 0
        try:
            while True:
                started = trio.current_time()
                now = activity() if activity else 0
                rate = (now - moved) / max(started - since, 1e-3)
                # The rate over the last interval alone: measured since the last sweep,
                # one burst would keep the mount "busy" long after it went quiet.
                moved, since = now, started
                if rate > BUSY_PAGES_PER_SECOND and put_off < MAX_PUT_OFF:
                    put_off += 1
                else:
                    put_off = 0
                    await self.recompress_sweep()
                await trio.sleep_until(started + interval)
        finally:
            if self._idle_thread is not None:
                # A batch still running there finishes on its own; nothing waits for it.
                self._idle_thread.shutdown(wait=False)
                self._idle_thread = None

    async def recompress_sweep(self) -> int:
        """One sweep over every record; the pages recompressed."""
        slabs = self.slabs
        pages = 0
        train = self._wants_training()
        probe_plain = probe_dict = 0
        while True:
            batch = slabs.recompress_begin(
                TRAIN_BATCH if train else RECOMPRESS_BATCH,
                self.recompress_level,
                dictionary=self.recompress_dict,
                train=DICT_BYTES if train else 0,
            )
            if batch.count:
                await self._run_idle(batch.run)
                done = slabs.recompress_commit(batch)
                pages += done
                # Each page left a slot behind: compact as after as many releases.
                self._released += done
                self.trim()
                if train:
                    self._trained(batch)
                elif batch.dictionary is not None:
                    probe_plain += batch.probe_plain
                    probe_dict += batch.probe_dict
            if train:
                # A training batch is a sample from the whole store, apart from the
                # sweep: the sweep proper starts now (none idle yet: the next one trains).
                train = False
                continue
            if batch.sweep_done:
                self._check_drift(probe_plain, probe_dict)
                return pages
            # FUSE requests go first.
            await trio.sleep(0)

    def _wants_training(self) -> bool:
        """Whether this sweep starts with a training batch."""
        if not self.recompress_dict or self.slabs.payload_pages < DICT_MIN_PAGES:
            return False
        if self._train_wait:
            self._train_wait -= 1
            return False
        return self.slabs.current_dict < 0 or self._retrain

    def _trained(self, batch: RecompressBatch) -> None:
        if batch.count < TRAIN_BATCH // 4:
            return  # too few idle pages to train from: the next sweep tries again
        if batch.trained and batch.dictionary is not None:
            self._dict_saving = 1 - batch.probe_dict / max(batch.probe_plain, 1)
            self._retrain = False
            self._train_backoff = 1
            log.info(
                "trained a zstd dictionary of %d bytes: it saves %.1f%% on pages held "
                "out of its sample",
                len(batch.dictionary.data),
                100 * self._dict_saving,
            )
            return
        self._train_wait = self._train_backoff
        self._train_backoff = min(2 * self._train_backoff, MAX_TRAIN_WAIT)

    def _check_drift(self, probe_plain: int, probe_dict: int) -> None:
        """Retrain at the next sweep when the current dictionary saves less than half
        what it did at first (judged on at least PROBE_MIN_BYTES of probed pages)."""
        if probe_plain < PROBE_MIN_BYTES or self._dict_saving <= 0:
            return
        saving = 1 - probe_dict / probe_plain
        if saving < self._dict_saving / 2:
            log.info(
                "the zstd dictionary saves %.1f%%, down from %.1f%%: retraining",
                100 * saving,
                100 * self._dict_saving,
            )
            self._retrain = True

    async def _run_idle(self, func: Callable[[], T]) -> T:
        """Run `func` in the recompression thread (nice 19: a request's threads come
        first) and wait for it without holding one of trio's worker threads."""
        if self._idle_thread is None:
            self._idle_thread = ThreadPoolExecutor(1, "tmemfs-recompress", _idle_priority)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = self._idle_thread.submit(func)
        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    def payload_of(self, handle: int) -> bytes:
        return self.slabs.payload(handle)

    def payload_share(self, handle: int) -> float:
        return self.slabs.length(handle) / self.slabs.refs(handle)

    def page_charge(self, handle: int) -> int:
        """As `run_cost` and `encode_many` priced it: its slot, whatever shares it."""
        return self.slabs.cost_of(self.slabs.length(handle))

    def is_same_filled(self, handle: int) -> bool:
        return self.slabs.is_same_filled(handle)

    def is_shared(self, handle: int) -> bool:
        return not self.slabs.is_same_filled(handle) and self.slabs.refs(handle) > 1

    def memory_used(self) -> int:
        return self.slabs.memory_used()

    def is_recompressed(self, handle: int) -> bool:
        return self.slabs.codec(handle).startswith("zstd")

    def stats(self) -> dict[str, int]:
        slabs = self.slabs
        return {
            "compr_data_size": slabs.payload_bytes,
            "same_filled_pages": slabs.same_filled_pages,
            "dedup_pages": slabs.dedup_pages,
            "recompressed_pages": slabs.recompressed_pages,
            "recompress_saved_bytes": slabs.recompress_saved_bytes,
            # The per-codec breakdown: lz4 counts the pages kept raw too.
            "codec_lz4_pages": slabs.payload_pages - slabs.recompressed_pages,
            "codec_lz4_data_size": slabs.payload_bytes - slabs.zstd_payload_bytes,
            "codec_zstd_pages": slabs.recompressed_pages - slabs.dict_pages,
            "codec_zstd_data_size": slabs.zstd_payload_bytes - slabs.dict_payload_bytes,
            "codec_zstd_dict_pages": slabs.dict_pages,
            "codec_zstd_dict_data_size": slabs.dict_payload_bytes,
            # The dictionaries kept, with their decompression tables (in pool_total_size).
            "codec_zstd_dict_dictionary_size": slabs.dictionary_bytes,
            # Loads that met a page held in zstd (an event count).
            "recompressed_loads": slabs.recompressed_loads,
        }

    def describe(self) -> str:
        recompress = (
            "no recompression"
            if self.recompress_after is None
            else f"zstd:{self.recompress_level}{'+dict' if self.recompress_dict else ''} "
            f"after {self.recompress_after:g}s"
        )
        return f"lz4 (reject ratio {self.reject_ratio}, compiled slabs, {recompress})"


def _idle_priority() -> None:
    """Give the calling thread the lowest priority that still makes progress.

    Nice 19, not SCHED_IDLE: under SCHED_IDLE a sweep of 64K pages (1.5 s of CPU) did
    not finish in 10 minutes while other test suites kept both cores busy; at nice 19
    it still gets about 1.5% of a busy core.
    """
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


__all__ = ["RECORD_OVERHEAD", "Lz4Backend", "RecompressBatch"]
