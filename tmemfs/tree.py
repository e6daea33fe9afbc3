"""The tree model of tmemfs(5): which nodes exist, what they are, who may change them.

Like borg's vfs.py, it knows no FUSE: the adapter (fs.py) hands it inode numbers,
names, callers' ids and open files, and turns its answers into replies and its
exceptions into errnos. Here are the tree's rules: what a name in a directory
means, which nodes exist (asked of the engine each time), their attributes (mode,
owner, size, times, blocks), who may chmod, chown or write a control file, what
mkdir, rmdir, unlink, create and rename may do where, and how a page file is read
and written (partial writes assembled until close, a created page that exists
before its first store, rsync's staged copies). No tmem rule is decided here: the
engine decides what is stored, loaded, evicted or refused.
"""

from __future__ import annotations

import logging
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tmemfs.engine import (
    SWAP_OBJECT,
    BadName,
    BadValue,
    Engine,
    Owner,
    PageKey,
    PoolId,
    PoolKind,
    StoreRejected,
    parse_decimal,
    parse_name,
)
from tmemfs.engine import stats as statsfmt
from tmemfs.engine.pool import Pool, TmemObject
from tmemfs.image import FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from tmemfs.nodes import CLEANCACHE, DAEMON, FRONTSWAP, STATS, InodeTable, Kind, Node
from tmemfs.sizes import format_limit, parse_limit

log = logging.getLogger(__name__)


# -- what the tree refuses: each is one errno in fs.errno_for ---------------------------


class TreeError(Exception):
    """A request the tree's rules refuse."""


class NoSuchNode(TreeError):
    """Nothing of that name, or an inode that no longer exists (ENOENT)."""


class NodeExists(TreeError):
    """The name is taken (EEXIST)."""


class NotPermitted(TreeError):
    """The tree has no such operation there, or the caller is not the owner (EPERM)."""


class AccessDenied(TreeError):
    """A read-only file opened for writing, or a control file written by another (EACCES)."""


class IsDirectory(TreeError):
    """A file operation on a directory (EISDIR)."""


class NotDirectory(TreeError):
    """rmdir of a file (ENOTDIR)."""


class PastPage(TreeError):
    """A page file is one page: nothing lies past its end (EFBIG)."""


class StaleFile(TreeError):
    """An open staged file that was renamed or unlinked meanwhile (ESTALE)."""


class TooManyStaged(TreeError):
    """Too many rsync copies coming in at once (ENOSPC)."""


# rename(2)'s flag (linux/fs.h): fail if the target exists.
RENAME_NOREPLACE = 1

_STATS_NAME = b".stats"
# A pool's writable control files: its own limit and its weight (fair shares).
_CONTROLS = {b".max": Kind.POOL_MAX, b".weight": Kind.POOL_WEIGHT}
CONTROL_KINDS = frozenset(_CONTROLS.values())
# Read-only files whose text is rendered when they are opened.
STATS_KINDS = frozenset({Kind.STATS, Kind.POOL_STATS, Kind.DAEMON})
# Files whose text is rendered when they are opened: stats and control files.
TEXT_KINDS = STATS_KINDS | CONTROL_KINDS
IMAGE_SUFFIX = b".img"
# rsync writes page N as `.N.XXXXXX` and renames it onto N when it is complete.
_STAGED_NAME = re.compile(rb"\.([0-9]+)\.[A-Za-z0-9]{6}")
# How many such files may be coming in at once, per mount.
MAX_STAGED = 1024
_TOP = {
    b"stats": STATS,
    b"frontswap": FRONTSWAP,
    b"cleancache": CLEANCACHE,
    b".daemon": DAEMON,
}
# How long the kernel may cache names and attributes. Whatever goes away behind the
# kernel's back (eviction, exclusive gets, a refused store, a flush, a truncated
# image) is invalidated in the kernel as it goes (`Tree.gone`), so names may be
# cached: a cached page name saves a LOOKUP on every open. That invalidation is
# asynchronous, so a name whose going must be seen at once is never cached: an image
# (`rmdir frontswap/0; truncate -s 1M frontswap/0.img` must make a new one, and
# open(O_CREAT) on a cached name sends OPEN, not CREATE), and whatever lives in a
# shared pool, where other mounts remove things without this kernel's knowledge.
# A page's attributes may be cached: reads and writes always reach the daemon (direct
# I/O), and without the cache every open costs 3 more GETATTR requests.
DIR_TIMEOUT = 1.0
PAGE_ENTRY_TIMEOUT = 10.0
PAGE_ATTR_TIMEOUT = 1.0
UNCACHED = 0.0


