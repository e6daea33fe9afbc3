"""The tree model of tmemfs(5): which nodes exist, what they are, who may change them.

Like borg's vfs.py, it knows no FUSE: the adapter (fs.py) hands it inode numbers,
names, callers' ids and open files, and turns its answers into replies and its
refusals (tmemfs.nodes: NoSuchNode, NotPermitted, ...) into errnos. Here are the
tree's rules: what a name in a directory means, which nodes exist (asked of the
engine each time), their attributes (mode, owner, size, times, blocks), who may
chmod, chown or write a control file, what mkdir, rmdir, unlink, create, open and
rename may do where, and which cached names go when the engine drops pages. What
reading and writing an open page file does is tmemfs.pagefiles; an image's bytes are
tmemfs.image. No tmem rule is decided here: the engine decides what is stored,
loaded, evicted or refused.
"""

from __future__ import annotations

import logging
import re
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tmemfs.engine import (
    SWAP_OBJECT,
    BadName,
    BadValue,
    Engine,
    Owner,
    PageKey,
    PoolId,
    PoolKind,
    parse_decimal,
    parse_name,
)
from tmemfs.engine import stats as statsfmt
from tmemfs.engine.pool import Pool, TmemObject
from tmemfs.nodes import (
    CLEANCACHE,
    DAEMON,
    FRONTSWAP,
    STATS,
    AccessDenied,
    InodeTable,
    IsDirectory,
    Kind,
    Node,
    NodeExists,
    NoSuchNode,
    NotDirectory,
    NotPermitted,
)
from tmemfs.pagefiles import OpenPage, OpenStaged, PageFiles
from tmemfs.sizes import format_limit, parse_limit

log = logging.getLogger(__name__)


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


# -- open files that are not page files ---------------------------------------------------


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
        daemon_counters: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.engine = engine
        # Tells the kernel to drop cached names (None when no kernel is listening).
        self.forget_names = forget_names
        engine.on_gone = self.gone
        self.page_size = engine.page_size
        # What `.daemon` shows: pid, version, options; `tmemfs umount` reads the pid.
        self.daemon_info = daemon_info or {}
        # What `.daemon` shows after it, read when it is opened: the FUSE side's counters.
        self._daemon_counters = daemon_counters
        # Called once, when the first image is made (the daemon locks its memory then).
        self._on_first_image = on_first_image
        self.inodes = InodeTable()
        # Open page files, created pages not stored yet, and rsync's staged copies.
        self.files = PageFiles(engine, on_abandoned=self._page_gone)
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
            return node in self.files.staged
        key = node.page_key
        return self.engine.entry(key) is not None or self.files.creating(key)

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

    def _refreshes(self, directory: Node) -> bool:
        """Whether `refresh_shared` of this directory waits on the remote."""
        return (
            directory.kind in (Kind.POOL, Kind.OBJECT)
            and directory.pool is not None
            and self.engine.refreshes_shared(directory.pool)
        )

    async def lookup(self, parent: Node, name: bytes) -> Node:
        """The existing node `name` in `parent`."""
        await self.refresh_shared(parent)
        return self._existing(parent, name)

    def lookup_now(self, parent: Node, name: bytes) -> Node | None:
        """`lookup` without waiting; None when it must wait: in a shared pool on a remote
        backend, whose contents are asked of the remote first."""
        if self._refreshes(parent):
            return None
        return self._existing(parent, name)

    def _existing(self, parent: Node, name: bytes) -> Node:
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
        indexes.update(self.files.creating_indexes(node.pool, obj))
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
        if indexes is None and self.files.staged:
            self.files.drop_staged(pid, tobj.name if tobj is not None else None)
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
            staged = self.files.staged[node]
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
            return self.files.staged[node].owner
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
            counters = self._daemon_counters() if self._daemon_counters is not None else {}
            return statsfmt.render(dict(self.daemon_info) | counters)
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
            self.files.truncate_staged(node, size)
        elif node.kind is Kind.PAGE:
            page_file = open_file if isinstance(open_file, OpenPage) else None
            await self.files.truncate(node.page_key, size, page_file)
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
        made = self.create_now(parent, name, owner, exclusive, truncate)
        if made is not None:
            return made
        # Only an image waits: it is made, or truncated, by the engine.
        return await self._create_image(self.child(parent, name), owner, exclusive, truncate)

    def create_now(
        self, parent: Node, name: bytes, owner: Owner, exclusive: bool, truncate: bool
    ) -> tuple[Node, OpenFile] | None:
        """`create` without waiting: a page or a staged copy; None for an image."""
        if parent.kind is Kind.OBJECT or (
            parent.kind is Kind.POOL and parent.pool and parent.pool.kind is PoolKind.PERSISTENT
        ):
            if name == _STATS_NAME or name in _CONTROLS:
                raise NodeExists(name)
            node = self.child(parent, name)
            if node.kind is Kind.STAGED:
                return node, self.files.create_staged(node, owner, exclusive, truncate)
        elif parent.kind is Kind.FRONTSWAP and name.endswith(IMAGE_SUFFIX):
            return None
        else:
            raise NotPermitted(name)
        key = node.page_key
        if self.engine.entry(key) is not None and exclusive:
            raise NodeExists(name)
        return node, self.files.open_created(key)

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

    async def open(self, inode: int, writable: bool, truncate: bool, caller_uid: int) -> OpenFile:
        """open(2) of an existing node (or of a page that went since its lookup)."""
        handle = self.open_now(inode, writable, truncate, caller_uid)
        if handle is not None:
            return handle
        # Only an image opened to be truncated waits: the engine empties it.
        node = self.node(inode)
        assert node.kind is Kind.IMAGE and node.pool is not None
        await self.engine.resize_image(node.pool, 0)
        return OpenImage(node.pool)

    def open_now(
        self, inode: int, writable: bool, truncate: bool, caller_uid: int
    ) -> OpenFile | None:
        """`open` without waiting; None for an image opened to be truncated."""
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
            return self.files.open_created(vanished.page_key)
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
            return None if writable and truncate else OpenImage(node.pool)
        if node.kind is Kind.STAGED:
            if writable and truncate:
                self.files.staged[node].data.clear()
            return OpenStaged(node)
        if node.kind is Kind.PAGE:
            return self.files.open(node.page_key, writable, truncate)
        raise IsDirectory(node)

    async def unlink(self, parent: Node, name: bytes) -> None:
        """Unlink of a page invalidates it; of an image, removes the view (not the pages)."""
        node = self.named(parent, name)
        if node.kind is Kind.PAGE:
            key = node.page_key
            created = self.files.forget_creating(key)
            self._unlinking = node
            try:
                if not await self.engine.invalidate_page(key) and not created:
                    raise NoSuchNode(name)
            finally:
                self._unlinking = None
        elif not self.exists(node):
            raise NoSuchNode(name)
        elif node.kind is Kind.STAGED:
            del self.files.staged[node]
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
        await self.files.store_staged(node, target.page_key)
