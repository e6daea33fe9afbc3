"""The image view: frontswap/N.img as bytes, over pool N's pages.

Byte range [k*P, (k+1)*P) of the image is page k of the pool's one object. This
module turns byte ranges into page runs and batches: a read of a range (zeros where
nothing is stored), a write (read-modify-write of the pages it only partly covers),
and fallocate's ranges (a punched hole is a discard of whole pages with its edges
zeroed; a zeroed range is stored in batches). Every request is one batch of engine
calls; the per-page loops are the engine's compiled ones. It knows nothing of FUSE:
the adapter hands it a pool and a range and answers with what it returns or raises.
"""

from __future__ import annotations

from tmemfs.engine import SWAP_OBJECT, BadValue, Engine, PoolId, StoreRejected

# fallocate(2) modes (linux/falloc.h). The loop device sends PUNCH_HOLE|KEEP_SIZE for
# a discard.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# A zeroed image range is stored this many bytes per batch.
ZERO_BATCH = 1 << 20


class UnsupportedMode(Exception):
    """A fallocate mode tmemfs does not do (EOPNOTSUPP)."""


def partial_pages(off: int, end: int, page_size: int) -> list[int]:
    """The pages [off, end) covers only in part (at most its two ends), in order."""
    first, last = off // page_size, (end - 1) // page_size
    return sorted({i for i in (first, last) if off > i * page_size or end < (i + 1) * page_size})