@dataclass(slots=True)
class Attributes:
    """What stat(2) shows of a node, and how long the kernel may cache it."""

    inode: int
    mode: int
    size: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    blocks: int = 0  # 512-byte blocks: what the node really costs in memory
    block_size: int = 4096
    mtime_ns: int = 0
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0


@dataclass(slots=True)
class FsUsage:
    """What statfs(2) shows: the budget, in pages."""

    block_size: int
    blocks: int
    free_blocks: int
    files: int
    name_max: int = 255


# -- open files -------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
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
class OpenText:
    """A stats or control file: its text is taken once at open, so a reader sees one
    snapshot. `control` is the control file (.max, .weight) it was opened to write."""

    text: bytes
    control: Node | None = None


OpenFile = OpenPage | OpenImage | OpenText | OpenStaged


class Tree:
    """The tmemfs tree of tmemfs(5) over an Engine: nodes, attributes, permissions."""

    def __init__(
        self,
        engine: Engine,
        daemon_info: dict[str, str] | None = None,
        on_first_image: Callable[[], object] | None = None,
        forget_names: Callable[[list[tuple[int, bytes]]], None] | None = None,
    ) -> None:
        self.engine = engine
        # Tells the kernel to drop cached names (None when no kernel is listening).
        self.forget_names = forget_names
        engine.on_gone = self.gone
        self.page_size = engine.page_size
        # What `.daemon` shows: pid, version, options; `tmemfs umount` reads the pid.
        self.daemon_info = daemon_info or {}
        # Called once, when the first image is made (the daemon locks its memory then).
        self._on_first_image = on_first_image
        self.inodes = InodeTable()
        # Files coming in under rsync's temporary names, until renamed onto a page.
        self.staged: dict[Node, Staged] = {}
        # Pages created by an open file that has not stored them yet, with those files:
        # they exist for stat and lookup, as a freshly created file does.
        self._creators: dict[PageKey, list[OpenPage]] = {}
        # Of those, the ones whose creator has closed them with nothing written: from
        # then on everyone reads them as a zero page; before, only the creator does.
        self._closed_creations: set[PageKey] = set()
        # The page an unlink is removing: the kernel drops that name itself.
        self._unlinking: Node | None = None
        self._started_ns = time.time_ns()

    # -- which nodes exist --------------------------------------------------------------

    def node(self, inode: int) -> Node:
        """The node an inode number stands for, if it still exists."""
        node = self.inodes.node(inode)
        if node is None or not self.exists(node):
            raise NoSuchNode(inode)
        return node

    def exists(self, node: Node) -> bool:
        kind = node.kind
        if kind in (Kind.ROOT, Kind.STATS, Kind.DAEMON, Kind.FRONTSWAP, Kind.CLEANCACHE):
            return True
        assert node.pool is not None
        pool = self.engine.pools.get(node.pool)
        if pool is None:
            return False
        if kind in (Kind.POOL, Kind.POOL_STATS, Kind.IMAGE) or kind in CONTROL_KINDS:
            return pool.generation == node.generation and (
                kind is not Kind.IMAGE or pool.image_size is not None
            )
        tobj = pool.objects.get(node.object) if node.object is not None else None
        if tobj is None or tobj.generation != node.generation:
            return False
        if kind is Kind.OBJECT:
            return True
        if kind is Kind.STAGED:
            return node in self.staged
        key = node.page_key
        return self.engine.entry(key) is not None or key in self._creators

    def child(self, parent: Node, name: bytes) -> Node:
        """The node `name` in `parent` would be, whether or not it exists.

        Raises BadName when the name cannot be in that directory at all.
        """
        kind = parent.kind
        if kind is Kind.ROOT:
            if name in _TOP:
                return _TOP[name]
        elif kind is Kind.FRONTSWAP:
            if name.endswith(IMAGE_SUFFIX):
                number = parse_decimal(name[: -len(IMAGE_SUFFIX)])
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
            page = Node(
                Kind.PAGE,
                parent.pool,
                parent.object,
                parse_decimal(staged.group(1) if staged else name),
                parent.generation,
            )
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

    def named(self, parent: Node, name: bytes) -> Node:
        """The node `name` in `parent` refers to; a name that cannot be there is ENOENT."""
        try:
            return self.child(parent, name)
        except BadName:
            raise NoSuchNode(name) from None

    async def refresh_shared(self, directory: Node) -> None:
        """A shared pool's contents come from every mount: ask before answering."""
        if directory.kind in (Kind.POOL, Kind.OBJECT) and directory.pool is not None:
            await self.engine.refresh_shared(directory.pool, directory.object)

    async def lookup(self, parent: Node, name: bytes) -> Node:
        """The existing node `name` in `parent`."""
        await self.refresh_shared(parent)
        node = self.named(parent, name)
        if not self.exists(node):
            raise NoSuchNode(name)
        return node

    def children(self, node: Node) -> list[tuple[bytes, Node]]:
        """A directory's entries, in listing order (they may go before they are shown)."""
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
                (p.name.encode() + IMAGE_SUFFIX, self._pool_node(Kind.IMAGE, p))
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
                (name.encode(), self._object_node(node.pool, name)) for name in sorted(pool.objects)
            ]
            return entries
        obj = SWAP_OBJECT if node.kind is Kind.POOL else node.object
        assert obj is not None
        tobj = pool.objects[obj]
        indexes = set(tobj.pages)
        indexes.update(k.index for k in self._creators if k.pool == node.pool and k.object == obj)
        entries += [
            (str(i).encode(), Node(Kind.PAGE, node.pool, obj, i, tobj.generation))
            for i in sorted(indexes)
        ]
        return entries

    # -- what the engine made go ----------------------------------------------------------

    def gone(self, pool: Pool, tobj: TmemObject | None, indexes: Sequence[int] | None) -> None:
        """The engine dropped pages, an object or a pool (its on_gone): the kernel is
        told to forget their names, as (directory inode, name) pairs.

        Only names the kernel holds are sent (a lookup count here), so a flush of pages
        nobody looked at costs nothing but dictionary lookups.
        """
        pid = pool.id
        if indexes is None and self.staged:
            for node in [
                n for n in self.staged if n.pool == pid and (tobj is None or n.object == tobj.name)
            ]:
                del self.staged[node]
        if self.forget_names is None:
            return
        pool_node = Node(Kind.POOL, pid, generation=pool.generation)
        gone: list[tuple[Node, bytes, Node]] = []  # (directory, name, what it named)
        if tobj is None:
            top = FRONTSWAP if pool.persistent else CLEANCACHE
            gone.append((top, pid.name.encode(), pool_node))
            if pool.persistent:
                gone.append(
                    (
                        top,
                        pid.name.encode() + IMAGE_SUFFIX,
                        Node(Kind.IMAGE, pid, generation=pool.generation),
                    )
                )
        elif indexes is None:
            if pool.persistent:
                return  # a frontswap pool's one object goes only with the pool
            gone.append(
                (
                    pool_node,
                    tobj.name.encode(),
                    Node(Kind.OBJECT, pid, tobj.name, None, tobj.generation),
                )
            )
        else:
            directory = (
                pool_node
                if pool.persistent
                else Node(Kind.OBJECT, pid, tobj.name, None, tobj.generation)
            )
            if self.inodes.known(directory) is None:
                return
            gone += [
                (
                    directory,
                    str(index).encode(),
                    Node(Kind.PAGE, pid, tobj.name, index, tobj.generation),
                )
                for index in indexes
            ]
        names: list[tuple[int, bytes]] = []
        for directory, name, node in gone:
            if node == self._unlinking or self.inodes.known(node) is None:
                continue
            parent_inode = self.inodes.known(directory)
            if parent_inode is not None:
                names.append((parent_inode, name))
        if names:
            self.forget_names(names)

    def _page_gone(self, key: PageKey) -> None:
        """A page that was only being created will not be: the kernel forgets its name."""
        pool = self.engine.pools.get(key.pool)
        tobj = pool.objects.get(key.object) if pool is not None else None
        if pool is not None and tobj is not None and key.index not in tobj.pages:
            self.gone(pool, tobj, (key.index,))

    # -- attributes -----------------------------------------------------------------------

    def attributes(self, node: Node, inode: int | None = None) -> Attributes:
        attr = Attributes(
            inode=inode if inode is not None else self.inodes.inode(node),
            mode=0,
            block_size=self.page_size,
        )
        mtime = self._started_ns
        kind = node.kind
        if kind is Kind.ROOT:
            attr.mode = stat.S_IFDIR | 0o755
            attr.nlink = 2
            attr.entry_timeout = attr.attr_timeout = DIR_TIMEOUT
        elif kind in (Kind.FRONTSWAP, Kind.CLEANCACHE):
            # Like /tmp: with --allow-other anyone may make a pool; the sticky bit keeps
            # users from removing each other's.
            attr.mode = stat.S_IFDIR | 0o1777
            attr.nlink = 2
            attr.entry_timeout = attr.attr_timeout = DIR_TIMEOUT
        elif kind in STATS_KINDS:
            attr.mode = stat.S_IFREG | 0o444
            attr.size = len(self.text(node))
            attr.entry_timeout = DIR_TIMEOUT
            attr.attr_timeout = 0
            mtime = time.time_ns()
        elif kind in CONTROL_KINDS:
            # Like a cgroup file: the pool's owner (and root) may write it, all may read.
            assert node.pool is not None
            owner = self.engine.pool(node.pool).owner
            attr.mode = stat.S_IFREG | 0o644
            attr.uid, attr.gid = owner.uid, owner.gid
            attr.size = len(self.text(node))
            attr.entry_timeout = DIR_TIMEOUT
            attr.attr_timeout = 0
            mtime = owner.ctime_ns
        elif kind in (Kind.POOL, Kind.OBJECT):
            owner = self.owner(node)
            attr.mode = stat.S_IFDIR | owner.mode
            attr.nlink = 2
            attr.uid, attr.gid = owner.uid, owner.gid
            mtime = owner.ctime_ns
            attr.entry_timeout = attr.attr_timeout = DIR_TIMEOUT
            if kind is Kind.OBJECT and self.shared(node):
                attr.entry_timeout = UNCACHED
        elif kind is Kind.STAGED:
            staged = self.staged[node]
            attr.mode = stat.S_IFREG | staged.owner.mode
            attr.uid, attr.gid = staged.owner.uid, staged.owner.gid
            attr.size = len(staged.data)
            attr.blocks = -(-len(staged.data) // 512)
            attr.entry_timeout = attr.attr_timeout = UNCACHED  # renamed away soon
            mtime = staged.mtime_ns
        elif kind is Kind.IMAGE:
            assert node.pool is not None
            pool = self.engine.pool(node.pool)
            attr.mode = stat.S_IFREG | (pool.owner.mode & 0o666)
            attr.uid, attr.gid = pool.owner.uid, pool.owner.gid
            attr.size = pool.image_size or 0
            attr.blocks = -(-self.engine.pool_stats(node.pool)["compr_data_size"] // 512)
            attr.entry_timeout = UNCACHED
            attr.attr_timeout = DIR_TIMEOUT
            mtime = pool.owner.ctime_ns
        else:
            owner = self.owner(node)
            attr.mode = stat.S_IFREG | (owner.mode & 0o666)
            attr.uid, attr.gid = owner.uid, owner.gid
            attr.size = self.page_size
            entry = self.engine.entry(node.page_key)
            if entry is not None:
                mtime = entry.mtime_ns
                # What the page really costs, so du shows memory used and ls -l the page.
                attr.blocks = -(-int(self.engine.page_cost(entry)) // 512)
            else:
                mtime = time.time_ns()
            attr.entry_timeout = UNCACHED if self.shared(node) else PAGE_ENTRY_TIMEOUT
            attr.attr_timeout = PAGE_ATTR_TIMEOUT
        attr.mtime_ns = mtime
        return attr

    def shared(self, node: Node) -> bool:
        """Whether other mounts may change what is under this node (a shared pool)."""
        pool = self.engine.pools.get(node.pool) if node.pool is not None else None
        return pool is not None and pool.shared

    def owner(self, node: Node) -> Owner:
        if node.kind is Kind.STAGED:
            return self.staged[node].owner
        assert node.pool is not None
        pool = self.engine.pool(node.pool)
        # A page shows its pool's owner and mode (without x bits), in cleancache too:
        # an object's own mode may be passing (tar and cp -a make directories 0700,
        # fill them, and set their mode last), the pool's is the user's choice.
        if node.kind in (Kind.POOL, Kind.PAGE) or pool.persistent:
            return pool.owner
        assert node.object is not None
        return self.engine.get_object(node.pool, node.object).owner

    def text(self, node: Node) -> bytes:
        """What a stats or control file reads as, now."""
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
        return statsfmt.render(
            dict(self.engine.pool_stats(node.pool))
            | {k: format_limit(v) for k, v in shares.items()}
        )

    def usage(self) -> FsUsage:
        """df shows the budget: size is --max-pool, used is pool_total_size."""
        engine = self.engine
        free = max(engine.max_pool - engine.pool_total_size(), 0) // self.page_size
        return FsUsage(
            block_size=self.page_size,
            blocks=engine.max_pool // self.page_size,
            free_blocks=free,
            files=engine.stats()["stored_pages"] + free,
        )

    # -- setattr ----------------------------------------------------------------------------

    async def set_attributes(
        self,
        node: Node,
        caller_uid: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        open_file: OpenFile | None = None,
    ) -> None:
        """chmod, chown and truncate of a node; None is a field left as it is."""
        if node.kind in (Kind.POOL, Kind.OBJECT, Kind.STAGED):
            self._change_owner(node, caller_uid, mode, uid, gid)
        elif mode is not None or uid is not None or gid is not None:
            # A page's owner and mode are its directory's. Setting them to what they
            # are is a no-op that succeeds, as tar, cp -a and rsync -a do on a restore.
            now = self.attributes(node)
            if (
                (mode is not None and stat.S_IMODE(mode) != stat.S_IMODE(now.mode))
                or (uid is not None and uid != now.uid)
                or (gid is not None and gid != now.gid)
            ):
                raise NotPermitted(node)
        if size is None:
            # Times are not kept apart from the store time; touch on a page just succeeds.
            return
        if node.kind is Kind.STAGED:
            if size > self.page_size:
                raise PastPage(node)
            data = self.staged[node].data
            del data[size:]
            data.extend(bytes(size - len(data)))
        elif node.kind is Kind.PAGE:
            await self._truncate_page(node, size, open_file)
        elif node.kind is Kind.IMAGE:
            assert node.pool is not None
            await self.engine.resize_image(node.pool, size)
        elif node.kind in CONTROL_KINDS:
            # `echo 64M > .max` truncates first; the value is set by the write.
            self.check_control_writer(node, caller_uid)
        elif node.kind in STATS_KINDS:
            raise AccessDenied(node)
        else:
            raise IsDirectory(node)

    def _change_owner(
        self, node: Node, caller_uid: int, mode: int | None, uid: int | None, gid: int | None
    ) -> None:
        owner = self.owner(node)
        if mode is not None:
            if caller_uid not in (0, owner.uid):
                raise NotPermitted(node)
            owner.mode = stat.S_IMODE(mode)
        if uid is not None or gid is not None:
            new_uid = uid if uid is not None else owner.uid
            new_gid = gid if gid is not None else owner.gid
            if caller_uid != 0 and (new_uid != owner.uid or caller_uid != owner.uid):
                raise NotPermitted(node)
            owner.uid, owner.gid = new_uid, new_gid

    async def _truncate_page(self, node: Node, size: int, open_file: OpenFile | None) -> None:
        """truncate(2) of a page: past the page is EFBIG; shorter zeroes the tail."""
        if size > self.page_size:
            raise PastPage(node)
        if size == self.page_size:
            return
        if isinstance(open_file, OpenPage) and open_file.writable:
            buffer = await self._write_buffer(open_file)
            buffer[size:] = bytes(self.page_size - size)
            open_file.dirty = True
            return
        page = await self.engine.load(node.page_key)
        if page is None:
            raise NoSuchNode(node)
        await self.engine.store(node.page_key, page[:size].ljust(self.page_size, b"\0"))

    # -- control files: .max and .weight ----------------------------------------------------

    def check_control_writer(self, node: Node, caller_uid: int) -> None:
        """Only the pool's owner and root may change its limit or weight."""
        assert node.pool is not None
        if caller_uid not in (0, self.engine.pool(node.pool).owner.uid):
            raise AccessDenied(node)

    def write_control(self, node: Node, buf: bytes) -> int:
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
        log.info(
            "%s/%s set to %s",
            node.pool,
            ".max" if node.kind is Kind.POOL_MAX else ".weight",
            text,
        )
        return len(buf)

    # -- directories ------------------------------------------------------------------------

    async def mkdir(self, parent: Node, name: bytes, owner: Owner) -> Node:
        """A pool (in frontswap or cleancache) or an object (in a cleancache pool)."""
        if parent.kind not in (Kind.FRONTSWAP, Kind.CLEANCACHE) and not (
            parent.kind is Kind.POOL and parent.pool and parent.pool.kind is PoolKind.EPHEMERAL
        ):
            if parent.kind is Kind.ROOT and name in _TOP:
                raise NodeExists(name)
            raise NotPermitted(name)
        if name == _STATS_NAME or name in _CONTROLS:
            raise NodeExists(name)
        node = self.child(parent, name)
        if node.kind not in (Kind.POOL, Kind.OBJECT):
            raise BadName(name)
        assert node.pool is not None
        if node.kind is Kind.POOL:
            self.engine.create_pool(node.pool, owner)
        else:
            assert node.object is not None
            self.engine.create_object(node.pool, node.object, owner)
            await self.engine.publish_object(node.pool, node.object)
        # Now it exists, its node carries its generation.
        return self.child(parent, name)

    async def rmdir(self, parent: Node, name: bytes) -> None:
        """rmdir of a pool flushes it; of an object, invalidates it."""
        node = self.named(parent, name)
        if not self.exists(node):
            raise NoSuchNode(name)
        assert node.pool is not None or node.kind in (Kind.FRONTSWAP, Kind.CLEANCACHE, Kind.STATS)
        if node.kind is Kind.POOL:
            assert node.pool is not None
            await self.engine.flush_pool(node.pool)
        elif node.kind is Kind.OBJECT:
            assert node.pool is not None and node.object is not None
            await self.engine.invalidate_object(node.pool, node.object)
        elif node.kind in (Kind.FRONTSWAP, Kind.CLEANCACHE):
            raise NotPermitted(name)
        else:
            raise NotDirectory(name)

    # -- files: create, open, unlink, rename -----------------------------------------------

    async def create(
        self, parent: Node, name: bytes, owner: Owner, exclusive: bool, truncate: bool
    ) -> tuple[Node, OpenFile]:
        """open(O_CREAT) of a name the kernel did not know: a page, a staged copy or an
        image. `owner` carries the caller's ids and the mode asked for (umask applied)."""
        if parent.kind is Kind.OBJECT or (
            parent.kind is Kind.POOL and parent.pool and parent.pool.kind is PoolKind.PERSISTENT
        ):
            if name == _STATS_NAME or name in _CONTROLS:
                raise NodeExists(name)
            node = self.child(parent, name)
            if node.kind is Kind.STAGED:
                return node, self._create_staged(node, owner, exclusive, truncate)
        elif parent.kind is Kind.FRONTSWAP and name.endswith(IMAGE_SUFFIX):
            return await self._create_image(self.child(parent, name), owner, exclusive, truncate)
        else:
            raise NotPermitted(name)
        key = node.page_key
        if self.engine.entry(key) is not None and exclusive:
            raise NodeExists(name)
        return node, self.open_created(key)

    def _create_staged(
        self, node: Node, owner: Owner, exclusive: bool, truncate: bool
    ) -> OpenStaged:
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

    async def _create_image(
        self, node: Node, owner: Owner, exclusive: bool, truncate: bool
    ) -> tuple[Node, OpenImage]:
        """`truncate -s SIZE frontswap/N.img`: a block view of pool N, made if needed."""
        assert node.pool is not None
        if self.exists(node) and exclusive:
            raise NodeExists(node)
        if node.pool not in self.engine.pools:
            self.engine.create_pool(node.pool, Owner(owner.uid, owner.gid, 0o755))
        if not self.exists(node) or truncate:
            await self.engine.resize_image(node.pool, 0)
        node = self._pool_node(Kind.IMAGE, node.pool)
        if self._on_first_image is not None:
            callback, self._on_first_image = self._on_first_image, None
            callback()
        return node, OpenImage(node.pool)

    def open_created(self, key: PageKey) -> OpenPage:
        """An open file of a new page: zeros until written, stored at close."""
        handle = OpenPage(key, writable=True, created=True)
        handle.buffer = bytearray(self.page_size)
        self._creators.setdefault(key, []).append(handle)
        return handle

    async def open(self, inode: int, writable: bool, truncate: bool, caller_uid: int) -> OpenFile:
        """open(2) of an existing node (or of a page that went since its lookup)."""
        vanished = self.inodes.node(inode)
        if (
            writable
            and vanished is not None
            and vanished.kind is Kind.PAGE
            and not self.exists(vanished)
            and self.exists(vanished._replace(kind=Kind.OBJECT, index=None))
        ):
            # The page went (unlink, eviction) between the kernel's lookup and this open.
            # The kernel keeps O_CREAT to itself, so a write must find a new page here,
            # as its create would have: a store never fails with ENOENT.
            return self.open_created(vanished.page_key)
        node = self.node(inode)
        if node.kind in CONTROL_KINDS:
            if writable or truncate:
                self.check_control_writer(node, caller_uid)
            return OpenText(self.text(node), node if writable else None)
        if node.kind in STATS_KINDS:
            if writable or truncate:
                raise AccessDenied(node)
            return OpenText(self.text(node))
        if node.kind is Kind.IMAGE:
            assert node.pool is not None
            if writable and truncate:
                await self.engine.resize_image(node.pool, 0)
            return OpenImage(node.pool)
        if node.kind is Kind.STAGED:
            if writable and truncate:
                self.staged[node].data.clear()
            return OpenStaged(node)
        if node.kind is Kind.PAGE:
            handle = OpenPage(node.page_key, writable)
            if writable and truncate:
                # `echo hi > page`: the page becomes what is written, zero-padded.
                handle.buffer = bytearray(self.page_size)
                handle.dirty = True
            return handle
        raise IsDirectory(node)

    async def unlink(self, parent: Node, name: bytes) -> None:
        """Unlink of a page invalidates it; of an image, removes the view (not the pages)."""
        node = self.named(parent, name)
        if node.kind is Kind.PAGE:
            key = node.page_key
            created = self._forget_creating(key)
            self._unlinking = node
            try:
                if not await self.engine.invalidate_page(key) and not created:
                    raise NoSuchNode(name)
            finally:
                self._unlinking = None
        elif not self.exists(node):
            raise NoSuchNode(name)
        elif node.kind is Kind.STAGED:
            del self.staged[node]
        elif node.kind is Kind.IMAGE:
            assert node.pool is not None
            await self.engine.remove_image(node.pool)
        elif node.kind in TEXT_KINDS:
            raise NotPermitted(name)
        else:
            raise IsDirectory(name)

    async def rename(
        self, old_parent: Node, name_old: bytes, same_directory: bool, name_new: bytes, flags: int
    ) -> None:
        """EPERM, but for rsync's `.N.XXXXXX` renamed onto N: that stores page N."""
        node = self.named(old_parent, name_old)
        if node.kind is not Kind.STAGED or not same_directory:
            raise NotPermitted(name_old)
        if not self.exists(node):
            raise NoSuchNode(name_old)
        try:
            target = self.child(old_parent, name_new)
        except BadName:
            raise NotPermitted(name_new) from None
        if (
            target.kind is not Kind.PAGE
            or target._replace(kind=Kind.STAGED, name=node.name) != node
            or flags & ~RENAME_NOREPLACE
        ):
            raise NotPermitted(name_new)
        if flags & RENAME_NOREPLACE and self.exists(target):
            raise NodeExists(name_new)
        staged = self.staged.pop(node)
        page = bytes(staged.data).ljust(self.page_size, b"\0")
        self._forget_creating(target.page_key)
        await self._store(target.page_key, page)

    # -- staged copies: read and write ------------------------------------------------------

    def staged_data(self, handle: OpenStaged) -> bytearray:
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

    async def read_page(self, handle: OpenPage, off: int, size: int) -> bytes:
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
                    raise NoSuchNode(handle.key)
                # A new page, empty: zeros for its creator, and for everyone once the
                # creator has closed it (its store lands at release).
                page = bytes(self.page_size)
            handle.loaded = page
        return handle.loaded[off : off + size]

    async def write_page(self, handle: OpenPage, off: int, buf: bytes) -> int:
        if off + len(buf) > self.page_size:
            raise PastPage(handle.key)
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

    async def flush_page(self, handle: OpenPage) -> None:
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
                self._forget_creating(handle.key)
                self._page_gone(handle.key)
                raise StoreRejected(str(handle.key))
            self._closed_creations.add(handle.key)

    async def release_page(self, handle: OpenPage) -> None:
        """The last close of a page file: a created page is stored (zeros) now."""
        try:
            await self._store_pending(handle)
        finally:
            self._stop_creating(handle)

    async def fallocate_page(self, handle: OpenPage, mode: int, off: int, end: int) -> None:
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
        await self._store(key, page[:off] + bytes(end - off) + page[end:])
