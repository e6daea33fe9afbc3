"""A Prometheus endpoint (--metrics HOST:PORT), served from the trio thread.

prometheus_client's own server runs in a thread and would read the engine while the
trio thread changes it; here each scrape is rendered on the trio thread, between
requests, so it sees one consistent state. Names follow node_exporter's habits:
tmemfs_ prefix, units in names, _total for counters, one label for the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tmemfs.engine import Engine
from tmemfs.engine.stats import EVENT_COUNTERS, GAUGES

log = logging.getLogger(__name__)

_BYTES = {"orig_data_size", "compr_data_size", "pool_total_size"}
_HELP = {
    "stored_pages": "Pages stored now",
    "orig_data_size": "Bytes of the pages stored now, uncompressed",
    "compr_data_size": "Bytes of the pages stored now, compressed",
    "pool_total_size": "Bytes of memory this daemon holds for pages",
    "same_filled_pages": "Stored pages that are one repeated 8-byte word",
    "dedup_pages": "Stored pages that share their copy with another page",
    "recompressed_pages": "Stored pages recompressed in the background (zstd)",
    "recompress_saved_bytes": "Compressed bytes that background recompression saves now",
    "stores": "Pages stored",
    "loads": "Pages loaded",
    "load_misses": "Loads that found no page",
    "invalidates": "Pages invalidated (unlink, rmdir, replaced, exclusive gets)",
    "duplicate_entry": "Stores that replaced a stored page",
    "reject_compress_poor": "Stores refused for compressing poorly (--reject-poor)",
    "reject_alloc_fail": "Stores refused by the backend or tier (remote down or full)",
    "pool_limit_hit": "Stores refused because the budget, the pool's .max or its "
    "owner's --max-pool-per-user was full",
    "written_back_pages": "Pages moved down to the writeback tier",
    "evicted_pages": "Cleancache pages evicted to make room",
    "lost_pages": "Frontswap pages a remote backend no longer had",
}


def metric_name(counter: str) -> str:
    """The Prometheus name of a counter, with its unit."""
    if counter in _BYTES:
        return f"tmemfs_{counter}_bytes"
    return f"tmemfs_{counter}"


class EngineCollector(Collector):
    """Every counter of every pool, and the daemon's totals, at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        per_pool = {str(pid): engine.pool_stats(pid) for pid in engine.pools}
        for name in (*GAUGES, *EVENT_COUNTERS, "lost_pages"):
            help_text = _HELP.get(name, name)
            family: GaugeMetricFamily | CounterMetricFamily
            if name in GAUGES:
                family = GaugeMetricFamily(metric_name(name), help_text, labels=["pool"])
            else:
                family = CounterMetricFamily(metric_name(name), help_text, labels=["pool"])
            for pool, values in per_pool.items():
                family.add_metric([pool], values.get(name, 0))
            yield family
        shares = {str(pid): engine.pool_shares(pid) for pid in engine.pools}
        limit = GaugeMetricFamily(
            "tmemfs_pool_max_size_bytes",
            "A pool's own limit (.max); +Inf when it has none",
            labels=["pool"],
        )
        weight = GaugeMetricFamily(
            "tmemfs_pool_weight", "A pool's weight (.weight)", labels=["pool"]
        )
        charged = GaugeMetricFamily(
            "tmemfs_pool_charged_size_bytes",
            "Bytes a pool holds as its limits count them",
            labels=["pool"],
        )
        for pool, values in shares.items():
            max_size = values["max_size"]
            limit.add_metric([pool], float("inf") if max_size is None else max_size)
            weight.add_metric([pool], values["weight"] or 0)
            charged.add_metric([pool], values["charged_size"] or 0)
        yield from (limit, weight, charged)
        totals = engine.stats()
        yield GaugeMetricFamily(
            "tmemfs_max_pool_size_bytes",
            "The memory budget (--max-pool)",
            value=totals["max_pool_size"],
        )
        yield GaugeMetricFamily(
            "tmemfs_daemon_pool_total_size_bytes",
            "Bytes of memory this daemon holds for pages, all pools",
            value=totals["pool_total_size"],
        )
        yield GaugeMetricFamily("tmemfs_pools", "Pools that exist now", value=totals["pools"])
        per_user = engine.max_pool_per_user
        yield GaugeMetricFamily(
            "tmemfs_max_pool_per_user_bytes",
            "What one user's pools may hold (--max-pool-per-user); +Inf: no such limit",
            value=float("inf") if per_user is None else per_user,
        )
        codecs = sorted(
            {
                k[len("codec_") :].rsplit("_", 1)[0]
                for k in totals
                if k.startswith("codec_") and k.endswith("_pages")
            }
        )
        if codecs:
            pages = GaugeMetricFamily(
                "tmemfs_codec_pages", "Stored pages by codec", labels=["codec"]
            )
            sizes = GaugeMetricFamily(
                "tmemfs_codec_compr_data_size_bytes", "Compressed bytes by codec", labels=["codec"]
            )
            for codec in codecs:
                pages.add_metric([codec], totals.get(f"codec_{codec}_pages", 0))
                sizes.add_metric([codec], totals.get(f"codec_{codec}_data_size", 0))
            yield pages
            yield sizes
        if "recompressed_loads" in totals:
            yield CounterMetricFamily(
                "tmemfs_recompressed_loads",
                "Loads that met a page held in zstd (recompressed pages that came back)",
                value=totals["recompressed_loads"],
            )


def render(engine: Engine) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return generate_latest(registry)


async def open_metrics_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind before mounting, so a port in use is an error at mount time."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve_metrics(engine: Engine, listeners: list[trio.SocketListener]) -> None:
    """Answer GET /metrics over HTTP/1.0 until cancelled."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(10):
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
                parts = request.split(b" ", 2)
                if (
                    len(parts) >= 2
                    and parts[0] == b"GET"
                    and parts[1].split(b"?")[0] in (b"/metrics", b"/")
                ):
                    body = render(engine)
                    head = (
                        b"HTTP/1.0 200 OK\r\n"
                        b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                    )
                else:
                    body = b"not found: try /metrics\n"
                    head = b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
            pass
        finally:
            await stream.aclose()

    await trio.serve_listeners(handle, listeners)