def whole_pages(off: int, end: int, page_size: int) -> range:
    """The pages wholly inside [off, end)."""
    return range(-(-off // page_size), end // page_size)


def edge_pages(off: int, end: int, page_size: int) -> list[int]:
    """The pages [off, end) touches but does not cover, in order."""
    whole = whole_pages(off, end, page_size)
    return sorted({i for i in (off // page_size, (end - 1) // page_size) if i not in whole})


def zero_batches(off: int, end: int, batch: int = ZERO_BATCH) -> list[tuple[int, int]]:
    """[off, end) cut at multiples of `batch`: the ranges a zeroing stores one by one."""
    ranges = []
    pos = off
    while pos < end:
        upto = min(end, (pos // batch + 1) * batch)
        ranges.append((pos, upto))
        pos = upto
    return ranges


def check_fallocate(mode: int, offset: int, length: int) -> None:
    """fallocate's arguments as tmemfs takes them, for an image and a page file alike:
    PUNCH_HOLE only with KEEP_SIZE, ZERO_RANGE, or an allocation (mode 0, KEEP_SIZE)."""
    what = mode & ~FALLOC_FL_KEEP_SIZE
    if what not in (0, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE) or (
        what == FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE
    ):
        raise UnsupportedMode(hex(mode))
    if offset < 0 or length <= 0:
        raise BadValue(f"fallocate range {offset}+{length}")


class ImageView:
    """Byte ranges of frontswap/N.img to batches of pool N's pages."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.page_size = engine.page_size
        self._reply = bytearray()
        # Reply buffers of `read`s that wait (one per read in flight at once).
        self._waiting_replies: list[bytearray] = []

    def drop_reply_buffer(self) -> None:
        """Give the reply buffers back (no image is open)."""
        self._reply = bytearray()
        self._waiting_replies = []

    def read_now(self, pool_id: PoolId, off: int, size: int) -> bytes | memoryview | None:
        """`read` without waiting, when the engine loads the run in one call (`load_run`:
        every page held in this process, or a hole); None when it cannot.

        The view is into a reply buffer the next read_now reuses: a fresh 1 MiB buffer
        per request was mapped, faulted in and zeroed whole under mlockall. Both read
        paths reply with it before any other request runs (this load drops no names,
        so `invalidates_before_reply` has nothing to await)."""
        pool = self.engine.pool(pool_id)
        end = min(off + size, pool.image_size or 0)
        if off >= end:
            return b""
        psize = self.page_size
        # Inline arithmetic, not a helper: this runs once per request on swap's path.
        first, last = off // psize, (end - 1) // psize
        start = off - first * psize
        count = last - first + 1
        if len(self._reply) < count * psize:
            # A new buffer, never a resize: the last reply's view may still be alive.
            self._reply = bytearray(count * psize)
        run = self.engine.load_run(
            pool_id, SWAP_OBJECT, first, count, memoryview(self._reply)[: count * psize]
        )
        if run is None:
            return None
        return memoryview(run)[start : start + end - off]

    async def read(self, pool_id: PoolId, off: int, size: int) -> bytes | memoryview:
        """One request, one batch: every page it covers is loaded together."""
        data = self.read_now(pool_id, off, size)
        if data is not None:
            return data
        # Pages elsewhere (a remote backend, the writeback tier): loaded into a reply
        # buffer of this request's own, the pages written into it where they land.
        psize = self.page_size
        end = min(off + size, self.engine.pool(pool_id).image_size or 0)
        first, last = off // psize, (end - 1) // psize
        start = off - first * psize
        count = last - first + 1
        spares = self._waiting_replies
        reply = spares.pop() if spares else bytearray()
        if len(reply) < count * psize:
            reply = bytearray(count * psize)
        try:
            view = memoryview(reply)[: count * psize]
            await self.engine.load_run_into(pool_id, SWAP_OBJECT, first, count, view)
        finally:
            # Back for the next request only now, with no wait left before the reply
            # (as read_now's buffer): no other request runs before it is sent.
            spares.append(reply)
        return view[start : start + end - off]

    def write_now(self, pool_id: PoolId, off: int, buf: bytes | memoryview) -> int | None:
        """`write` without waiting: whole pages, kept as one batch
        (`Engine.store_run_now`) when they would fit however they compress; None when
        the request must take `write`. `buf` is only read during the call.

        A write past the end grows the image here too when that needs no wait (a
        local backend keeps no image size): `dd of=N.img` opens with O_TRUNC, so every
        one of its writes grows the image."""
        psize = self.page_size
        end = off + len(buf)
        size = self.engine.pool(pool_id).image_size
        if not buf or off % psize or end % psize or size is None:
            return None
        grows = end > size
        if grows and not self.engine.grows_images_now:
            return None
        if not self.engine.store_run_now(
            pool_id, SWAP_OBJECT, off // psize, buf, room_for_worst=True
        ):
            return None
        if grows:
            self.engine.grow_image_now(pool_id, end)
        return len(buf)

    async def write(self, pool_id: PoolId, off: int, buf: bytes | memoryview) -> int:
        """One request, one batch; pages the request only partly covers are read first."""
        pool = self.engine.pool(pool_id)
        psize = self.page_size
        end = off + len(buf)
        if not buf:
            return 0
        first = off // psize
        data: bytes | bytearray | memoryview = buf
        if off % psize or end % psize:
            last = (end - 1) // psize
            partial = partial_pages(off, end, psize)
            loaded = await self.engine.load_many(pool_id, SWAP_OBJECT, partial, exclusive=False)
            data = bytearray((last - first + 1) * psize)
            for index, page in zip(partial, loaded, strict=True):
                if page is not None:
                    at = (index - first) * psize
                    data[at : at + psize] = page
            data[off - first * psize : end - first * psize] = buf
        stored = await self.engine.store_run(pool_id, SWAP_OBJECT, first, data)
        if pool.image_size is not None and end > pool.image_size:
            await self.engine.resize_image(pool_id, end)
        if not stored:
            raise StoreRejected(f"{pool_id}.img")
        return len(buf)

    async def fallocate(self, pool_id: PoolId, mode: int, off: int, end: int) -> None:
        """fallocate(2) on the image, its mode already checked (`check_fallocate`)."""
        pool = self.engine.pool(pool_id)
        size = pool.image_size
        if size is None:
            return  # unlinked while open: its view is gone, and unlink keeps the pages
        if mode & FALLOC_FL_KEEP_SIZE:
            end = min(end, size)
        elif end > size:
            await self.engine.resize_image(pool_id, end)
        if off >= end:
            return
        if mode & FALLOC_FL_PUNCH_HOLE:
            await self.punch(pool_id, off, end)
        elif mode & FALLOC_FL_ZERO_RANGE:
            for lo, hi in zero_batches(off, end):
                await self.write(pool_id, lo, bytes(hi - lo))

    async def punch(self, pool_id: PoolId, off: int, end: int) -> None:
        """Invalidate the pages wholly inside [off, end) as one batch; zero the edges."""
        psize = self.page_size
        whole = whole_pages(off, end, psize)
        if whole:
            await self.engine.discard(pool_id, SWAP_OBJECT, whole)
        edges = edge_pages(off, end, psize)
        if not edges:
            return  # swap discards whole clusters: nothing to read back
        loaded = await self.engine.load_many(pool_id, SWAP_OBJECT, edges, exclusive=False)
        zeroed: list[tuple[int, bytes]] = []
        for index, page in zip(edges, loaded, strict=True):
            if page is None:
                continue  # never stored: it reads as zeros already
            start = index * psize
            lo, hi = max(off, start) - start, min(end, start + psize) - start
            zeroed.append((index, page[:lo] + bytes(hi - lo) + page[hi:]))
        if zeroed and not all(await self.engine.store_many(pool_id, SWAP_OBJECT, zeroed)):
            raise StoreRejected(f"{pool_id}.img")
