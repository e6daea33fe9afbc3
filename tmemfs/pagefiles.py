"""Page files as open files: how a page is read and written through read(2) and write(2).

A page file holds one page. Writes of less than a page are assembled in the open
file and stored at close (read-modify-write of what is stored); a whole-page write
is a store at once. A page created by open(O_CREAT) exists, as zeros, before its
first store: for its creator at once, for everyone once the creator closed it. rsync
writes a page as `.N.XXXXXX` and renames it onto N: such staged copies are held here,
outside the engine, until the rename stores them. The tree (tmemfs.tree) decides
which file an open is; this module what reading and writing it does. No FUSE here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tmemfs.engine import Engine, Owner, PageKey, PoolId, StoreRejected
from tmemfs.image import FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from tmemfs.nodes import Node, NodeExists, NoSuchNode, PastPage, StaleFile, TooManyStaged

log = logging.getLogger(__name__)

# How many staged copies may be coming in at once, per mount.
MAX_STAGED = 1024


@dataclass(slots=True, eq=False)
class OpenPage:
    """A page file opened for I/O; partial writes are assembled here until flush."""

    key: PageKey
    writable: bool
    buffer: bytearray | None = None
    dirty: bool = False
    created: bool = False
    loaded: bytes | None = None


def flushes_at_close(handle: object) -> bool:
    """Whether close(2) of an open file has work to do here (`PageFiles.flush`): only a
    page file opened for writing, which stores what it assembled and says ENOSPC
    there. Every other open file (read-only, an image, a text file) is told to the
    kernel as needing no FLUSH, which spares a request per close."""
    return isinstance(handle, OpenPage) and handle.writable


@dataclass(slots=True)
class Staged:
    """`.N.XXXXXX` in a page directory: a copy of page N coming in, as rsync writes it.

    It holds at most a page, outside the engine; rename onto N stores it as page N.
    """

    owner: Owner
    data: bytearray = field(default_factory=bytearray)
    mtime_ns: int = field(default_factory=time.time_ns)


@dataclass(slots=True)
class OpenStaged:
    """A staged copy opened for I/O."""

    node: Node


class PageFiles:
    """The open page files and staged copies of a mount, over an Engine."""

    def __init__(self, engine: Engine, on_abandoned: Callable[[PageKey], None]) -> None:
        self.engine = engine
        self.page_size = engine.page_size
        # Called when a created page will not be stored: the kernel must forget it.
        self._abandoned = on_abandoned
        # Files coming in under rsync's temporary names, until renamed onto a page.
        self.staged: dict[Node, Staged] = {}
        # Pages created by an open file that has not stored them yet, with those files:
        # they exist for stat and lookup, as a freshly created file does.
        self._creators: dict[PageKey, list[OpenPage]] = {}
        # Of those, the ones whose creator has closed them with nothing written: from
        # then on everyone reads them as a zero page; before, only the creator does.
        self._closed_creations: set[PageKey] = set()

    def creating(self, key: PageKey) -> bool:
        """Whether an open file is creating this page (it exists, unstored)."""
        return key in self._creators

    def creating_indexes(self, pool: PoolId, obj: str) -> Iterator[int]:
        """The pages of an object that open files are creating."""
        return (k.index for k in self._creators if k.pool == pool and k.object == obj)

    def open(self, key: PageKey, writable: bool, truncate: bool) -> OpenPage:
        """An open file of an existing page."""
        handle = OpenPage(key, writable)
        if writable and truncate:
            # `echo hi > page`: the page becomes what is written, zero-padded.
            handle.buffer = bytearray(self.page_size)
            handle.dirty = True
        return handle

    def open_created(self, key: PageKey) -> OpenPage:
        """An open file of a new page: zeros until written, stored at close."""
        handle = OpenPage(key, writable=True, created=True)
        handle.buffer = bytearray(self.page_size)
        self._creators.setdefault(key, []).append(handle)
        return handle

    # -- staged copies --------------------------------------------------------------------

    def create_staged(
        self, node: Node, owner: Owner, exclusive: bool, truncate: bool
    ) -> OpenStaged:
        """open(O_CREAT) of `.N.XXXXXX`: a staged copy of page N, or the one there."""
        if node in self.staged:
            if exclusive:
                raise NodeExists(node.name)
            if truncate:
                self.staged[node].data.clear()
        else:
            if len(self.staged) >= MAX_STAGED:
                raise TooManyStaged(node.name)
            self.staged[node] = Staged(owner)
        return OpenStaged(node)

    def staged_data(self, handle: OpenStaged) -> bytearray:
        """What an open staged copy holds so far."""
        staged = self.staged.get(handle.node)
        if staged is None:  # renamed or unlinked while open
            raise StaleFile(handle.node)
        return staged.data

    def write_staged(self, handle: OpenStaged, off: int, buf: bytes) -> int:
        if off + len(buf) > self.page_size:
            raise PastPage(handle.node)
        data = self.staged_data(handle)
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        return len(buf)

    # -- page files: read, write, flush, release ------------------------------------------

    async def read(self, handle: OpenPage, off: int, size: int) -> bytes:
        data = self.read_now(handle, off, size)
        if data is not None:
            return data
        # read_now declines only when the load must wait (a remote backend, a tier,
        # an exclusive get): the same read, with that wait.
        return self._loaded(handle, await self.engine.load(handle.key))[off : off + size]

    def _loaded(self, handle: OpenPage, page: bytes | None) -> bytes:
        """What a read from the start got, kept for the later offsets of the same copy."""
        if page is None:
            if not (handle.created or handle.key in self._closed_creations):
                raise NoSuchNode(handle.key)
            # A new page, empty: zeros for its creator, and for everyone once the
            # creator has closed it (its store lands at release).
            page = bytes(self.page_size)
        handle.loaded = page
        return page

    # The fast path (fs.py's read_now and write_now): the same reads and whole-page
    # writes, answered without waiting when the engine can (every page held in this
    # process, room for the page however it compresses); None sends the request the
    # usual way. Nothing on it makes a name go (no exclusive get, no eviction).

    def read_now(self, handle: OpenPage, off: int, size: int) -> bytes | None:
        if off >= self.page_size:
            return b""
        if handle.dirty and handle.buffer is not None:
            # A writer reads back what it wrote, as it would from the page cache.
            return bytes(handle.buffer[off : off + size])
        if off == 0 or handle.loaded is None:
            # A read from the start is a fresh get; later offsets continue the same copy.
            if not self.engine.loads_now(handle.key.pool):
                return None
            return self._loaded(handle, self.engine.load_now(handle.key))[off : off + size]
        return handle.loaded[off : off + size]

    def write_now(self, handle: OpenPage, off: int, buf: memoryview) -> int | None:
        """A whole page stored at once (as `write` does), when it fits without eviction."""
        key = handle.key
        if off != 0 or len(buf) != self.page_size:
            return None
        if not self.engine.store_run_now(key.pool, key.object, key.index, buf, room_for_worst=True):
            return None
        handle.dirty = False
        handle.buffer = None
        self._stop_creating(handle)
        return len(buf)

    def flush_now(self, handle: OpenPage) -> bool:
        """`flush` without waiting: True if done, False if it must take `flush` (a store
        that does not fit as it is, or a created page's room check, which may make its
        name go)."""
        if handle.dirty:
            return self._store_pending_now(handle)
        return not (handle.created and handle.key in self._creators)

    def release_now(self, handle: OpenPage) -> bool:
        """`release` without waiting: True if done, False if it must take `release`."""
        if (handle.dirty or handle.created) and not self._store_pending_now(handle):
            return False
        self._stop_creating(handle)
        return True

    def _store_pending_now(self, handle: OpenPage) -> bool:
        """`_store_pending` when the page fits however it compresses; False if not."""
        key = handle.key
        page = handle.buffer if handle.buffer is not None else bytes(self.page_size)
        if not self.engine.store_run_now(
            key.pool, key.object, key.index, page, room_for_worst=True
        ):
            return False
        handle.dirty = False
        self._stop_creating(handle)
        return True

    async def write(self, handle: OpenPage, off: int, buf: bytes) -> int:
        if off + len(buf) > self.page_size:
            raise PastPage(handle.key)
        if off == 0 and len(buf) == self.page_size:
            # A whole page is a store at once; nothing is left to assemble.
            handle.dirty = False
            handle.buffer = None
            try:
                await self.store(handle.key, bytes(buf))
            finally:
                # Only now: until the store lands, the created page must still exist.
                self._stop_creating(handle)
            return len(buf)
        buffer = await self._write_buffer(handle)
        buffer[off : off + len(buf)] = buf
        handle.dirty = True
        return len(buf)

    async def _write_buffer(self, handle: OpenPage) -> bytearray:
        """The page being assembled: its stored content (read-modify-write) or zeros."""
        if handle.buffer is None:
            page = await self.engine.load(handle.key)
            handle.buffer = bytearray(page if page is not None else bytes(self.page_size))
        return handle.buffer

    async def store(self, key: PageKey, page: bytes) -> None:
        try:
            await self.engine.store(key, page)
        except StoreRejected:
            log.debug("store of %s refused", key)
            raise

    async def _store_pending(self, handle: OpenPage) -> None:
        if not (handle.dirty or handle.created):
            return
        page = bytes(handle.buffer) if handle.buffer is not None else bytes(self.page_size)
        handle.dirty = False
        try:
            await self.store(handle.key, page)
        finally:
            self._stop_creating(handle)

    def forget_creating(self, key: PageKey) -> bool:
        """Unlink of a page still being created: its open files will not store it."""
        creators = self._creators.pop(key, None)
        if creators is None:
            return False
        self._closed_creations.discard(key)
        for handle in creators:
            handle.created = False
        return True

    def _stop_creating(self, handle: OpenPage) -> None:
        if handle.created:
            handle.created = False
            creators = self._creators.get(handle.key)
            if creators is not None:
                creators.remove(handle)
                if not creators:
                    del self._creators[handle.key]
                    self._closed_creations.discard(handle.key)

    async def flush(self, handle: OpenPage) -> None:
        """close(2) of a page file: what was assembled is stored now."""
        if handle.dirty:
            await self._store_pending(handle)
        elif handle.created and handle.key in self._creators:
            # A created page with nothing written yet is stored at release, not here:
            # shell redirections and dd close a dup of the file before they write, and
            # that close must not store a zero page first. Meanwhile the page exists and
            # reads as zeros. Whether it will fit is answered now, so that close() is
            # where a full budget says ENOSPC, as for any other store.
            if not self.engine.room_for_page(handle.key.pool):
                self.forget_creating(handle.key)
                self._abandoned(handle.key)
                raise StoreRejected(str(handle.key))
            self._closed_creations.add(handle.key)

    async def release(self, handle: OpenPage) -> None:
        """The last close of a page file: a created page is stored (zeros) now."""
        try:
            await self._store_pending(handle)
        finally:
            self._stop_creating(handle)

    async def fallocate(self, handle: OpenPage, mode: int, off: int, end: int) -> None:
        """A page file is one page: a range past it is EFBIG, as a write past it is."""
        psize = self.page_size
        if end > psize:
            raise PastPage(handle.key)
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            return
        # What this open file has assembled is stored first; the range applies to it.
        await self._store_pending(handle)
        handle.buffer = handle.loaded = None
        key = handle.key
        if mode & FALLOC_FL_PUNCH_HOLE and off == 0 and end == psize:
            await self.engine.invalidate_page(key)
            return
        (page,) = await self.engine.load_many(key.pool, key.object, [key.index], exclusive=False)
        if page is None and mode & FALLOC_FL_PUNCH_HOLE:
            return
        page = page or bytes(psize)
        await self.store(key, page[:off] + bytes(end - off) + page[end:])

    async def truncate(self, key: PageKey, size: int, handle: OpenPage | None) -> None:
        """truncate(2) of a page: past the page is EFBIG; shorter zeroes the tail."""
        if size > self.page_size:
            raise PastPage(key)
        if size == self.page_size:
            return
        if handle is not None and handle.writable:
            buffer = await self._write_buffer(handle)
            buffer[size:] = bytes(self.page_size - size)
            handle.dirty = True
            return
        page = await self.engine.load(key)
        if page is None:
            raise NoSuchNode(key)
        await self.engine.store(key, page[:size].ljust(self.page_size, b"\0"))

    def truncate_staged(self, node: Node, size: int) -> None:
        if size > self.page_size:
            raise PastPage(node)
        data = self.staged[node].data
        del data[size:]
        data.extend(bytes(size - len(data)))

    async def store_staged(self, node: Node, key: PageKey) -> None:
        """A staged copy renamed onto its page: stored as that page, zero-padded."""
        staged = self.staged.pop(node)
        page = bytes(staged.data).ljust(self.page_size, b"\0")
        self.forget_creating(key)
        await self.store(key, page)

    def drop_staged(self, pool: PoolId, obj: str | None) -> None:
        """The staged copies in a pool (or one of its objects) that went."""
        for node in [n for n in self.staged if n.pool == pool and (obj is None or n.object == obj)]:
            del self.staged[node]
