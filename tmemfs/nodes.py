"""What each inode of the tree is, the table that numbers them, and what the tree refuses.

A node is a value (its kind and key), so the same path always gets the same
inode number while the kernel remembers it, and a pool made anew under an old name
is found again at the same number. Whether a node exists is never stored here: it
is asked of the engine each time.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from tmemfs.engine import PageKey, PoolId


class Kind(enum.Enum):
    ROOT = "root"
    STATS = "stats"
    DAEMON = "daemon"
    FRONTSWAP = "frontswap"
    CLEANCACHE = "cleancache"
    POOL = "pool"
    POOL_STATS = "pool-stats"
    POOL_MAX = "pool-max"  # .max: the pool's own limit, writable by its owner
    POOL_WEIGHT = "pool-weight"  # .weight: its weight in eviction and writeback
    OBJECT = "object"
    PAGE = "page"
    IMAGE = "image"
    STAGED = "staged"  # `.N.XXXXXX`: a copy of page N coming in (rsync's temporary file)


class Node(NamedTuple):
    """One place in the tree. `pool`, `object` and `index` are set where they apply.

    `generation` is that of the pool (pool, .stats, image) or of the object (object,
    page) the node belongs to. The kernel marks a removed directory's inode dead, so a
    pool made anew under an old name must get new inode numbers, never the old ones.
    """

    kind: Kind
    pool: PoolId | None = None
    object: str | None = None
    index: int | None = None
    generation: int = 0
    name: str | None = None  # a staged file's own name

    @property
    def page_key(self) -> PageKey:
        assert self.pool is not None and self.object is not None and self.index is not None
        return PageKey(self.pool, self.object, self.index)


ROOT = Node(Kind.ROOT)
STATS = Node(Kind.STATS)
DAEMON = Node(Kind.DAEMON)
FRONTSWAP = Node(Kind.FRONTSWAP)
CLEANCACHE = Node(Kind.CLEANCACHE)
# The root's inode number in the FUSE protocol (FUSE_ROOT_ID, pyfuse3.ROOT_INODE).
ROOT_INODE = 1
_FIXED = {
    ROOT_INODE: ROOT,
    ROOT_INODE + 1: STATS,
    ROOT_INODE + 2: FRONTSWAP,
    ROOT_INODE + 3: CLEANCACHE,
    ROOT_INODE + 4: DAEMON,
}


class InodeTable:
    """Inode numbers for nodes, kept while the kernel holds a lookup count on them."""

    def __init__(self) -> None:
        self._nodes: dict[int, Node] = dict(_FIXED)
        self._inodes: dict[Node, int] = {node: ino for ino, node in _FIXED.items()}
        self._lookups: dict[int, int] = {}
        self._next = max(_FIXED) + 1

    def node(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def inode(self, node: Node) -> int:
        """The number of a node, allocated on first use."""
        ino = self._inodes.get(node)
        if ino is None:
            ino = self._inodes[node] = self._next
            self._nodes[ino] = node
            self._next += 1
        return ino

    def known(self, node: Node) -> int | None:
        """The number of a node the kernel holds (so may have cached), else None."""
        ino = self._inodes.get(node)
        if ino is None or not (ino in _FIXED or ino in self._lookups):
            return None
        return ino

    def remember(self, inode: int) -> None:
        """The kernel was handed this inode (lookup, create, mkdir, readdirplus)."""
        if inode not in _FIXED:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, count: int) -> None:
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return
        self._lookups.pop(inode, None)
        node = self._nodes.get(inode)
        if node is not None and inode not in _FIXED:
            del self._nodes[inode]
            del self._inodes[node]

    def __len__(self) -> int:
        return len(self._nodes)


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
