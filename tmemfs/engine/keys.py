"""Names and keys: how the tree's path components become tmem keys.

The rules are the contract's section 1: type, offset and index names are decimal
integers without leading zeros; pool and object names in cleancache are 1-255 bytes
of [A-Za-z0-9._-] not starting with a dot.
"""

from __future__ import annotations

import enum
import re
import uuid
from typing import NamedTuple

from tmemfs.engine.errors import BadName

_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,18}")
_NAME = re.compile(rb"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
# Offsets are kept below 2**63 so they always fit a signed 64-bit file offset.
MAX_INDEX = 2**63 - 1


class PoolKind(enum.Enum):
    """frontswap pools are persistent; cleancache pools are ephemeral."""

    PERSISTENT = "frontswap"
    EPHEMERAL = "cleancache"


class PoolId(NamedTuple):
    """A pool: its kind and its name (the swap type for frontswap, a name for cleancache)."""

    kind: PoolKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.name}"


# frontswap pools hold a single object; its name is the empty string.
SWAP_OBJECT = ""


class PageKey(NamedTuple):
    """One page: (pool, object, index); for frontswap (type, "", offset)."""

    pool: PoolId
    object: str
    index: int


def parse_decimal(name: bytes) -> int:
    """A swap type, offset or page index; BadName if it is not canonical decimal."""
    if not _DECIMAL.fullmatch(name) or int(name) > MAX_INDEX:
        raise BadName(name)
    return int(name)


def parse_name(name: bytes) -> str:
    """A cleancache pool or object name; BadName if it breaks the naming rule."""
    if not _NAME.fullmatch(name):
        raise BadName(name)
    return name.decode("ascii")


def is_shared_pool_name(name: str) -> bool:
    """A cleancache pool named by a UUID is shared (cleancache init_shared_fs)."""
    try:
        return str(uuid.UUID(name)) == name.lower() and len(name) == 36
    except ValueError:
        return False
