"""The tmem engine: pools, keys, semantics, budget and statistics. No FUSE here.

Start at engine.py: `Engine` runs every tmem operation, and `Engine._admit` is where
a store is decided. The modules beside it are named by what they do there.
"""

from tmemfs.engine.engine import ENTRY_OVERHEAD, Engine
from tmemfs.engine.errors import (
    BadName,
    BadValue,
    NoSuchObject,
    NoSuchPool,
    PageLost,
    PoolExists,
    StoreRejected,
    TmemError,
)
from tmemfs.engine.keys import (
    SWAP_OBJECT,
    PageKey,
    PoolId,
    PoolKind,
    is_shared_pool_name,
    parse_decimal,
    parse_name,
)
from tmemfs.engine.pool import Entry, Owner, Pool, TmemObject

__all__ = [
    "ENTRY_OVERHEAD",
    "SWAP_OBJECT",
    "BadName",
    "BadValue",
    "Engine",
    "Entry",
    "NoSuchObject",
    "NoSuchPool",
    "Owner",
    "PageKey",
    "PageLost",
    "Pool",
    "PoolExists",
    "PoolId",
    "PoolKind",
    "StoreRejected",
    "TmemError",
    "TmemObject",
    "is_shared_pool_name",
    "parse_decimal",
    "parse_name",
]
