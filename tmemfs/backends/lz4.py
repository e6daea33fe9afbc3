"""`lz4`: compressed pages in RAM, as zswap and zram keep them.

The per-page work is compiled (tmemfs/_pagestore.pyx): a request's pages are
compressed in one call with the GIL released, on both cores when there are many, and
kept in size-class slabs whose empty chunks go back to the system at once. Three
rules, in the order a store meets them (as in zswap_store): same-filled pages (one
8-byte word repeated, zero pages included) keep just the word; other pages are
lz4-compressed, and kept raw when they compress worse than the reject ratio (zram's
huge pages); identical payloads are kept once with a reference count.

A handle is an int: the id of the page's record in the store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.store import Location

# OpenMP's threads otherwise spin after each batch, taking the core that swap and the
# kernel's FUSE side need; under load a spinning team made a 1 MiB batch 4-8x slower
# (measured: 69-134 MB/s against 543 on one thread; 470-490 with passive waiting).
# libgomp reads this once, when it is loaded with the module below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from tmemfs._pagestore import RECORD_OVERHEAD, EncodedBatch, SlabStore
except ImportError as exc:  # a broken install: `tmemfs mount` says so in one line
    MISSING: str | None = (
        f"tmemfs's compiled page store is missing ({exc}); reinstall with `pip install .` "
        "(it needs Cython, gcc and liblz4-dev)")
    RECORD_OVERHEAD = 0
else:
    MISSING = None

# Compaction runs once this many pages were released since the last one.
_COMPACT_AFTER = 4096


class Lz4Backend(Backend):
    """Compressed RAM with same-filled detection and deduplication, in compiled slabs."""

    name = "lz4"
    #: Whole runs of pages go through `encode_run`/`keep_run`/`load_into` (the image path).
    batches = True

    def __init__(self, *args: object, reject_ratio: float = 0.875, threads: int = 2,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not 0 < reject_ratio <= 1:
            raise ValueError("reject ratio must be in (0, 1]")
        self.reject_ratio = reject_ratio
        if MISSING:
            raise RuntimeError(MISSING)
        self.slabs = SlabStore(self.page_size, int(self.page_size * reject_ratio), threads)
        self._released = 0

    # -- batches: one call per request ---------------------------------------------------

    def encode_run(self, data: bytes | bytearray | memoryview) -> EncodedBatch:
        """Compress whole pages from one buffer. It runs right here: the call releases the
        GIL and uses both cores for a large batch, and a small one takes microseconds,
        less than a hop to a worker thread would."""
        return self.slabs.encode(data)

    def run_cost(self, batch: EncodedBatch) -> int:
        """What keeping every page of a batch would cost at most (no dedup assumed)."""
        cost_of = self.slabs.cost_of
        return sum(cost_of(batch.length(i)) for i in range(batch.count))

    def keep_run(self, batch: EncodedBatch) -> list[int]:
        """Keep every page of a batch; their handles."""
        return self.slabs.keep_all(batch)

    def load_into(self, handles: Sequence[int], out: bytearray | memoryview) -> None:
        """Decompress pages into one buffer (-1 gives a zero page)."""
        self.slabs.load_into(handles, out)

    # -- one Encoded per page: page files, and the general store path --------------------

    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        batch = self.slabs.encode(b"".join(pages))
        cost_of = self.slabs.cost_of
        out: list[Encoded] = []
        for i in range(batch.count):
            if batch.is_same_filled(i):
                out.append(Encoded(batch.word(i), 0))
            else:
                length = batch.length(i)
                out.append(Encoded(batch.payload(i), cost_of(length), batch.is_poor(i)))
        return out

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
            self.slabs.compact()

    def summarize(self, handles: Sequence[int]) -> tuple[int, int, float]:
        """Same-filled pages, shared pages and payload bytes charged to them, in one call."""
        return self.slabs.summarize(handles)

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

    def stats(self) -> dict[str, int]:
        slabs = self.slabs
        return {
            "compr_data_size": slabs.payload_bytes,
            "same_filled_pages": slabs.same_filled_pages,
            "dedup_pages": slabs.dedup_pages,
        }

    def describe(self) -> str:
        return f"lz4 (reject ratio {self.reject_ratio}, compiled slabs)"


__all__ = ["RECORD_OVERHEAD", "Lz4Backend"]
