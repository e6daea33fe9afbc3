"""The pyfuse3 adapter: a protocol translator only.

Inodes, names and file handles come in; the tree model (`tmemfs.tree`), the page
files (`tmemfs.pagefiles`) and the image view (`tmemfs.image`) answer; their answers
become replies and their exceptions become errnos in one place (`errno_for`). No
tmem rule and no tree rule is decided here: the engine decides what is stored,
loaded, evicted or refused, the tree what exists and who may change it. Every
handler is wrapped so that no exception other than FUSEError reaches pyfuse3, which
would otherwise end the mount. The kernel's name cache is this module's too: what
the engine made go is dropped from it (`Tree.gone` says which names), before the
reply where that is safe.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from tmemfs.engine import (
    BadName,
    BadValue,
    Engine,
    NoSuchObject,
    NoSuchPool,
    Owner,
    PageLost,
    PoolExists,
    StoreRejected,
    TmemError,
)
from tmemfs.image import ImageView, UnsupportedMode, check_fallocate
from tmemfs.nodes import (
    AccessDenied,
    IsDirectory,
    Node,
    NodeExists,
    NoSuchNode,
    NotDirectory,
    NotPermitted,
    PastPage,
    StaleFile,
    TooManyStaged,
)
from tmemfs.pagefiles import OpenPage, OpenStaged, flushes_at_close
from tmemfs.tree import Attributes, OpenFile, OpenImage, OpenText, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_ERRNO: dict[type[Exception], int] = {
    BadName: errno.EINVAL,
    BadValue: errno.EINVAL,
    NoSuchPool: errno.ENOENT,
    NoSuchObject: errno.ENOENT,
    PoolExists: errno.EEXIST,
    StoreRejected: errno.ENOSPC,
    PageLost: errno.EIO,
    UnsupportedMode: errno.EOPNOTSUPP,
    NoSuchNode: errno.ENOENT,
    NodeExists: errno.EEXIST,
    NotPermitted: errno.EPERM,
    AccessDenied: errno.EACCES,
    IsDirectory: errno.EISDIR,
    NotDirectory: errno.ENOTDIR,
    PastPage: errno.EFBIG,
    StaleFile: errno.ESTALE,
    TooManyStaged: errno.ENOSPC,
    TmemError: errno.EIO,  # any other engine failure: expected, so not logged as a bug
}


def discard_supported() -> bool:
    """Whether pyfuse3 passes fallocate on: 3.5.0 does only with our patch (patches/).

    Without it the kernel is answered ENOSYS, the loop device turns discard off, and a
    swap image keeps every slot swap has ever used.
    """
    return hasattr(pyfuse3.Operations, "fallocate")


def fast_path_supported() -> bool:
    """Whether pyfuse3 calls read_now and write_now first (patches/, the fast path)."""
    return hasattr(pyfuse3.Operations, "write_now")


def errno_for(exc: BaseException) -> int:
    """The one mapping from failures to errnos."""
    if isinstance(exc, FUSEError):
        return exc.errno
    for cls in type(exc).__mro__:
        if cls in _ERRNO:
            return _ERRNO[cls]
    return errno.EIO


def _expected(exc: BaseException) -> bool:
    """Whether a failure carries a meaning (a tmem or tree rule), not a bug."""
    return any(cls in _ERRNO for cls in type(exc).__mro__)


def translate_errors(
    handler: Callable[P, Awaitable[R]],
) -> Callable[P, Awaitable[R]]:
    """Let only FUSEErrors out of a handler; anything unexpected is logged and is EIO."""

    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if log.isEnabledFor(logging.DEBUG):  # --debug: one line per request
            log.debug("%s(%s)", name, ", ".join(_describe(a) for a in args[1:]))
        try:
            return await handler(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            raise _reply_for(exc, name) from None

    return wrapper


def translate_errors_now(handler: Callable[P, R]) -> Callable[P, R]:
    """`translate_errors` for the synchronous fast path (`read_now`, `write_now`)."""

    name = handler.__name__

    @functools.wraps(handler)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s(%s)", name, ", ".join(_describe(a) for a in args[1:]))
        try:
            return handler(*args, **kwargs)
        except FUSEError:
            raise
        except Exception as exc:
            raise _reply_for(exc, name) from None

    return wrapper


def _reply_for(exc: Exception, handler_name: str) -> FUSEError:
    """The FUSEError a failure is answered with; a failure that is a bug is logged."""
    if not _expected(exc):
        log.exception("unexpected error in %s", handler_name)
    return FUSEError(errno_for(exc))


# Names a request made go, held back to be dropped from the kernel before it is answered.
_HELD_BACK: contextvars.ContextVar[list[tuple[int, bytes]] | None] = contextvars.ContextVar(
    "held_back", default=None
)
# How long a reply may wait for the kernel to drop names (it never should for long).
_INVALIDATE_TIMEOUT = 2.0


def invalidates_before_reply(
    handler: Callable[P, Awaitable[R]],
) -> Callable[P, Awaitable[R]]:
    """Names this request made go (eviction, an exclusive get, a refused store) leave
    the kernel's cache before the request is answered, so its caller's next step
    cannot find them. Only for read, write, flush and release: their callers hold no
    directory lock, which dropping a name takes; elsewhere it would deadlock, so
    there names are dropped asynchronously, a moment after the reply.
    """

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _HELD_BACK.set([])
        try:
            return await handler(*args, **kwargs)
        finally:
            held = _HELD_BACK.get()
            _HELD_BACK.reset(token)
            if held:
                ops = args[0]
                assert isinstance(ops, TmemOperations)
                await ops._drop_names_now(held)

    return wrapper


def _describe(arg: object) -> str:
    """A request argument, short: who asked, and sizes rather than page contents."""
    if isinstance(arg, pyfuse3.RequestContext):
        return f"uid={arg.uid} pid={arg.pid}"
    if isinstance(arg, bytes | bytearray | memoryview) and len(arg) > 64:
        return f"<{len(arg)} bytes>"
    return repr(arg)


def fail(code: int) -> FUSEError:
    return FUSEError(code)


@dataclass(slots=True)
class Listing:
    """An open directory: its entries, taken when a listing starts at offset 0."""

    node: Node
    entries: list[tuple[bytes, Node]] = field(default_factory=list)


def entry_attributes(attrs: Attributes) -> pyfuse3.EntryAttributes:
    """The tree's attributes as pyfuse3 replies them."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = attrs.inode
    attr.generation = 0
    attr.st_mode = attrs.mode
    attr.st_nlink = attrs.nlink
    attr.st_uid = attrs.uid
    attr.st_gid = attrs.gid
    attr.st_size = attrs.size
    attr.st_blocks = attrs.blocks
    attr.st_blksize = attrs.block_size
    attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = attrs.mtime_ns
    attr.entry_timeout = attrs.entry_timeout
    attr.attr_timeout = attrs.attr_timeout
    return attr


