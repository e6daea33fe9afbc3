"""`--writeback FILE`: the writeback tier in one local file of fixed-size slots.

Like a swap device under zswap, the file is an array of page-sized slots: slot i lives
at offset i * page_size, and a payload (an lz4-compressed or raw page, never longer
than a page) fills the start of one slot. Which location uses which slot is kept only
in RAM, so the tier does not survive a restart: `open` truncates the file.

Freed slots are reused lowest first, which keeps the file dense at its low end, so the
free slots at its high end can be cut off (at the next put).

One rule holds through errors and concurrency: a location never points at a slot that
holds someone else's payload or a partly written one. Hence:
- new payloads get their slot in the index only after their write succeeded;
- a slot being read (pinned) is never overwritten or handed out again: a replacement
  goes to a fresh slot, and a freed pinned slot is reused only once its reads end;
- a location whose slot is being rewritten in place is neither read nor deleted until
  the write is over;
- writes run one batch at a time, so a cut-off of the file's end never races a write.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import trio

from tmemfs.backends.store import Location, PageStore, StoreUnavailable

log = logging.getLogger(__name__)

# Measured CPython 3.11 costs of the index, so the engine's budget counts what the tier
# really holds in RAM: tracemalloc (after gc.collect()) around filling the index, with
# Locations made afresh per page as the engine makes them, and dropped after the call.
# A page in an existing object: the inner dict's slot, the index int (28) and the packed
# slot/length int (32). 96..124 bytes by where the dict is in its growth, over 50k..400k
# pages in steps of 25k (random indexes, slots, lengths 257..4096); 110 on average.
# (A flat dict Location -> (slot, length) tuple measured 327..352.)
_ENTRY_OVERHEAD = 110
# An object of its own: the key tuple, its generation int, its strings (the engine
# makes the pool name afresh per call), a small inner dict and the outer dict's slot.
# 20,000 one-page objects measured 539 a page, minus _ENTRY_OVERHEAD.
_OBJECT_OVERHEAD = 429
# A free slot: its int (28), a heap list slot (8) and a set slot. 50k..200k slots
# freed in random order measured 68..83 bytes each; 79 on average.
_FREE_SLOT_OVERHEAD = 79

# What an index key is made of: the part of a Location an object shares with its pages.
_ObjectKey = tuple[str, int, str]


class _Planned(NamedTuple):
    """One payload of a put: where it goes and whether that is its location's old slot."""

    location: Location
    slot: int
    payload: bytes
    in_place: bool


class _Written(NamedTuple):
    """What a worker thread's batch of writes did."""

    done: int  # payloads written in full, from the start of the plan
    error: OSError | None  # what stopped it, if anything did
    shrunk: bool  # whether the file's free end was cut off first


