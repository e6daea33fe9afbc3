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
from tmemfs.engine.pool import Entry, Pool

if TYPE_CHECKING:
    from tmemfs.backends.base import Backend
    from tmemfs.engine.engine import Engine


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
    """A pool's counters. The gauges are summed over its pages when asked (over the
    other pools' pages when it holds most of them: see `_compiled_gauges`)."""
    pool = engine.pool(pool_id)
    backend = engine.backend
    stored = same = shared = recompressed = 0
    compressed = here = 0.0
    if backend.batches and engine.writeback is None:
        # The compiled store: its own counters are sums over every page.
        stored = pool.page_count()
        same, shared, compressed, recompressed = _compiled_gauges(engine, pool, stored)
        here = compressed
    elif (handles := _int_handles(engine, pool)) is not None:
        # A remote backend's payload sizes: one call sums them, over native int64s from
        # the page tables (an image's every lookup and stat asks this).
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


def _compiled_gauges(engine: Engine, pool: Pool, stored: int) -> tuple[int, int, float, int]:
    """(same-filled pages, shared pages, payload bytes charged, pages in zstd) of a pool
    whose every handle is the compiled store's.

    The store's own counters are these sums over every stored page (a shared payload
    split among its references adds up to the payload once), so a pool holding most of
    the pages gets them as what the other pools leave: reading the `.stats` or `stat` of
    a 10^6-page swap image costs the other pools' pages, not its own (it took 20 ms, and
    every request waited)."""
    backend = engine.backend
    if stored * 2 <= engine._index.pages:
        return _summarize(backend, [pool])
    same, shared, compressed, recompressed = _summarize(
        backend, [other for other in engine.pools.values() if other is not pool]
    )
    totals = backend.stats()
    return (
        totals["same_filled_pages"] - same,
        totals["dedup_pages"] - shared,
        max(totals["compr_data_size"] - compressed, 0.0),
        totals["recompressed_pages"] - recompressed,
    )


def _summarize(backend: Backend, pools: list[Pool]) -> tuple[int, int, float, int]:
    """The sums over the pools' pages, in one compiled call over native int64s from the
    page tables (262,144 pages in 5 ms; a list of Python ints took 42 ms, a Python loop
    most of a second)."""
    handles = b"".join(tobj.pages.handle_bytes() for p in pools for tobj in p.objects.values())
    if not handles:
        return 0, 0, 0.0, 0
    return backend.summarize(handles)


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
    # Mount-wide only: loads of pages held in zstd (no pool owns a shared payload).
    reloads = (
        {"recompressed_loads": backend["recompressed_loads"]}
        if "recompressed_loads" in backend
        else {}
    )
    codecs = {name: value for name, value in backend.items() if name.startswith("codec_")}
    return (
        gauges
        | engine.counters
        | reloads
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
