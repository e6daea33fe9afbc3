"""Copies of pages outside this process: where they live, and deleting them.

A page held by a remote backend (redis) or moved down to the writeback tier has a
copy there under its `Location`. When the index lets go of such a page (invalidated,
replaced, evicted), that copy must go too: at once, or, when the page was let go of
in the middle of a pool's mutation (an eviction, a replaced page in the tier), once
the mutation is done. `CopiesElsewhere` keeps those deferred deletes; the engine runs
them at the end of each mutation (`Engine._mutating`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tmemfs.backends.base import Backend
from tmemfs.backends.store import Location, PageStore, StoreUnavailable
from tmemfs.engine.handles import in_tier
from tmemfs.engine.keys import PageKey
from tmemfs.engine.pool import Entry, Pool, TmemObject

log = logging.getLogger(__name__)


def location_of(pool: Pool, tobj: TmemObject, index: int) -> Location:
    """Where a page lives outside this process: named by its pool's or object's generation.

    Every mount of a shared pool names its pages alike, so they have no generation.
    """
    generation = pool.generation if pool.persistent else tobj.generation
    if pool.shared:
        generation = 0
    return Location(str(pool.id), generation, tobj.name, index)


def locations_of(pool: Pool, tobj: TmemObject, indexes: Sequence[int]) -> list[Location]:
    """The locations of many pages of one object: the name is worked out once."""
    name, generation, obj, _ = location_of(pool, tobj, 0)
    return [Location(name, generation, obj, index) for index in indexes]


class CopiesElsewhere:
    """Deletes the remote backend's and the writeback tier's copies of released pages,
    now or once the current mutation of a pool is done."""

    def __init__(self, backend: Backend, tier: PageStore | None) -> None:
        self.backend = backend
        self.tier = tier
        # Copies to delete once the pool's current mutation is done.
        self._remote: list[Location] = []
        self._tier: list[Location] = []

    async def delete(
        self,
        pool: Pool,
        tobj: TmemObject,
        gone: Sequence[tuple[PageKey, Entry]],
        *,
        remote: bool = True,
    ) -> None:
        """Delete what released pages left outside this process: in the tier, remotely
        (`remote=False`: the remote copies stay, as a shared pool's do for other mounts)."""
        lowered = [k.index for k, e in gone if in_tier(e.handle)]
        if remote and self.backend.remote:
            elsewhere = [k.index for k, e in gone if not in_tier(e.handle)]
            await self.forget_remote(locations_of(pool, tobj, elsewhere))
        if lowered:
            await self._delete_from_tier(locations_of(pool, tobj, lowered))

    async def forget_remote(self, locations: Sequence[Location]) -> None:
        """Delete remote copies; if the remote cannot, the index has forgotten them anyway."""
        if not self.backend.remote or not locations:
            return
        try:
            await self.backend.delete_many(locations)
        except StoreUnavailable as exc:
            log.warning("could not delete %d remote pages: %s", len(locations), exc)

    async def _delete_from_tier(self, locations: Sequence[Location]) -> None:
        assert self.tier is not None
        try:
            await self.tier.delete_many(locations)
        except StoreUnavailable as exc:
            log.warning("could not delete %d pages from the tier: %s", len(locations), exc)

    def defer_remote(self, locations: Sequence[Location]) -> None:
        """Delete these remote copies once the current mutation is done."""
        self._remote.extend(locations)

    def defer_tier(self, location: Location) -> None:
        """Delete this copy in the tier once the current mutation is done."""
        self._tier.append(location)

    def about_to_write(self, locations: Sequence[Location]) -> None:
        """A location about to be written must not be deleted after the write."""
        if not (self._remote or self._tier):
            return
        written = set(locations)
        self._remote = [x for x in self._remote if x not in written]
        self._tier = [x for x in self._tier if x not in written]

    async def flush(self) -> None:
        """Run the deferred deletes (at the end of a pool's mutation)."""
        remote, self._remote = self._remote, []
        tier, self._tier = self._tier, []
        await self.forget_remote(remote)
        if tier and self.tier is not None:
            await self._delete_from_tier(tier)


__all__ = ["CopiesElsewhere", "location_of", "locations_of"]