class FileStore(PageStore):
    """Payloads in page-sized slots of one local file, indexed in RAM.

    Not persistent: `open` creates or truncates the file and the store starts empty.
    Every batch of reads or writes is one call into a worker thread (os.pread,
    os.pwrite), bounded by the shared CapacityLimiter, so the trio thread never waits
    on the disk. A failed write (ENOSPC, EIO) raises StoreUnavailable; the locations
    written before the failure keep their new payloads, the others keep their old ones,
    except a location whose slot was being overwritten in place when the write failed:
    its slot may hold half a payload, so it is forgotten (reads give None), as tmem's
    duplicate-store rule forgets the old copy of a page whose new store failed.
    """

    def __init__(self, path: str | Path, page_size: int, limiter: trio.CapacityLimiter) -> None:
        if page_size <= 0:
            raise ValueError("page size must be positive")
        self.path = Path(path)
        self.page_size = page_size
        self.limiter = limiter
        self.description = f"file {self.path}"
        self._fd: int | None = None
        # Cutting the end off only makes sense for a regular file (not a block device).
        self._shrinkable = False
        # The index, one dict per object as zswap keeps one tree per swap type: pages of
        # one object share its strings, and a page costs two ints and a dict slot. The
        # value packs (slot << _shift) | length into one int, a third of a tuple's cost.
        self._objects: dict[_ObjectKey, dict[int, int]] = {}
        self._entries = 0
        self._shift = page_size.bit_length()
        self._length_mask = (1 << self._shift) - 1
        # Slots [0, _end) are in use, free or pinned; the file spans _file_slots of them.
        self._end = 0
        self._file_slots = 0
        # Free slots below _end: a heap for lowest-first reuse, a set for membership.
        # The heap may hold stale entries (slots since reused or cut off); the set rules.
        self._free_heap: list[int] = []
        self._free: set[int] = set()
        # Slots being read: slot -> number of reads. Pinned slots freed meanwhile wait
        # in _zombies until their last read ends.
        self._pins: dict[int, int] = {}
        self._zombies: set[int] = set()
        # Slots being overwritten in place, and the event set when that write is over.
        self._rewriting: set[int] = set()
        self._rewrite_done = trio.Event()
        self._write_lock = trio.Lock()
        self._reads_in_flight = 0
        self._reads_drained = trio.Event()

    # -- life --------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or truncate the file; StoreUnavailable if it cannot be used."""
        if self._fd is not None:
            raise RuntimeError(f"{self.description} is already open")
        try:
            fd, self._shrinkable = await trio.to_thread.run_sync(
                self._open_file, limiter=self.limiter
            )
        except IsADirectoryError:
            raise StoreUnavailable(
                f"{self.path} is a directory; the writeback tier needs a file path"
            ) from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc.strerror or exc}") from None
        self._fd = fd
        self._clear()

    def _open_file(self) -> tuple[int, bool]:
        """In a worker thread: the descriptor, and whether it is a regular file."""
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fd = os.open(self.path, flags, 0o600)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                # Swapped-out pages are process memory: an existing file we reuse must
                # not stay readable by others (O_CREAT's mode applies to new files only).
                if stat.S_IMODE(mode) & 0o077:
                    os.fchmod(fd, 0o600)
            elif not stat.S_ISBLK(mode):
                # A FIFO or character device would take writes and give back nothing.
                raise OSError(errno.EINVAL, "not a regular file or block device")
        except BaseException:
            os.close(fd)
            raise
        return fd, stat.S_ISREG(mode)

    async def close(self) -> None:
        """Close the file once the reads and writes in flight are over; the file stays."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # New calls now fail; wait for the ones that hold the descriptor, so it is never
        # closed under a worker thread (its number could be reused by another open).
        # Shielded: those threads cannot be cancelled anyway, and shutdown often closes
        # from a cancelled scope, where an unshielded wait would leak the descriptor.
        with trio.CancelScope(shield=True):
            async with self._write_lock:
                while self._reads_in_flight:
                    self._reads_drained = trio.Event()
                    await self._reads_drained.wait()
                os.close(fd)
        self._clear()

    def _clear(self) -> None:
        self._objects.clear()
        self._entries = 0
        self._end = self._file_slots = 0
        self._free_heap.clear()
        self._free.clear()
        self._zombies.clear()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StoreUnavailable(f"{self.description} is not open")
        return self._fd

    # -- put ---------------------------------------------------------------------------

    async def put_many(self, items: Sequence[tuple[Location, bytes]]) -> None:
        """Keep every payload (replacing in place where it can) in one worker-thread call."""
        batch: dict[Location, bytes] = {}
        for location, payload in items:
            if len(payload) > self.page_size:
                raise ValueError(
                    f"payload of {len(payload)} bytes does not fit a {self.page_size}-byte slot"
                )
            batch[location] = payload  # a location given twice keeps its last payload
        if not batch:
            return
        async with self._write_lock:
            fd = self._require_fd()
            plan = sorted(
                (self._plan(location, payload) for location, payload in batch.items()),
                key=lambda p: p.slot,  # in file order, for the disk's sake
            )
            end = self._end  # every planned slot is below it
            shrink_to = end if self._shrinkable and self._file_slots > end else None
            self._rewrite_done = trio.Event()
            self._rewriting.update(p.slot for p in plan if p.in_place)
            # Cancellation can only come before the thread starts: then nothing was written.
            written = _Written(0, None, shrunk=False)
            try:
                written = await trio.to_thread.run_sync(
                    self._write_slots, fd, shrink_to, plan, limiter=self.limiter
                )
            finally:
                self._settle(plan, written.done, failed=written.error is not None)
                # An overestimate only costs a needless ftruncate at the next put.
                self._file_slots = end if written.shrunk else max(self._file_slots, end)
                self._rewriting.clear()
                self._rewrite_done.set()
        if written.error is not None:
            raise StoreUnavailable(
                f"cannot write to {self.path}: {written.error.strerror or written.error}"
            ) from written.error

    def _plan(self, location: Location, payload: bytes) -> _Planned:
        """Choose a slot: the location's own one if no read holds it, else a free one."""
        old = self._lookup(location)
        if old is not None:
            slot = old >> self._shift
            if slot not in self._pins:
                return _Planned(location, slot, payload, in_place=True)
        return _Planned(location, self._allocate(), payload, in_place=False)

    def _write_slots(self, fd: int, shrink_to: int | None, plan: Sequence[_Planned]) -> _Written:
        """In a worker thread: cut off the free end if asked, then write in plan order."""
        shrunk = False
        if shrink_to is not None:
            # Safe only because writes are serial: no other thread writes above shrink_to.
            try:
                os.ftruncate(fd, shrink_to * self.page_size)
                shrunk = True
            except OSError as exc:
                # Only disk space is lost; the slots above stay unused.
                log.warning("could not shrink %s: %s", self.path, exc)
        for done, planned in enumerate(plan):
            try:
                _pwrite_all(fd, planned.payload, planned.slot * self.page_size)
            except OSError as exc:
                return _Written(done, exc, shrunk)
        return _Written(len(plan), None, shrunk)

    def _settle(self, plan: Sequence[_Planned], done: int, *, failed: bool) -> None:
        """After the writes: index what was written, give back slots of what was not."""
        for n, planned in enumerate(plan):
            if n < done:
                previous = self._pop(planned.location)
                self._set(planned.location, planned.slot, len(planned.payload))
                if previous is not None and previous >> self._shift != planned.slot:
                    self._release(previous >> self._shift)
            elif planned.in_place:
                if n == done and failed:
                    # The old payload may be half overwritten: forget it, reuse the slot.
                    self._pop(planned.location)
                    self._release(planned.slot)
                # Not attempted: the old payload is intact and stays indexed.
            else:
                self._release(planned.slot)

    # -- get and delete ----------------------------------------------------------------

    async def get_many(self, locations: Sequence[Location]) -> list[bytes | None]:
        """The payloads in order, None where nothing is kept; one worker-thread call."""
        found = await self._lookup_settled(locations)
        fd = self._require_fd()  # after the last wait: close() may have run meanwhile
        reads = sorted(
            (packed >> self._shift, packed & self._length_mask, n)
            for n, packed in enumerate(found)
            if packed is not None
        )
        result: list[bytes | None] = [None] * len(locations)
        if not reads:
            return result
        slots = [slot for slot, _, _ in reads]
        for slot in slots:
            self._pins[slot] = self._pins.get(slot, 0) + 1
        self._reads_in_flight += 1
        try:
            payloads = await trio.to_thread.run_sync(
                self._read_slots, fd, reads, limiter=self.limiter
            )
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        finally:
            self._unpin(slots)
            self._reads_in_flight -= 1
            if not self._reads_in_flight:
                self._reads_drained.set()
        for (_, _, n), payload in zip(reads, payloads, strict=True):
            result[n] = payload
        return result

    def _read_slots(self, fd: int, reads: Sequence[tuple[int, int, int]]) -> list[bytes]:
        """In a worker thread: each slot's payload, in the order given."""
        payloads = []
        for slot, length, _ in reads:
            offset = slot * self.page_size
            data = os.pread(fd, length, offset)
            while len(data) < length:  # a short read only happens at the end of the file
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise OSError(errno.EIO, f"slot {slot} ends early: was the file truncated?")
                data += more
            payloads.append(data)
        return payloads

    async def delete_many(self, locations: Sequence[Location]) -> None:
        """Free the locations' slots; no I/O, the next put that needs them overwrites them."""
        found = await self._lookup_settled(locations)
        for location, packed in zip(locations, found, strict=True):
            # A location named twice was popped already the second time.
            if packed is not None and self._pop(location) is not None:
                self._release(packed >> self._shift)

    async def _lookup_settled(self, locations: Sequence[Location]) -> list[int | None]:
        """Index entries of the locations, once none of them is being rewritten in place."""
        while True:
            found = [self._lookup(location) for location in locations]
            if not self._rewriting or not any(
                packed is not None and packed >> self._shift in self._rewriting for packed in found
            ):
                return found
            await self._rewrite_done.wait()

    # -- the index ---------------------------------------------------------------------

    def _lookup(self, location: Location) -> int | None:
        pages = self._objects.get(location[:3])
        return None if pages is None else pages.get(location.index)

    def _set(self, location: Location, slot: int, length: int) -> None:
        key = location[:3]
        pages = self._objects.get(key)
        if pages is None:
            pages = self._objects[key] = {}
        if location.index not in pages:
            self._entries += 1
        pages[location.index] = (slot << self._shift) | length

    def _pop(self, location: Location) -> int | None:
        key = location[:3]
        pages = self._objects.get(key)
        if pages is None:
            return None
        packed = pages.pop(location.index, None)
        if packed is not None:
            self._entries -= 1
            if not pages:
                del self._objects[key]
        return packed

    # -- slots -------------------------------------------------------------------------

    def _allocate(self) -> int:
        """The lowest free slot, or a new one at the end of the file."""
        while self._free_heap:
            slot = heapq.heappop(self._free_heap)
            if slot in self._free:
                self._free.discard(slot)
                return slot
        slot = self._end
        self._end += 1
        return slot

    def _release(self, slot: int) -> None:
        """Free a slot, or mark it to be freed when the reads that pin it end."""
        if slot in self._pins:
            self._zombies.add(slot)
            return
        self._free.add(slot)
        heapq.heappush(self._free_heap, slot)
        # Free slots at the end are given up, so the next put can cut the file there.
        while self._end and self._end - 1 in self._free:
            self._end -= 1
            self._free.discard(self._end)
        # Stale heap entries must not outgrow the free slots they shadow.
        if len(self._free_heap) > 2 * len(self._free) + 64:
            self._free_heap = sorted(self._free)

    def _unpin(self, slots: Iterable[int]) -> None:
        for slot in slots:
            left = self._pins[slot] - 1
            if left:
                self._pins[slot] = left
                continue
            del self._pins[slot]
            if slot in self._zombies:
                self._zombies.discard(slot)
                self._release(slot)

    # -- accounting --------------------------------------------------------------------

    def memory_used(self) -> int:
        """Bytes of RAM the index and the free list take (measured constants, see above)."""
        return (
            self._entries * _ENTRY_OVERHEAD
            + len(self._objects) * _OBJECT_OVERHEAD
            + len(self._free_heap) * _FREE_SLOT_OVERHEAD
        )


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`; a short write is continued, a full disk raises."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written
