"""What an index entry's handle is, and the few questions the engine asks of it.

A page's handle says where its data is:

- a backend's handle (`BackendHandle`): the page is held by the backend of this
  mount, in this process (lz4: the compiled store's record id; raw: the page's bytes)
  or remotely (redis: the payload's size, the data being under the page's location);
- `Lowered`: the page was moved down to the writeback tier, which holds its payload;
- `LOST`: a persistent page whose store no longer has it; loading it is EIO.

Ask these questions through `held_here`, `in_tier` and `is_lost`, never by testing
the marker classes in place: they are the whole of what the engine needs to know.
"""

from __future__ import annotations

from typing import TypeAlias, TypeGuard


class Lowered:
    """The handle of a page that lives in the writeback tier: what it costs there."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class Lost:
    """The handle of a persistent page the remote backend no longer has (EIO on load)."""

    __slots__ = ()


LOST = Lost()

# What a backend hands out for a page it keeps: the compiled store's record id or a
# remote payload's size (int), or the page itself (bytes, the raw backend).
BackendHandle: TypeAlias = int | bytes
# What an index entry holds.
Handle: TypeAlias = BackendHandle | Lowered | Lost


def held_here(handle: Handle) -> TypeGuard[BackendHandle]:
    """Whether the mount's backend holds the page (so it is charged, and invalidated
    when released); False for a page moved down to the tier or lost."""
    return not isinstance(handle, Lowered | Lost)


def in_tier(handle: Handle) -> TypeGuard[Lowered]:
    """Whether the page was moved down to the writeback tier."""
    return isinstance(handle, Lowered)


def is_lost(handle: Handle) -> TypeGuard[Lost]:
    """Whether the page is lost: its store no longer has it."""
    return isinstance(handle, Lost)


__all__ = ["LOST", "BackendHandle", "Handle", "Lost", "Lowered", "held_here", "in_tier", "is_lost"]
