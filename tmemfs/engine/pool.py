"""Pools and objects: the index of what is stored, and who owns it."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from tmemfs.engine.keys import SWAP_OBJECT, PageKey, PoolId, PoolKind, is_shared_pool_name
from tmemfs.engine.stats import new_counters

try:
    from tmemfs._pagetable import Entry, IndexMemory, PageTable
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        f"tmemfs: the compiled page index is missing ({exc}); reinstall with `pip install -e .`"
    ) from None


@dataclass(slots=True)
class Owner:
    """Who created a pool or object, and the mode it was given (mkdir's mode minus umask)."""

    uid: int = 0
    gid: int = 0
    mode: int = 0o755
    ctime_ns: int = field(default_factory=time.time_ns)


def _next_generation() -> int:
    """Every pool and object made gets a new generation, so one made anew under an old
    name is told apart from its predecessor: by inode numbers here, and by the keys of
    its pages in Redis, where generations of other mounts and earlier runs live too;
    hence random, not counted."""
    return secrets.randbits(62) | 1


@dataclass(slots=True)
class TmemObject:
    """A cleancache object (an inode key), or the single object of a frontswap pool."""

    owner: Owner
    name: str
    # The compiled index of its pages (9-10 bytes a page; tmemfs/_pagetable.pyx).
    pages: PageTable
    generation: int = field(default_factory=_next_generation)


@dataclass(slots=True)
class Pool:
    """A frontswap (persistent) or cleancache (ephemeral) pool."""

    id: PoolId
    owner: Owner
    objects: dict[str, TmemObject] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=new_counters)
    # The size of the pool's block image (frontswap/N.img), or None when it has none.
    image_size: int | None = None
    generation: int = field(default_factory=_next_generation)
    # A plain field, not a property: it is asked for every page of every request.
    persistent: bool = False
    # Its fair share (`.max`, `.weight`): a limit of its own (None: none), and the weight
    # that steers eviction and writeback across pools, as Xen tmem weighed its clients.
    max_size: int | None = None
    weight: int = 100
    # Bytes its pages hold here, as the limits count them (`charged_size`), and bytes
    # admitted but not yet kept.
    charged: int = 0
    reserved: int = 0
    # Its pages in eviction order (cleancache, least recently used first) or writeback
    # order (frontswap, coldest first); the value is the engine's tick of the last use,
    # so the oldest page of several pools can be found.
    order: OrderedDict[PageKey, int] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.persistent = self.id.kind is PoolKind.PERSISTENT

    @property
    def shared(self) -> bool:
        """A cleancache pool named by a UUID (init_shared_fs); frontswap pools never are."""
        return not self.persistent and is_shared_pool_name(self.id.name)

    def page_count(self) -> int:
        return sum(len(obj.pages) for obj in self.objects.values())

    @classmethod
    def create(cls, pool_id: PoolId, owner: Owner, index_memory: IndexMemory) -> Pool:
        pool = cls(pool_id, owner)
        if pool.persistent:
            pool.objects[SWAP_OBJECT] = TmemObject(owner, SWAP_OBJECT, PageTable(index_memory))
        return pool


__all__ = ["Entry", "IndexMemory", "Owner", "PageTable", "Pool", "TmemObject"]
