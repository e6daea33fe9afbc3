"""Inspection: what a page costs, and the counters of a pool and of the whole mount.

Read-only views of an engine for `stat` (st_blocks), the `.stats` and `stats` files
and the metrics exporter; nothing here changes what is stored. Counter names are
zswap's and zram's (tmemfs/engine/stats.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tmemfs.engine.budget import ENTRY_OVERHEAD
from tmemfs.engine.handles import held_here, in_tier
from tmemfs.engine.keys import PoolId
from tmemfs.engine.pool import Entry

if TYPE_CHECKING:
    from tmemfs.engine.engine import Engine
    from tmemfs.engine.pool import Pool


def page_cost(engine: Engine, entry: Entry) -> float:
    """Compressed bytes charged to one page; what st_blocks reports."""
    handle = entry.handle
    if held_here(handle):
        return engine.backend.payload_share(handle)
    return handle.size if in_tier(handle) else 0


def _int_handles(engine: Engine, pool: Pool) -> bytes | None:
    """Every handle of the pool as native int64s, when each is the backend's own int (the
    compiled store's record, a remote payload's size) and the backend sums them in one
    call; None when some are not (a tier's, a lost page's): then they are looked at
    one by one."""
    backend = engine.backend
    if not (backend.batches or backend.stores_runs) or engine.writeback is not None:
        return None
    try:
        return b"".join(tobj.pages.handle_bytes() for tobj in pool.objects.values())
    except TypeError:
        return None


def pool_stats(engine: Engine, pool_id: PoolId) -> dict[str, int]:
    """A pool's counters. The gauges are summed over its pages when asked."""
    pool = engine.pool(pool_id)
    backend = engine.backend
    stored = same = shared = recompressed = 0
    compressed = here = 0.0
    handles = _int_handles(engine, pool)
    if handles is not None:
        # One call sums them, over native int64s from the page tables (a 1 GiB image's
        # 262,144 pages in 5 ms; a list of Python ints took 42 ms, a Python loop most of
        # a second: an image's every lookup and stat asks this).
        stored = len(handles) // 8
        same, shared, compressed, recompressed = backend.summarize(handles)
        here = 0 if backend.remote else compressed
    else:
        for tobj in pool.objects.values():
            for entry in tobj.pages.values():
                handle = entry.handle
                stored += 1
                cost = page_cost(engine, entry)
                compressed += cost
                if held_here(handle):
                    same += backend.is_same_filled(handle)
                    shared += backend.is_shared(handle)
                    recompressed += backend.is_recompressed(handle)
                    if not backend.remote:
                        here += cost
    # What this process holds for the pool: payloads kept here, and the index.
    total = round(here) + stored * ENTRY_OVERHEAD
    if stored and not backend.remote:
        # The pool's share of per-handle overhead, pro rata by pages.
        overhead = backend.memory_used() - backend.stats()["compr_data_size"]
        total += round(overhead * stored / max(engine._index.pages, 1))
    totals = backend.stats()
    gauges = {
        "stored_pages": stored,
        "orig_data_size": stored * engine.page_size,
        "compr_data_size": round(compressed),
        "pool_total_size": total,
        "same_filled_pages": same,
        "dedup_pages": shared,
        "recompressed_pages": recompressed,
        # The pool's share of what recompression saves, pro rata by its pages.
        "recompress_saved_bytes": _share(
            totals.get("recompress_saved_bytes", 0),
            recompressed,
            totals.get("recompressed_pages", 0),
        ),
    }
    return gauges | pool.counters


def engine_stats(engine: Engine) -> dict[str, int]:
    """Global counters: gauges of the whole backend, events summed over all pools ever."""
    backend = engine.backend.stats()
    pages = engine._index.pages
    gauges = {
        "stored_pages": pages,
        "orig_data_size": pages * engine.page_size,
        "compr_data_size": backend["compr_data_size"],
        "pool_total_size": engine.pool_total_size(),
        "same_filled_pages": backend["same_filled_pages"],
        "dedup_pages": backend["dedup_pages"],
        "recompressed_pages": backend.get("recompressed_pages", 0),
        "recompress_saved_bytes": backend.get("recompress_saved_bytes", 0),
    }
    codecs = {name: value for name, value in backend.items() if name.startswith("codec_")}
    return (
        gauges
        | engine.counters
        | codecs
        | {
            "max_pool_size": engine.max_pool,
            "page_size": engine.page_size,
            "pools": len(engine.pools),
            # What the page index really holds (pool_total_size charges ENTRY_OVERHEAD a page).
            "index_size": engine.index_size,
        }
    )


def _share(total: int, part: int, whole: int) -> int:
    return round(total * part / whole) if whole else 0


__all__ = ["engine_stats", "page_cost", "pool_stats"]
