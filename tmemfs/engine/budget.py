"""The budget and the fair shares: what may be held, and whose pages make room.

Three limits bound what a pool keeps here: the mount's budget (--max-pool, every
pool's pages and the index together), the pool's own limit (`.max`) and its owner's
(--max-pool-per-user, for pools not owned by root). Room is made by evicting
cleancache pages, and across pools by weight (`.weight`): the pools furthest over
their weighted share lose their oldest pages first, as Xen tmem's client_over_quota.

`Budget` answers "does this fit, after evicting what may be evicted?"; whether a page
is then kept, sent down to the tier or refused is decided in `Engine._admit`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from tmemfs._pagetable import PAGE_BYTES
from tmemfs.engine.errors import BadValue
from tmemfs.engine.keys import PoolId
from tmemfs.engine.pool import Pool
from tmemfs.sizes import format_size

# What one page costs the index (tmemfs/_pagetable.pyx) in a full leaf of 32 pages, as
# the budget and the limits charge it: a fixed cost per page keeps them exact and the
# same whichever page goes first. Swap areas and files are dense runs, so this is what
# the index really holds within a leaf a run; `index_size` in the stats is the real
# figure (a sparse object costs up to a leaf, 288 bytes, for its first page).
ENTRY_OVERHEAD = PAGE_BYTES
# The range of `.weight`, and its default, as cgroup v2's cpu.weight.
MIN_WEIGHT, DEFAULT_WEIGHT, MAX_WEIGHT = 1, 100, 10000


class Budget:
    """The mount's budget and the pools' limits, over the engine's pools.

    `total` tells what the mount holds now; `evict` drops the least recently used page
    of a cleancache pool. `reserved` counts bytes admitted but not yet kept (a batch is
    admitted whole, then kept), so that the pages of one batch do not all count the
    same free room.
    """

    def __init__(
        self,
        pools: Mapping[PoolId, Pool],
        *,
        max_pool: int,
        max_pool_per_user: int | None,
        total: Callable[[], int],
        evict: Callable[[Pool], None],
    ) -> None:
        self.pools = pools
        self.max_pool = max_pool
        # What the pools of one non-root owner may hold together (None: no such limit).
        self.max_pool_per_user = max_pool_per_user
        self.reserved = 0
        self._total = total
        self._evict = evict

    def fits(self, cost: int) -> bool:
        """Whether `cost` more bytes fit the budget as it is, evicting nothing."""
        return self._total() + self.reserved + cost <= self.max_pool

    def make_room(self, cost: int) -> bool:
        """Fit `cost` more bytes in the budget, evicting cleancache pages (pools over
        their weighted share first); False if even evicting them all would not do."""
        while self._total() + self.reserved + cost > self.max_pool:
            victim = pick_victim(self.pools.values())
            if victim is None:
                return False
            self._evict(victim)
        return True

    def make_room_within_limits(self, pool: Pool, cost: int) -> str | None:
        """Fit `cost` more bytes under the pool's limit and its owner's, evicting their
        own cleancache pages if need be; which limit refuses it, or None if it fits."""
        if pool.max_size is not None:
            while pool.charged + pool.reserved + cost > pool.max_size:
                if pool.persistent or not pool.order:
                    return f"{pool.id}/.max {format_size(pool.max_size)}"
                self._evict(pool)
        per_user = self.user_limit(pool)
        if per_user is not None:
            theirs = [p for p in self.pools.values() if p.owner.uid == pool.owner.uid]
            while sum(p.charged + p.reserved for p in theirs) + cost > per_user:
                victim = pick_victim(theirs)
                if victim is None:
                    return f"--max-pool-per-user {format_size(per_user)} of uid {pool.owner.uid}"
                self._evict(victim)
        return None

    def limit_refusing(self, pool: Pool, cost: int) -> str | None:
        """Which limit of the pool or its owner `cost` more bytes would break, if any
        (without evicting: the image path's one check per batch)."""
        if pool.max_size is not None and pool.charged + pool.reserved + cost > pool.max_size:
            return f"{pool.id}/.max"
        per_user = self.user_limit(pool)
        if (
            per_user is not None
            and cost
            + sum(
                p.charged + p.reserved for p in self.pools.values() if p.owner.uid == pool.owner.uid
            )
            > per_user
        ):
            return "--max-pool-per-user"
        return None

    def user_limit(self, pool: Pool) -> int | None:
        """--max-pool-per-user, for pools not owned by root (root's are bound by --max-pool
        and their own .max only: swap set up by the administrator is not a user's)."""
        return None if pool.owner.uid == 0 else self.max_pool_per_user

    def reserve(self, pool: Pool, cost: int) -> None:
        """Count bytes admitted for a pool until they are kept (or not): see `release`."""
        self.reserved += cost
        pool.reserved += cost

    def release(self, pool: Pool, cost: int) -> None:
        self.reserved -= cost
        pool.reserved -= cost

    def shares(self, pool: Pool) -> dict[str, int | None]:
        """A pool's limits, weight and what they count (see Engine.pool_shares)."""
        kin = [p for p in self.pools.values() if p.persistent == pool.persistent]
        held = sum(p.charged for p in kin)
        return {
            "max_size": pool.max_size,
            "user_max_size": self.user_limit(pool),
            "weight": pool.weight,
            "charged_size": pool.charged,
            "weighted_share": held * pool.weight // max(sum(p.weight for p in kin), 1),
        }


def check_weight(pool_id: PoolId, weight: int) -> None:
    """BadValue unless `weight` is in MIN_WEIGHT..MAX_WEIGHT."""
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise BadValue(f"{pool_id}/.weight: {weight} not in {MIN_WEIGHT}..{MAX_WEIGHT}")


def pick_victim(pools: Iterable[Pool]) -> Pool | None:
    """The cleancache pool to evict from: of those over their weighted share of what the
    pools hold (as Xen tmem's client_over_quota), the one whose oldest page is oldest;
    if none is over, the oldest page of all. None when none of them holds a page."""
    pools = [p for p in pools if not p.persistent]
    held = [p for p in pools if p.order]
    if not held:
        return None
    total_weight = sum(p.weight for p in pools)
    total = sum(p.charged for p in held)
    over = [p for p in held if p.charged * total_weight > total * p.weight] or held
    return min(over, key=lambda p: next(iter(p.order.values())))


__all__ = [
    "DEFAULT_WEIGHT",
    "ENTRY_OVERHEAD",
    "MAX_WEIGHT",
    "MIN_WEIGHT",
    "Budget",
    "check_weight",
    "pick_victim",
]
