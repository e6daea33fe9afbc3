"""Page stores: places that keep encoded payloads by name, outside this process's RAM.

The redis backend keeps every page in one; a writeback tier (--writeback) keeps the
pages that the local pool moved down. A store never decides what is kept: that is the
engine's job. It only puts, gets and deletes, in batches, and says when it cannot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple


class Location(NamedTuple):
    """Where a page lives in a store.

    `generation` is that of the page's pool or object: a pool flushed and made anew
    gets new locations, so its old pages can be deleted in the background and never
    come back.
    """

    pool: str
    generation: int
    object: str
    index: int


class StoreUnavailable(Exception):
    """The store cannot do what was asked now (unreachable, out of memory, disk full)."""


class PageStore(ABC):
    """Encoded payloads by Location, in batches."""

    #: For logs and stats: what and where (secrets masked).
    description: str = ""

    async def open(self) -> None:  # noqa: B027 - optional
        """Connect or create files; StoreUnavailable if it cannot."""

    @abstractmethod
    async def put_many(self, items: Sequence[tuple[Location, bytes]]) -> None:
        """Keep every payload, replacing what was there; StoreUnavailable if not all were kept."""

    @abstractmethod
    async def get_many(self, locations: Sequence[Location]) -> list[bytes | None]:
        """The payloads, in order; None where the store has nothing at that location."""

    @abstractmethod
    async def delete_many(self, locations: Sequence[Location]) -> None:
        """Forget the payloads; locations holding nothing are ignored."""

    async def close(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""

    def memory_used(self) -> int:
        """Bytes of this process's RAM the store uses for its own bookkeeping."""
        return 0
