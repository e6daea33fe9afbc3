"""The pyfuse3 adapter: a protocol translator only.

Paths and inodes become tmem keys, engine results become replies, engine
exceptions become errnos in one place (`errno_for`). No tmem rule is decided here:
the engine decides what is stored, loaded, evicted or refused. Every handler is
wrapped so that no exception other than FUSEError reaches pyfuse3, which would
otherwise end the mount.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import os
import re
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from tmemfs.engine import (
    SWAP_OBJECT,
    BadName,
    BadValue,
    Engine,
    NoSuchObject,
    NoSuchPool,
    Owner,
    PageKey,
    PageLost,
    PoolExists,
    PoolId,
    PoolKind,
    StoreRejected,
    TmemError,
    parse_decimal,
    parse_name,
)
from tmemfs.engine import stats as statsfmt
from tmemfs.engine.pool import Pool, TmemObject
from tmemfs.image import (
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    ImageView,
    UnsupportedMode,
    check_fallocate,
)
from tmemfs.nodes import CLEANCACHE, DAEMON, FRONTSWAP, STATS, InodeTable, Kind, Node
from tmemfs.sizes import format_limit, parse_limit

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
    TmemError: errno.EIO,  # any other engine failure: expected, so not logged as a bug
}
_STATS_NAME = b".stats"
# A pool's writable control files: its own limit and its weight (fair shares).
_CONTROLS = {b".max": Kind.POOL_MAX, b".weight": Kind.POOL_WEIGHT}
_CONTROL_KINDS = frozenset(_CONTROLS.values())
# Files whose text is rendered when they are opened: stats and control files.
_TEXT_KINDS = frozenset({Kind.STATS, Kind.POOL_STATS, Kind.DAEMON, *_CONTROL_KINDS})
_IMAGE_SUFFIX = b".img"
# rsync writes page N as `.N.XXXXXX` and renames it onto N when it is complete.
_STAGED_NAME = re.compile(rb"\.([0-9]+)\.[A-Za-z0-9]{6}")
# How many such files may be coming in at once, per mount.
_MAX_STAGED = 1024
_TOP = {
    b"stats": STATS,
    b"frontswap": FRONTSWAP,
    b"cleancache": CLEANCACHE,
    b".daemon": DAEMON,
}
# How long the kernel may cache names and attributes. Whatever goes away behind the
# kernel's back (eviction, exclusive gets, a refused store, a flush, a truncated
# image) is invalidated in the kernel as it goes (`_forget_names`), so names may be
# cached: a cached page name saves a LOOKUP on every open. That invalidation is
# asynchronous, so a name whose going must be seen at once is never cached: an image
# (`rmdir frontswap/0; truncate -s 1M frontswap/0.img` must make a new one, and
# open(O_CREAT) on a cached name sends OPEN, not CREATE), and whatever lives in a
# shared pool, where other mounts remove things without this kernel's knowledge.
# A page's attributes may be cached: reads and writes always reach the daemon (direct
# I/O), and without the cache every open costs 3 more GETATTR requests.
_DIR_TIMEOUT = 1.0
_PAGE_ENTRY_TIMEOUT = 10.0
_PAGE_ATTR_TIMEOUT = 1.0
_UNCACHED = 0.0


def discard_supported() -> bool:
    """Whether pyfuse3 passes fallocate on: 3.5.0 does only with our patch (patches/).

    Without it the kernel is answered ENOSYS, the loop device turns discard off, and a
    swap image keeps every slot swap has ever used.
    """
    return hasattr(pyfuse3.Operations, "fallocate")


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
            if not _expected(exc):
                log.exception("unexpected error in %s", handler.__name__)
            raise FUSEError(errno_for(exc)) from None

    return wrapper


# Names a request made go, held back to be dropped from the kernel before it is answered.
_HELD_BACK: contextvars.ContextVar[list[tuple[int, bytes]] | None] = contextvars.ContextVar(
    "held_back", default=None)
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
class OpenPage:
    """A page file opened for I/O; partial writes are assembled here until flush."""

    key: PageKey
    writable: bool
    buffer: bytearray | None = None
    dirty: bool = False
    created: bool = False
    loaded: bytes | None = None


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
    node: Node


@dataclass(slots=True)
class OpenImage:
    """frontswap/N.img opened: byte range [k*P, (k+1)*P) is page k of pool N."""

    pool: PoolId


@dataclass(slots=True)
class OpenStats:
    """A stats or control file: its text is taken once at open, so a reader sees one
    snapshot. `control` is the control file (.max, .weight) it was opened to write."""

    text: bytes
    control: Node | None = None


@dataclass(slots=True)
class Listing:
    """An open directory: its entries, taken when a listing starts at offset 0."""

    node: Node
    entries: list[tuple[bytes, Node]] = field(default_factory=list)


class TmemOperations(pyfuse3.Operations):
    """The tmemfs tree of tmemfs(5) over an Engine."""

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
        engine.on_gone = self._forget_names
        # The page an unlink is removing: the kernel drops that name itself.
        self._unlinking: Node | None = None
        # Files coming in under rsync's temporary names, until renamed onto a page.
        self._staged: dict[Node, Staged] = {}
        # Called once, when the first image is made (the daemon locks its memory then).
        self._on_first_image = on_first_image
        # What `.daemon` shows: pid, version, options; `tmemfs umount` reads the pid.
        self.daemon_info = daemon_info or {}
        self.page_size = engine.page_size
        self.image = ImageView(engine)
        self.inodes = InodeTable()
        self._handles: dict[int, OpenPage | OpenImage | OpenStats | OpenStaged | Listing] = {}
        self._next_fh = 1
        # Pages created by an open file that has not stored them yet: they exist for
        # stat and lookup, as a freshly created file does.
        self._creating: Counter[PageKey] = Counter()
        # Of those, the ones whose creator has closed them with nothing written: from
        # then on everyone reads them as a zero page; before, only the creator does.
        self._closed_creations: set[PageKey] = set()
        self._started_ns = time.time_ns()

    # -- the tree ----------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.inodes.node(inode)
        if node is None or not self._exists(node):
            raise fail(errno.ENOENT)
        return node

    def _exists(self, node: Node) -> bool:
        kind = node.kind
        if kind in (Kind.ROOT, Kind.STATS, Kind.DAEMON, Kind.FRONTSWAP, Kind.CLEANCACHE):
            return True
        assert node.pool is not None
        pool = self.engine.pools.get(node.pool)
        if pool is None:
            return False
        if kind in (Kind.POOL, Kind.POOL_STATS, Kind.IMAGE) or kind in _CONTROL_KINDS:
            return pool.generation == node.generation and (
                kind is not Kind.IMAGE or pool.image_size is not None
            )
        tobj = pool.objects.get(node.object) if node.object is not None else None
        if tobj is None or tobj.generation != node.generation:
            return False
        if kind is Kind.OBJECT:
            return True
        if kind is Kind.STAGED:
            return node in self._staged
        key = node.page_key
        return self.engine.entry(key) is not None or key in self._creating

    def _forget_names(
        self, pool: Pool, tobj: TmemObject | None, indexes: Sequence[int] | None
    ) -> None:
        """The engine dropped pages, an object or a pool: the kernel forgets their names.

        Only names the kernel holds are sent (a lookup count here), so a flush of pages
        nobody looked at costs nothing but dictionary lookups.
        """
        pid = pool.id
        if indexes is None and self._staged:
            for node in [n for n in self._staged if n.pool == pid
                         and (tobj is None or n.object == tobj.name)]:
                del self._staged[node]
        if self._invalidate_entry is None:
            return
        pool_node = Node(Kind.POOL, pid, generation=pool.generation)
        gone: list[tuple[Node, bytes, Node]] = []  # (directory, name, what it named)
        if tobj is None:
            top = FRONTSWAP if pool.persistent else CLEANCACHE
            gone.append((top, pid.name.encode(), pool_node))
            if pool.persistent:
                gone.append((top, pid.name.encode() + _IMAGE_SUFFIX,
                             Node(Kind.IMAGE, pid, generation=pool.generation)))
        elif indexes is None:
            if pool.persistent:
                return  # a frontswap pool's one object goes only with the pool
            gone.append((pool_node, tobj.name.encode(),
                         Node(Kind.OBJECT, pid, tobj.name, None, tobj.generation)))
        else:
            directory = pool_node if pool.persistent else Node(
                Kind.OBJECT, pid, tobj.name, None, tobj.generation)
            if self.inodes.known(directory) is None:
                return
            gone += [(directory, str(index).encode(),
                      Node(Kind.PAGE, pid, tobj.name, index, tobj.generation))
                     for index in indexes]
        held = _HELD_BACK.get() if self._invalidate_entry_now is not None else None
        for directory, name, node in gone:
            if node == self._unlinking or self.inodes.known(node) is None:
                continue
            parent_inode = self.inodes.known(directory)
            if parent_inode is None:
                continue
            if held is not None:
                held.append((parent_inode, name))
            else:
                self._invalidate_entry(parent_inode, name)

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
            log.warning("the kernel took over %s s to drop %d names", _INVALIDATE_TIMEOUT,
                        len(names))

    def _page_gone(self, key: PageKey) -> None:
        """A page that was only being created will not be: the kernel forgets its name."""
        pool = self.engine.pools.get(key.pool)
        tobj = pool.objects.get(key.object) if pool is not None else None
        if pool is not None and tobj is not None and key.index not in tobj.pages:
            self._forget_names(pool, tobj, (key.index,))

    def _child(self, parent: Node, name: bytes) -> Node:
        """The node `name` in `parent` would be, whether or not it exists.

        Raises BadName when the name cannot be in that directory at all.
        """
        kind = parent.kind
        if kind is Kind.ROOT:
            if name in _TOP:
                return _TOP[name]
        elif kind is Kind.FRONTSWAP:
            if name.endswith(_IMAGE_SUFFIX):
                number = parse_decimal(name[: -len(_IMAGE_SUFFIX)])
                return self._pool_node(Kind.IMAGE, PoolId(PoolKind.PERSISTENT, str(number)))
            pool_id = PoolId(PoolKind.PERSISTENT, str(parse_decimal(name)))
            return self._pool_node(Kind.POOL, pool_id)
        elif kind is Kind.CLEANCACHE:
            return self._pool_node(Kind.POOL, PoolId(PoolKind.EPHEMERAL, parse_name(name)))
        elif kind is Kind.POOL:
            assert parent.pool is not None
            if name == _STATS_NAME:
                return Node(Kind.POOL_STATS, parent.pool, generation=parent.generation)
            if name in _CONTROLS:
                return Node(_CONTROLS[name], parent.pool, generation=parent.generation)
            if parent.pool.kind is PoolKind.PERSISTENT:
                staged = _STAGED_NAME.fullmatch(name)
                index = parse_decimal(staged.group(1) if staged else name)
                page = self._object_node(parent.pool, SWAP_OBJECT, index)
                return page._replace(kind=Kind.STAGED, name=name.decode()) if staged else page
            return self._object_node(parent.pool, parse_name(name))
        elif kind is Kind.OBJECT:
            staged = _STAGED_NAME.fullmatch(name)
            page = Node(Kind.PAGE, parent.pool, parent.object,
                        parse_decimal(staged.group(1) if staged else name), parent.generation)
            return page._replace(kind=Kind.STAGED, name=name.decode()) if staged else page
        raise BadName(name)

    def _pool_node(self, kind: Kind, pool_id: PoolId) -> Node:
        pool = self.engine.pools.get(pool_id)
        return Node(kind, pool_id, generation=pool.generation if pool else 0)

    def _object_node(self, pool_id: PoolId, name: str, index: int | None = None) -> Node:
        """An object's node, or (with `index`) a page's node in that object."""
        pool = self.engine.pools.get(pool_id)
        tobj = pool.objects.get(name) if pool else None
        generation = tobj.generation if tobj else 0
        kind = Kind.OBJECT if index is None else Kind.PAGE
        return Node(kind, pool_id, name, index, generation)

    def _named(self, parent: Node, name: bytes) -> Node:
        """The node `name` in `parent` refers to; a name that cannot be there is ENOENT."""
        try:
            return self._child(parent, name)
        except BadName:
            raise fail(errno.ENOENT) from None

    def _children(self, node: Node) -> list[tuple[bytes, Node]]:
        engine = self.engine
        if node.kind is Kind.ROOT:
            return list(_TOP.items())
        if node.kind in (Kind.FRONTSWAP, Kind.CLEANCACHE):
            want = PoolKind.PERSISTENT if node.kind is Kind.FRONTSWAP else PoolKind.EPHEMERAL
            pools = sorted(
                (p for p in engine.pools if p.kind is want),
                key=lambda p: (len(p.name), p.name) if want is PoolKind.PERSISTENT else p.name,
            )
            entries = [(p.name.encode(), self._pool_node(Kind.POOL, p)) for p in pools]
            entries += [
                (p.name.encode() + _IMAGE_SUFFIX, self._pool_node(Kind.IMAGE, p))
                for p in pools
                if engine.pools[p].image_size is not None
            ]
            return entries
        assert node.pool is not None
        pool = engine.pool(node.pool)
        # The control files (.stats, .max, .weight) are not listed, even by `ls -a`:
        # archivers (tar, cp -a, rsync -a) must not copy one, whose text changes as
        # they read it and which cannot be made in the copy. Each is there for whoever
        # names it: `cat POOL/.stats`, `echo 64M > POOL/.max`.
        entries: list[tuple[bytes, Node]] = []
        if node.kind is Kind.POOL and not pool.persistent:
            entries += [
                (name.encode(), self._object_node(node.pool, name))
                for name in sorted(pool.objects)
            ]
            return entries
        obj = SWAP_OBJECT if node.kind is Kind.POOL else node.object
        assert obj is not None
        tobj = pool.objects[obj]
        indexes = set(tobj.pages)
        indexes.update(k.index for k in self._creating if k.pool == node.pool and k.object == obj)
        entries += [
            (str(i).encode(), Node(Kind.PAGE, node.pool, obj, i, tobj.generation))
            for i in sorted(indexes)
        ]
        return entries

    # -- attributes --------------------------------------------------------------------

    def _attrs(self, node: Node, inode: int | None = None) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode if inode is not None else self.inodes.inode(node)
        attr.generation = 0
        attr.st_blksize = self.page_size
        attr.st_nlink = 1
        mtime = self._started_ns
        kind = node.kind
        if kind is Kind.ROOT:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
            attr.entry_timeout = attr.attr_timeout = _DIR_TIMEOUT
        elif kind in (Kind.FRONTSWAP, Kind.CLEANCACHE):
            # Like /tmp: with --allow-other anyone may make a pool; the sticky bit keeps
            # users from removing each other's.
            attr.st_mode = stat.S_IFDIR | 0o1777
            attr.st_nlink = 2
            attr.entry_timeout = attr.attr_timeout = _DIR_TIMEOUT
        elif kind in (Kind.STATS, Kind.POOL_STATS, Kind.DAEMON):
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_size = len(self._stats_text(node))
            attr.entry_timeout = _DIR_TIMEOUT
            attr.attr_timeout = 0
            mtime = time.time_ns()
        elif kind in _CONTROL_KINDS:
            # Like a cgroup file: the pool's owner (and root) may write it, all may read.
            assert node.pool is not None
            owner = self.engine.pool(node.pool).owner
            attr.st_mode = stat.S_IFREG | 0o644
            attr.st_uid, attr.st_gid = owner.uid, owner.gid
            attr.st_size = len(self._stats_text(node))
            attr.entry_timeout = _DIR_TIMEOUT
            attr.attr_timeout = 0
            mtime = owner.ctime_ns
        elif kind in (Kind.POOL, Kind.OBJECT):
            owner = self._owner(node)
            attr.st_mode = stat.S_IFDIR | owner.mode
            attr.st_nlink = 2
            attr.st_uid, attr.st_gid = owner.uid, owner.gid
            mtime = owner.ctime_ns
            attr.entry_timeout = attr.attr_timeout = _DIR_TIMEOUT
            if kind is Kind.OBJECT and self._shared(node):
                attr.entry_timeout = _UNCACHED
        elif kind is Kind.STAGED:
            staged = self._staged[node]
            attr.st_mode = stat.S_IFREG | staged.owner.mode
            attr.st_uid, attr.st_gid = staged.owner.uid, staged.owner.gid
            attr.st_size = len(staged.data)
            attr.st_blocks = -(-len(staged.data) // 512)
            attr.entry_timeout = attr.attr_timeout = _UNCACHED  # renamed away soon
            mtime = staged.mtime_ns
        elif kind is Kind.IMAGE:
            assert node.pool is not None
            pool = self.engine.pool(node.pool)
            attr.st_mode = stat.S_IFREG | (pool.owner.mode & 0o666)
            attr.st_uid, attr.st_gid = pool.owner.uid, pool.owner.gid
            attr.st_size = pool.image_size or 0
            attr.st_blocks = -(-self.engine.pool_stats(node.pool)["compr_data_size"] // 512)
            attr.entry_timeout = _UNCACHED
            attr.attr_timeout = _DIR_TIMEOUT
            mtime = pool.owner.ctime_ns
        else:
            owner = self._owner(node)
            attr.st_mode = stat.S_IFREG | (owner.mode & 0o666)
            attr.st_uid, attr.st_gid = owner.uid, owner.gid
            attr.st_size = self.page_size
            entry = self.engine.entry(node.page_key)
            if entry is not None:
                mtime = entry.mtime_ns
                # What the page really costs, so du shows memory used and ls -l the page.
                attr.st_blocks = -(-int(self.engine.page_cost(entry)) // 512)
            else:
                mtime = time.time_ns()
            attr.entry_timeout = _UNCACHED if self._shared(node) else _PAGE_ENTRY_TIMEOUT
            attr.attr_timeout = _PAGE_ATTR_TIMEOUT
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
        return attr

    def _shared(self, node: Node) -> bool:
        """Whether other mounts may change what is under this node (a shared pool)."""
        pool = self.engine.pools.get(node.pool) if node.pool is not None else None
        return pool is not None and pool.shared

    def _owner(self, node: Node) -> Owner:
        if node.kind is Kind.STAGED:
            return self._staged[node].owner
        assert node.pool is not None
        pool = self.engine.pool(node.pool)
        # A page shows its pool's owner and mode (without x bits), in cleancache too:
        # an object's own mode may be passing (tar and cp -a make directories 0700,
        # fill them, and set their mode last), the pool's is the user's choice.
        if node.kind in (Kind.POOL, Kind.PAGE) or pool.persistent:
            return pool.owner
        assert node.object is not None
        return self.engine.get_object(node.pool, node.object).owner

    def _stats_text(self, node: Node) -> bytes:
        if node.kind is Kind.STATS:
            return statsfmt.render(dict(self.engine.stats()))
        if node.kind is Kind.DAEMON:
            return statsfmt.render(dict(self.daemon_info))
        assert node.pool is not None
        shares = self.engine.pool_shares(node.pool)
        if node.kind is Kind.POOL_MAX:
            return f"{format_limit(shares['max_size'])}\n".encode()
        if node.kind is Kind.POOL_WEIGHT:
            return f"{shares['weight']}\n".encode()
        return statsfmt.render(dict(self.engine.pool_stats(node.pool))
                               | {k: format_limit(v) for k, v in shares.items()})

    def _entry_reply(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = self._attrs(node)
        self.inodes.remember(attr.st_ino)
        return attr

    # -- lookup, getattr, setattr --------------------------------------------------------

    async def _refresh_shared(self, directory: Node) -> None:
        """A shared pool's contents come from every mount: ask before answering."""
        if directory.kind in (Kind.POOL, Kind.OBJECT) and directory.pool is not None:
            await self.engine.refresh_shared(directory.pool, directory.object)

    @translate_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        await self._refresh_shared(parent)
        node = self._named(parent, name)
        if not self._exists(node):
            raise fail(errno.ENOENT)
        return self._entry_reply(node)

    @translate_errors
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    @translate_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode), inode)

    @translate_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind in (Kind.POOL, Kind.OBJECT, Kind.STAGED):
            self._change_owner(node, attr, fields, ctx)
        elif fields.update_mode or fields.update_uid or fields.update_gid:
            # A page's owner and mode are its directory's. Setting them to what they
            # are is a no-op that succeeds, as tar, cp -a and rsync -a do on a restore.
            now = self._attrs(node, inode)
            if ((fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(now.st_mode))
                    or (fields.update_uid and attr.st_uid != now.st_uid)
                    or (fields.update_gid and attr.st_gid != now.st_gid)):
                raise fail(errno.EPERM)
        if fields.update_size:
            if node.kind is Kind.STAGED:
                if attr.st_size > self.page_size:
                    raise fail(errno.EFBIG)
                data = self._staged[node].data
                del data[attr.st_size:]
                data.extend(bytes(attr.st_size - len(data)))
            elif node.kind is Kind.PAGE:
                await self._truncate_page(node, attr.st_size, fh)
            elif node.kind is Kind.IMAGE:
                assert node.pool is not None
                await self.engine.resize_image(node.pool, attr.st_size)
            elif node.kind in _CONTROL_KINDS:
                # `echo 64M > .max` truncates first; the value is set by the write.
                self._check_control_writer(node, ctx)
            elif node.kind in (Kind.STATS, Kind.POOL_STATS, Kind.DAEMON):
                raise fail(errno.EACCES)
            else:
                raise fail(errno.EISDIR)
        # Times are not kept apart from the store time; touch on a page just succeeds.
        return self._attrs(node, inode)

    def _change_owner(
        self,
        node: Node,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        owner = self._owner(node)
        if fields.update_mode:
            if ctx.uid not in (0, owner.uid):
                raise fail(errno.EPERM)
            owner.mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid or fields.update_gid:
            new_uid = attr.st_uid if fields.update_uid else owner.uid
            new_gid = attr.st_gid if fields.update_gid else owner.gid
            if ctx.uid != 0 and (new_uid != owner.uid or ctx.uid != owner.uid):
                raise fail(errno.EPERM)
            owner.uid, owner.gid = new_uid, new_gid

    async def _truncate_page(self, node: Node, size: int, fh: int | None) -> None:
        """truncate(2) of a page: past the page is EFBIG; shorter zeroes the tail."""
        if size > self.page_size:
            raise fail(errno.EFBIG)
        if size == self.page_size:
            return
        handle = self._handles.get(fh) if fh is not None else None
        if isinstance(handle, OpenPage) and handle.writable:
            buffer = await self._write_buffer(handle)
            buffer[size:] = bytes(self.page_size - size)
            handle.dirty = True
            return
        page = await self.engine.load(node.page_key)
        if page is None:
            raise fail(errno.ENOENT)
        await self.engine.store(node.page_key, page[:size].ljust(self.page_size, b"\0"))

    # -- control files: .max and .weight ---------------------------------------------------

    def _check_control_writer(self, node: Node, ctx: pyfuse3.RequestContext) -> None:
        """Only the pool's owner and root may change its limit or weight."""
        assert node.pool is not None
        if ctx.uid not in (0, self.engine.pool(node.pool).owner.uid):
            raise fail(errno.EACCES)

    def _write_control(self, node: Node, buf: bytes) -> int:
        """One write() is one value, as in a cgroup file: `64M`, `max` or `300`, with an
        optional newline. Anything else is EINVAL, and the old value stays."""
        assert node.pool is not None
        try:
            text = buf.decode("ascii")
        except UnicodeDecodeError:
            raise BadValue(repr(buf)) from None
        if text.endswith("\n"):
            text = text[:-1]
        if not text or text != text.strip() or "\n" in text:
            raise BadValue(repr(buf))
        try:
            if node.kind is Kind.POOL_MAX:
                self.engine.set_max_size(node.pool, parse_limit(text, self.engine.max_pool))
            elif not text.isdigit():
                raise BadValue(text)
            else:
                self.engine.set_weight(node.pool, int(text))
        except ValueError:
            raise BadValue(text) from None
        log.info("%s/%s set to %s", node.pool, ".max" if node.kind is Kind.POOL_MAX
                 else ".weight", text)
        return len(buf)

    # -- directories -------------------------------------------------------------------

    @translate_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if parent.kind not in (Kind.FRONTSWAP, Kind.CLEANCACHE) and not (
            parent.kind is Kind.POOL and parent.pool and parent.pool.kind is PoolKind.EPHEMERAL
        ):
            raise fail(errno.EEXIST if parent.kind is Kind.ROOT and name in _TOP else errno.EPERM)
        if name == _STATS_NAME or name in _CONTROLS:
            raise fail(errno.EEXIST)
        node = self._child(parent, name)
        if node.kind not in (Kind.POOL, Kind.OBJECT):
            raise BadName(name)
        owner = Owner(ctx.uid, ctx.gid, mode & ~ctx.umask & 0o7777)
        assert node.pool is not None
        if node.kind is Kind.POOL:
            self.engine.create_pool(node.pool, owner)
        else:
            assert node.object is not None
            self.engine.create_object(node.pool, node.object, owner)
            await self.engine.publish_object(node.pool, node.object)
        # Now it exists, its node carries its generation.
        return self._entry_reply(self._child(parent, name))

    @translate_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._named(self._node(parent_inode), name)
        if not self._exists(node):
            raise fail(errno.ENOENT)
        assert node.pool is not None or node.kind in (Kind.FRONTSWAP, Kind.CLEANCACHE, Kind.STATS)
        if node.kind is Kind.POOL:
            assert node.pool is not None
            await self.engine.flush_pool(node.pool)
        elif node.kind is Kind.OBJECT:
            assert node.pool is not None and node.object is not None
            await self.engine.invalidate_object(node.pool, node.object)
        elif node.kind in (Kind.FRONTSWAP, Kind.CLEANCACHE):
            raise fail(errno.EPERM)
        else:
            raise fail(errno.ENOTDIR)

    @translate_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self._new_handle(Listing(self._node(inode)))

    @translate_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._handles[fh]
        assert isinstance(listing, Listing)
        if start_id == 0:
            await self._refresh_shared(listing.node)
            listing.entries = self._children(listing.node)
        for position in range(start_id, len(listing.entries)):
            name, node = listing.entries[position]
            if not self._exists(node):
                continue
            attr = self._attrs(node)
            if not pyfuse3.readdir_reply(token, name, attr, position + 1):
                break
            # readdirplus hands the kernel an inode reference for each entry.
            self.inodes.remember(attr.st_ino)

    @translate_errors
    async def releasedir(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- page files --------------------------------------------------------------------

    @translate_errors
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        if parent.kind is Kind.OBJECT or (
            parent.kind is Kind.POOL and parent.pool and parent.pool.kind is PoolKind.PERSISTENT
        ):
            if name == _STATS_NAME or name in _CONTROLS:
                raise fail(errno.EEXIST)
            node = self._child(parent, name)
            if node.kind is Kind.STAGED:
                return self._create_staged(node, flags, mode, ctx)
        elif parent.kind is Kind.FRONTSWAP and name.endswith(_IMAGE_SUFFIX):
            return await self._create_image(self._child(parent, name), flags, mode, ctx)
        else:
            raise fail(errno.EPERM)
        key = node.page_key
        if self.engine.entry(key) is not None and flags & os.O_EXCL:
            raise fail(errno.EEXIST)
        return self._open_created(key), self._entry_reply(node)

    def _create_staged(
        self, node: Node, flags: int, mode: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if node in self._staged:
            if flags & os.O_EXCL:
                raise fail(errno.EEXIST)
            if flags & os.O_TRUNC:
                self._staged[node].data.clear()
        else:
            if len(self._staged) >= _MAX_STAGED:
                raise fail(errno.ENOSPC)
            self._staged[node] = Staged(Owner(ctx.uid, ctx.gid, mode & ~ctx.umask & 0o7777))
        fh = self._new_handle(OpenStaged(node))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), self._entry_reply(node)

    async def _rename_staged(self, node: Node, target: Node, flags: int) -> None:
        """`.N.XXXXXX` renamed onto N (same directory): page N is stored from it."""
        if (target.kind is not Kind.PAGE or target._replace(kind=Kind.STAGED, name=node.name)
                != node or flags & ~pyfuse3.RENAME_NOREPLACE):
            raise fail(errno.EPERM)
        if flags & pyfuse3.RENAME_NOREPLACE and self._exists(target):
            raise fail(errno.EEXIST)
        staged = self._staged.pop(node)
        page = bytes(staged.data).ljust(self.page_size, b"\0")
        self._forget_creating(target.page_key)
        await self._store(target.page_key, page)

    def _open_created(self, key: PageKey) -> pyfuse3.FileInfo:
        """An open file of a new page: zeros until written, stored at close."""
        handle = OpenPage(key, writable=True, created=True)
        handle.buffer = bytearray(self.page_size)
        self._creating[key] += 1
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True, keep_cache=False)

    async def _create_image(
        self, node: Node, flags: int, mode: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """`truncate -s SIZE frontswap/N.img`: a block view of pool N, made if needed."""
        assert node.pool is not None
        if self._exists(node) and flags & os.O_EXCL:
            raise fail(errno.EEXIST)
        if node.pool not in self.engine.pools:
            self.engine.create_pool(node.pool, Owner(ctx.uid, ctx.gid, 0o755))
        if not self._exists(node) or flags & os.O_TRUNC:
            await self.engine.resize_image(node.pool, 0)
        node = self._pool_node(Kind.IMAGE, node.pool)
        self._image_made()
        fh = self._new_handle(OpenImage(node.pool))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False), self._entry_reply(node)

    def _image_made(self) -> None:
        if self._on_first_image is not None:
            callback, self._on_first_image = self._on_first_image, None
            callback()

    @translate_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        vanished = self.inodes.node(inode)
        if (
            writable and vanished is not None and vanished.kind is Kind.PAGE
            and not self._exists(vanished)
            and self._exists(vanished._replace(kind=Kind.OBJECT, index=None))
        ):
            # The page went (unlink, eviction) between the kernel's lookup and this open.
            # The kernel keeps O_CREAT to itself, so a write must find a new page here,
            # as its create would have: a store never fails with ENOENT.
            return self._open_created(vanished.page_key)
        node = self._node(inode)
        handle: OpenPage | OpenStats | OpenStaged
        if node.kind in _CONTROL_KINDS:
            if writable or flags & os.O_TRUNC:
                self._check_control_writer(node, ctx)
            handle = OpenStats(self._stats_text(node), node if writable else None)
        elif node.kind in (Kind.STATS, Kind.POOL_STATS, Kind.DAEMON):
            if writable or flags & os.O_TRUNC:
                raise fail(errno.EACCES)
            handle = OpenStats(self._stats_text(node))
        elif node.kind is Kind.IMAGE:
            assert node.pool is not None
            if writable and flags & os.O_TRUNC:
                await self.engine.resize_image(node.pool, 0)
            handle = OpenImage(node.pool)
        elif node.kind is Kind.STAGED:
            if writable and flags & os.O_TRUNC:
                self._staged[node].data.clear()
            handle = OpenStaged(node)
        elif node.kind is Kind.PAGE:
            handle = OpenPage(node.page_key, writable)
            if writable and flags & os.O_TRUNC:
                # `echo hi > page`: the page becomes what is written, zero-padded.
                handle.buffer = bytearray(self.page_size)
                handle.dirty = True
        else:
            raise fail(errno.EISDIR)
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True, keep_cache=False)

    @translate_errors
    @invalidates_before_reply
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        handle = self._handles[fh]
        if isinstance(handle, OpenStats):
            return handle.text[off : off + size]
        if isinstance(handle, OpenImage):
            return await self.image.read(handle.pool, off, size)
        if isinstance(handle, OpenStaged):
            return bytes(self._staged_of(handle)[off : off + size])
        assert isinstance(handle, OpenPage)
        if off >= self.page_size:
            return b""
        if handle.dirty and handle.buffer is not None:
            # A writer reads back what it wrote, as it would from the page cache.
            return bytes(handle.buffer[off : off + size])
        if off == 0 or handle.loaded is None:
            # A read from the start is a fresh get; later offsets continue the same copy.
            page = await self.engine.load(handle.key)
            if page is None:
                if not (handle.created or handle.key in self._closed_creations):
                    raise fail(errno.ENOENT)
                # A new page, empty: zeros for its creator, and for everyone once the
                # creator has closed it (its store lands at release).
                page = bytes(self.page_size)
            handle.loaded = page
        return handle.loaded[off : off + size]

    @translate_errors
    @invalidates_before_reply
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if isinstance(handle, OpenImage):
            return await self.image.write(handle.pool, off, buf)
        if isinstance(handle, OpenStats) and handle.control is not None:
            return self._write_control(handle.control, buf)
        if isinstance(handle, OpenStaged):
            if off + len(buf) > self.page_size:
                raise fail(errno.EFBIG)
            data = self._staged_of(handle)
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + len(buf)] = buf
            return len(buf)
        if not isinstance(handle, OpenPage):
            raise fail(errno.EBADF)
        if off + len(buf) > self.page_size:
            raise fail(errno.EFBIG)
        if off == 0 and len(buf) == self.page_size:
            # A whole page is a store at once; nothing is left to assemble.
            handle.dirty = False
            handle.buffer = None
            try:
                await self._store(handle.key, bytes(buf))
            finally:
                # Only now: until the store lands, the created page must still exist.
                self._stop_creating(handle)
            return len(buf)
        buffer = await self._write_buffer(handle)
        buffer[off : off + len(buf)] = buf
        handle.dirty = True
        return len(buf)

    def _staged_of(self, handle: OpenStaged) -> bytearray:
        staged = self._staged.get(handle.node)
        if staged is None:  # renamed or unlinked while open
            raise fail(errno.ESTALE)
        return staged.data

    async def _write_buffer(self, handle: OpenPage) -> bytearray:
        """The page being assembled: its stored content (read-modify-write) or zeros."""
        if handle.buffer is None:
            page = await self.engine.load(handle.key)
            handle.buffer = bytearray(page if page is not None else bytes(self.page_size))
        return handle.buffer

    async def _store(self, key: PageKey, page: bytes) -> None:
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
            await self._store(handle.key, page)
        finally:
            self._stop_creating(handle)

    def _forget_creating(self, key: PageKey) -> bool:
        """Unlink of a page still being created: its open files will not store it."""
        if key not in self._creating:
            return False
        del self._creating[key]
        self._closed_creations.discard(key)
        for handle in self._handles.values():
            if isinstance(handle, OpenPage) and handle.key == key and handle.created:
                handle.created = False
        return True

    def _stop_creating(self, handle: OpenPage) -> None:
        if handle.created:
            handle.created = False
            self._creating[handle.key] -= 1
            if self._creating[handle.key] <= 0:
                del self._creating[handle.key]
                self._closed_creations.discard(handle.key)

    @translate_errors
    @invalidates_before_reply
    async def flush(self, fh: int) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, OpenPage):
            return
        if handle.dirty:
            await self._store_pending(handle)
        elif handle.created and handle.key in self._creating:
            # A created page with nothing written yet is stored at release, not here:
            # shell redirections and dd close a dup of the file before they write, and
            # that close must not store a zero page first. Meanwhile the page exists and
            # reads as zeros. Whether it will fit is answered now, so that close() is
            # where a full budget says ENOSPC, as for any other store.
            if not self.engine.room_for_page(handle.key.pool):
                self._forget_creating(handle.key)
                self._page_gone(handle.key)
                raise StoreRejected(str(handle.key))
            self._closed_creations.add(handle.key)

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
            await self._fallocate_page(handle, mode, offset, offset + length)
        else:
            raise fail(errno.EBADF)

    async def _fallocate_page(self, handle: OpenPage, mode: int, off: int, end: int) -> None:
        """A page file is one page: a range past it is EFBIG, as a write past it is."""
        psize = self.page_size
        if end > psize:
            raise fail(errno.EFBIG)
        if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            return
        # What this open file has assembled is stored first; the range applies to it.
        await self._store_pending(handle)
        handle.buffer = handle.loaded = None
        key = handle.key
        if mode & FALLOC_FL_PUNCH_HOLE and off == 0 and end == psize:
            await self.engine.invalidate_page(key)
            return
        (page,) = await self.engine.load_many(key.pool, key.object, [key.index],
                                              exclusive=False)
        if page is None and mode & FALLOC_FL_PUNCH_HOLE:
            return
        page = page or bytes(psize)
        await self._store(key, page[:off] + bytes(end - off) + page[end:])

    @translate_errors
    @invalidates_before_reply
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, OpenPage):
            try:
                await self._store_pending(handle)
            except TmemError as exc:
                # flush() already reported this to close(); release has no caller to tell.
                log.warning("store at release of %s failed: %s", handle.key, type(exc).__name__)
            finally:
                self._stop_creating(handle)

    @translate_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._named(self._node(parent_inode), name)
        if node.kind is Kind.PAGE:
            key = node.page_key
            created = self._forget_creating(key)
            self._unlinking = node
            try:
                if not await self.engine.invalidate_page(key) and not created:
                    raise fail(errno.ENOENT)
            finally:
                self._unlinking = None
        elif not self._exists(node):
            raise fail(errno.ENOENT)
        elif node.kind is Kind.STAGED:
            del self._staged[node]
        elif node.kind is Kind.IMAGE:
            assert node.pool is not None
            await self.engine.remove_image(node.pool)
        elif node.kind in _TEXT_KINDS:
            raise fail(errno.EPERM)
        else:
            raise fail(errno.EISDIR)

    # -- what the tree does not allow ----------------------------------------------------

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
        old_parent = self._node(parent_inode_old)
        node = self._named(old_parent, name_old)
        if node.kind is not Kind.STAGED or parent_inode_new != parent_inode_old:
            raise fail(errno.EPERM)
        if not self._exists(node):
            raise fail(errno.ENOENT)
        try:
            target = self._child(old_parent, name_new)
        except BadName:
            raise fail(errno.EPERM) from None
        await self._rename_staged(node, target, flags)

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
        engine = self.engine
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = self.page_size
        data.f_blocks = engine.max_pool // self.page_size
        data.f_bfree = data.f_bavail = max(engine.max_pool - engine.pool_total_size(), 0) // (
            self.page_size
        )
        stored = engine.stats()["stored_pages"]
        data.f_files = stored + data.f_bfree
        data.f_ffree = data.f_favail = data.f_bfree
        data.f_namemax = 255
        return data

    def _new_handle(
        self, handle: OpenPage | OpenImage | OpenStats | OpenStaged | Listing
    ) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh
