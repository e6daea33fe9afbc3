"""5. tmemfs on a Redis backend against redis-benchmark on the same server."""

from __future__ import annotations

import contextlib
import mmap

from bench import devices, directio, plots
from bench import redis as redis_bench
from bench.config import Context
from bench.model import Section, at_least, paired
from bench.pagefiles import PAGE
from bench.progress import Progress

NUMBER = 5
TITLE = "Redis backend"
GOAL = at_least(0.5, "redis-benchmark")


def run(ctx: Context) -> Section:
    cfg = ctx.config
    corpus = ctx.corpus("files")
    size = min(cfg.redis_size, corpus.size) // PAGE * PAGE
    section = Section(NUMBER, TITLE, "redis-benchmark -P 32 -d 4096 on the same server")
    section.method = (
        f"A private `redis-server` on 127.0.0.1 (no persistence). tmemfs mounted with "
        f"`--backend redis://127.0.0.1:PORT/0` writes then reads {size >> 20} MiB of the files "
        f"corpus through a new `frontswap/N.img` per run in 1 MiB O_DIRECT requests (the "
        f"batched path, `bench.directio.direct_write`/`direct_read`), checked byte for byte; "
        f"`redis-benchmark -P 32 -d 4096 -t set,get -n {cfg.redis_requests}` runs against the "
        f"same server in between. tmemfs pages/s against redis-benchmark requests/s."
    )
    rates: dict[str, list[float]] = {"store": [], "load": [], "SET": [], "GET": []}
    back = mmap.mmap(-1, size)
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(devices.redis_server(ctx.tmp))
        mount = stack.enter_context(
            devices.tmemfs(ctx.tmp / "redis", "--backend", f"redis://127.0.0.1:{port}/0")
        )
        with Progress("redis", cfg.runs * 2) as bar:
            for r in range(cfg.runs):
                for side in ("tmemfs", "redis-benchmark")[:: 1 if r % 2 == 0 else -1]:
                    bar.note(f"run {r + 1}: {side}")
                    if side == "tmemfs":
                        image = mount.image(r, size)
                        rates["store"].append(
                            size / PAGE / directio.direct_write(image, corpus.data, size)
                        )
                        rates["load"].append(size / PAGE / directio.direct_read(image, back, size))
                        if back[:size] != corpus.data[:size]:
                            raise RuntimeError("the redis-backed image returned different data")
                    else:
                        benchmark = redis_bench.redis_benchmark(port, cfg.redis_requests)
                        rates["SET"].append(benchmark["SET"])
                        rates["GET"].append(benchmark["GET"])
                    bar.step()
        memory = redis_bench.used_memory(port)
    section.rows.append(
        paired(
            "store (1 MiB image writes) vs SET",
            "pages/s vs requests/s",
            rates["store"],
            rates["SET"],
            GOAL,
        )
    )
    section.rows.append(
        paired(
            "load (1 MiB image reads) vs GET",
            "pages/s vs requests/s",
            rates["load"],
            rates["GET"],
            GOAL,
        )
    )
    section.notes.append(
        f"Redis used_memory after all runs: {memory / (1 << 20):.1f} MiB for "
        f"{cfg.runs * size >> 20} MiB of pages stored (lz4-compressed by "
        f"tmemfs) plus redis-benchmark's keys."
    )
    section.plots.append(
        plots.bars(
            ctx.plot_path("redis"),
            "Redis backend vs redis-benchmark (same server)",
            ["store vs SET", "load vs GET"],
            "pages/s or requests/s",
            {
                "tmemfs on redis": [row.tmemfs for row in section.rows],
                "redis-benchmark -P 32 -d 4096": [row.reference for row in section.rows],
            },
            log=False,
        )
    )
    return section