def _new_owner(ctx: pyfuse3.RequestContext, mode: int) -> Owner:
    """Who makes a node, and its mode as asked, under the caller's umask."""
    return Owner(ctx.uid, ctx.gid, mode & ~ctx.umask & 0o7777)


def noflush_supported() -> bool:
    """Whether pyfuse3 passes FOPEN_NOFLUSH on (patches/, the fast path)."""
    return hasattr(pyfuse3.FileInfo, "noflush")


def _file_info(fh: int, handle: OpenFile) -> pyfuse3.FileInfo:
    # Every file is direct I/O: reads and writes always reach the daemon.
    info = pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
    if _NOFLUSH and not flushes_at_close(handle):
        # FOPEN_NOFLUSH: the kernel sends no FLUSH at close, where there is nothing to do.
        info.noflush = True
    return info


_NOFLUSH = noflush_supported()


class TmemOperations(pyfuse3.Operations):
    """The tmemfs tree of tmemfs(5) over an Engine, served to the kernel."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        engine: Engine,
        daemon_info: dict[str, str] | None = None,
        on_first_image: Callable[[], object] | None = None,
        invalidate_entry: Callable[[int, bytes], None] | None = None,
        invalidate_entry_now: Callable[[int, bytes], None] | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        # Tells the kernel to drop a cached name (pyfuse3.invalidate_entry_async when
        # mounted; None when the adapter is driven directly, as in tests).
        self._invalidate_entry = invalidate_entry
        # The same, blocking until the kernel has dropped it (from a worker thread).
        self._invalidate_entry_now = invalidate_entry_now
        self.tree = Tree(
            engine,
            daemon_info,
            on_first_image,
            forget_names=self._forget_names if invalidate_entry is not None else None,
            daemon_counters=self._fast_path_counters,
        )
        self.image = ImageView(engine)
        self.pages = self.tree.files
        self.inodes = self.tree.inodes
        self._handles: dict[int, OpenFile | Listing] = {}
        self._next_fh = 1
        # Reads and writes (of images and page files) answered on pyfuse3's fast path
        # (read_now, write_now): `.daemon` shows it, as fastpath_requests. Flushes and
        # releases answered there are not counted: every close would move it.
        self.answered_now = 0
        # Lookups, getattrs, opens and creates answered there (lookup_now, ...), each
        # counted apart: reading `.daemon` itself sends some of them (a LOOKUP only when
        # the kernel's entry has expired), which must not blur the count of reads and
        # writes.
        self.answered_lookups = 0
        self.answered_getattrs = 0
        self.answered_opens = 0
        self.answered_creates = 0

    def _fast_path_counters(self) -> dict[str, int]:
        return {
            "fastpath_requests": self.answered_now,
            "fastpath_lookups": self.answered_lookups,
            "fastpath_getattrs": self.answered_getattrs,
            "fastpath_opens": self.answered_opens,
            "fastpath_creates": self.answered_creates,
        }

    # -- the kernel's name cache ---------------------------------------------------------

    def _forget_names(self, names: list[tuple[int, bytes]]) -> None:
        """Names the engine made go leave the kernel: held back until the reply where
        that is safe (`invalidates_before_reply`), else dropped asynchronously."""
        held = _HELD_BACK.get() if self._invalidate_entry_now is not None else None
        if held is not None:
            held.extend(names)
            return
        invalidate = self._invalidate_entry
        assert invalidate is not None
        for parent_inode, name in names:
            invalidate(parent_inode, name)

    async def _drop_names_now(self, names: list[tuple[int, bytes]]) -> None:
        """Drop names from the kernel's cache and wait for it (see invalidates_before_reply)."""
        invalidate = self._invalidate_entry_now
        assert invalidate is not None

        def drop_all() -> None:
            for parent_inode, name in names:
                invalidate(parent_inode, name)

        with trio.move_on_after(_INVALIDATE_TIMEOUT) as scope:
            await trio.to_thread.run_sync(drop_all, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.warning(
                "the kernel took over %s s to drop %d names", _INVALIDATE_TIMEOUT, len(names)
            )

    def _attrs(self, node: Node, inode: int | None = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.tree.attributes(node, inode))

    def _entry_reply(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference to the inode."""
        attr = self._attrs(node)
        self.inodes.remember(attr.st_ino)
        return attr

    def _new_handle(self, handle: OpenFile | Listing) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    # -- lookup, getattr, setattr --------------------------------------------------------

    # Each of lookup, getattr, open and create has a fast path (`lookup_now`, ...;
    # patches/pyfuse3-3.5.0-fastpath.patch) that pyfuse3 calls first, with no
    # coroutine: the tree answers it when nothing must be waited for (`Tree.lookup_now`
    # and the others), and None sends the request to the async handler. Both ends
    # take the same tree code, so they give the same answers and the same errnos.

    @translate_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = await self.tree.lookup(self.tree.node(parent_inode), name)
        return self._entry_reply(node)

    @translate_errors_now
    def lookup_now(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes | None:
        node = self.tree.lookup_now(self.tree.node(parent_inode), name)
        if node is None:
            return None
        self.answered_lookups += 1
        return self._entry_reply(node)

    @translate_errors
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @translate_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._getattr(inode)

    @translate_errors_now
    def getattr_now(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # Attributes never wait: every getattr is answered here.
        attr = self._getattr(inode)
        self.answered_getattrs += 1
        return attr

    def _getattr(self, inode: int) -> pyfuse3.EntryAttributes:
        try:
            node = self.tree.node(inode)
        except NoSuchNode:
            # The kernel still holds this inode but its node went (another process
            # unlinked the page, or it was evicted). ESTALE, not ENOENT: the kernel then
            # walks the path again with a fresh lookup (the LOOKUP_REVAL retry of open
            # and stat), so open(O_CREAT) of a page unlinked meanwhile creates it instead
            # of failing with ENOENT (test_load failed 2 runs in 14 under load, now 0 in
            # 16), and stat(2) of the name says ENOENT.
            raise FUSEError(errno.ESTALE) from None
        return self._attrs(node, inode)

    @translate_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.tree.node(inode)
        handle = self._handles.get(fh) if fh is not None else None
        await self.tree.set_attributes(
            node,
            ctx.uid,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            open_file=handle if not isinstance(handle, Listing) else None,
        )
        return self._attrs(node, inode)

    # -- directories -------------------------------------------------------------------

    @translate_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.tree.node(parent_inode)
        return self._entry_reply(await self.tree.mkdir(parent, name, _new_owner(ctx, mode)))

    @translate_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.tree.rmdir(self.tree.node(parent_inode), name)

    @translate_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self._new_handle(Listing(self.tree.node(inode)))

    @translate_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._handles[fh]
        assert isinstance(listing, Listing)
        if start_id == 0:
            await self.tree.refresh_shared(listing.node)
            listing.entries = self.tree.children(listing.node)
        for position in range(start_id, len(listing.entries)):
            name, node = listing.entries[position]
            if not self.tree.exists(node):
                continue
            attr = self._attrs(node)
            if not pyfuse3.readdir_reply(token, name, attr, position + 1):
                break
            # readdirplus hands the kernel an inode reference for each entry.
            self.inodes.remember(attr.st_ino)

    @translate_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- files -------------------------------------------------------------------------

    @translate_errors
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, handle = await self.tree.create(
            self.tree.node(parent_inode),
            name,
            _new_owner(ctx, mode),
            exclusive=bool(flags & os.O_EXCL),
            truncate=bool(flags & os.O_TRUNC),
        )
        return self._created(node, handle)

    @translate_errors_now
    def create_now(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes] | None:
        made = self.tree.create_now(
            self.tree.node(parent_inode),
            name,
            _new_owner(ctx, mode),
            exclusive=bool(flags & os.O_EXCL),
            truncate=bool(flags & os.O_TRUNC),
        )
        if made is None:
            return None
        self.answered_creates += 1
        return self._created(*made)

    def _created(
        self, node: Node, handle: OpenFile
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh = self._new_handle(handle)
        return _file_info(fh, handle), self._entry_reply(node)

    @translate_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        handle = await self.tree.open(
            inode,
            writable=(flags & os.O_ACCMODE) != os.O_RDONLY,
            truncate=bool(flags & os.O_TRUNC),
            caller_uid=ctx.uid,
        )
        return _file_info(self._new_handle(handle), handle)

    @translate_errors_now
    def open_now(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo | None:
        handle = self.tree.open_now(
            inode,
            writable=(flags & os.O_ACCMODE) != os.O_RDONLY,
            truncate=bool(flags & os.O_TRUNC),
            caller_uid=ctx.uid,
        )
        if handle is None:
            return None
        self.answered_opens += 1
        return _file_info(self._new_handle(handle), handle)

    # The fast path (patches/pyfuse3-3.5.0-fastpath.patch): pyfuse3 calls these first,
    # with no coroutine, and takes read, write, flush and release below when they
    # answer None. Only the requests of an image or a page file that the engine answers
    # without waiting are answered here; no name can go on that path (no eviction, no
    # exclusive get, no refused store), so nothing is held back.

    @translate_errors_now
    def read_now(self, fh: int, off: int, size: int) -> bytes | memoryview | None:
        handle = self._handles.get(fh)
        if isinstance(handle, OpenImage):
            data = self.image.read_now(handle.pool, off, size)
        elif isinstance(handle, OpenPage):
            data = self.pages.read_now(handle, off, size)
        else:
            return None
        if data is not None:
            self.answered_now += 1
        return data

    @translate_errors_now
    def write_now(self, fh: int, off: int, buf: memoryview) -> int | None:
        handle = self._handles.get(fh)
        if isinstance(handle, OpenImage):
            written = self.image.write_now(handle.pool, off, buf)
        elif isinstance(handle, OpenPage):
            written = self.pages.write_now(handle, off, buf)
        else:
            return None
        if written is not None:
            self.answered_now += 1
        return written

    @translate_errors_now
    def flush_now(self, fh: int) -> bool | None:
        handle = self._handles.get(fh)
        if isinstance(handle, OpenPage) and not self.pages.flush_now(handle):
            return None
        return True

    @translate_errors_now
    def release_now(self, fh: int) -> bool | None:
        handle = self._handles.get(fh)
        if isinstance(handle, OpenPage) and not self.pages.release_now(handle):
            return None
        self._drop_handle(fh)
        return True

    @translate_errors
    @invalidates_before_reply
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._handles[fh]
        if isinstance(handle, OpenImage):
            return await self.image.read(handle.pool, off, size)
        if isinstance(handle, OpenText):
            return handle.text[off : off + size]
        if isinstance(handle, OpenStaged):
            return bytes(self.pages.staged_data(handle)[off : off + size])
        assert isinstance(handle, OpenPage)
        return await self.pages.read(handle, off, size)

    @translate_errors
    @invalidates_before_reply
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if isinstance(handle, OpenImage):
            return await self.image.write(handle.pool, off, buf)
        if isinstance(handle, OpenText) and handle.control is not None:
            return self.tree.write_control(handle.control, buf)
        if isinstance(handle, OpenStaged):
            return self.pages.write_staged(handle, off, buf)
        if not isinstance(handle, OpenPage):
            raise fail(errno.EBADF)
        return await self.pages.write(handle, off, buf)

    @translate_errors
    @invalidates_before_reply
    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if isinstance(handle, OpenPage):
            await self.pages.flush(handle)

    @translate_errors
    @invalidates_before_reply
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.flush(fh)

    @translate_errors
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2), SPEC section 4: a punched hole is a discard, frontswap's invalidate.

        PUNCH_HOLE|KEEP_SIZE invalidates whole pages and zeroes the edges; ZERO_RANGE
        stores zeros; mode 0 (or KEEP_SIZE alone) allocates, which stores nothing but may
        grow an image; any other mode is EOPNOTSUPP.
        """
        handle = self._handles.get(fh)
        check_fallocate(mode, offset, length)
        if isinstance(handle, OpenImage):
            await self.image.fallocate(handle.pool, mode, offset, offset + length)
        elif isinstance(handle, OpenPage):
            await self.pages.fallocate(handle, mode, offset, offset + length)
        else:
            raise fail(errno.EBADF)

    @translate_errors
    @invalidates_before_reply
    async def release(self, fh: int) -> None:
        handle = self._drop_handle(fh)
        if isinstance(handle, OpenPage):
            try:
                await self.pages.release(handle)
            except TmemError as exc:
                # flush() already reported this to close(); release has no caller to tell.
                log.warning("store at release of %s failed: %s", handle.key, type(exc).__name__)

    def _drop_handle(self, fh: int) -> OpenFile | Listing | None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, OpenImage) and not any(
            isinstance(h, OpenImage) for h in self._handles.values()
        ):
            # The last image closed: its reply buffer goes back too (memory after a flush).
            self.image.drop_reply_buffer()
        return handle

    @translate_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.tree.unlink(self.tree.node(parent_inode), name)

    @translate_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """EPERM, but for rsync's `.N.XXXXXX` renamed onto N: that stores page N."""
        old_parent = self.tree.node(parent_inode_old)
        same_directory = parent_inode_new == parent_inode_old
        await self.tree.rename(old_parent, name_old, same_directory, name_new, flags)

    # -- what the tree does not allow ----------------------------------------------------

    @translate_errors
    async def link(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise fail(errno.EPERM)

    @translate_errors
    async def symlink(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise fail(errno.EPERM)

    @translate_errors
    async def mknod(self, *args: Any) -> pyfuse3.EntryAttributes:
        raise fail(errno.EPERM)

    @translate_errors
    async def setxattr(self, *args: Any) -> None:
        raise fail(errno.ENOTSUP)

    @translate_errors
    async def getxattr(self, *args: Any) -> bytes:
        # ENOSYS, once: the kernel then answers every getxattr itself (EOPNOTSUPP, as
        # setxattr says), and stops asking for security.capability before each write.
        raise fail(errno.ENOSYS)

    @translate_errors
    async def listxattr(self, *args: Any) -> list[bytes]:
        return []

    @translate_errors
    async def removexattr(self, *args: Any) -> None:
        raise fail(errno.ENODATA)

    @translate_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """df shows the budget: size is --max-pool, used is pool_total_size."""
        usage = self.tree.usage()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = usage.block_size
        data.f_blocks = usage.blocks
        data.f_bfree = data.f_bavail = usage.free_blocks
        data.f_files = usage.files
        data.f_ffree = data.f_favail = usage.free_blocks
        data.f_namemax = usage.name_max
        return data
