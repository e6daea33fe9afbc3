"""2. Memory held for the same pages: tmemfs (a fresh daemon) against zram0, per corpus."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass, field

from bench import corpora, devices, directio, plots
from bench.config import Context
from bench.model import Row, Section, Table, at_most, median, paired
from bench.progress import Progress

NUMBER = 2
TITLE = "Memory held"
CORPORA = ("files", "anon", "random", "zero")
SAMPLES = 16  # points per curve in the memory plot
# Issue 13's goals for what tmemfs holds once cold pages are recompressed, against
# zram's mem_used_total (zsmalloc's own account, as pool_total_size is tmemfs'): files
# 0.70x, real anonymous memory 0.85x, random pages no worse than zram. The lz4-only
# figures and RSS growth (which also pays the daemon's one-time costs) are context.
GOALS = {
    "files": at_most(0.70, "zram"),
    "anon": at_most(0.85, "zram"),
    "random": at_most(1.0, "zram"),
}
# Background recompression: the daemon sweeps every this many seconds. A page goes two
# sweeps after its last use, and the sweep after the read-back is put off as busy, so
# the first recompression comes up to three intervals after it (FIRST); a sweep then
# takes every idle page, batch after batch, so once recompressed_pages has not moved
# for an interval and a second (SETTLE) it is done. At most SETTLE_MAX in all.
RECOMPRESS_AFTER = 2
FIRST, SETTLE, SETTLE_MAX = 3 * RECOMPRESS_AFTER + 1.0, RECOMPRESS_AFTER + 1.0, 300.0
# What zram would hold with zstd (this kernel's zram has none): each page zstd-3
# compressed, plus zram's measured 70 B per page; a same-filled page costs the 70 B.
ZRAM_PAGE_OVERHEAD = 70
ZSTD_REFERENCE = at_most(1.0, "zram+zstd-3")


@dataclass
class Run:
    """One corpus stored once in each store, with the curve of memory held as it grew."""

    pages: list[int] = field(default_factory=list)
    rss_growth: list[int] = field(default_factory=list)
    pool_total: list[int] = field(default_factory=list)
    zram_used: list[int] = field(default_factory=list)
    tmemfs_stats: dict[str, int] = field(default_factory=dict)
    zram_stat: dict[str, int] = field(default_factory=dict)
    # After background recompression has settled.
    recompressed_stats: dict[str, int] = field(default_factory=dict)
    recompressed_rss: int = 0
    recompress_cpu: float = 0.0  # daemon CPU seconds while it settled (the sweeps)


def run(ctx: Context) -> Section:
    cfg = ctx.config
    section = Section(NUMBER, TITLE, "zram0 (lz4) mm_stat mem_used_total")
    section.method = (
        "Each corpus is written once into a fresh tmemfs's `frontswap/0.img` and once into "
        "a freshly reset `/dev/zram0` (lz4), in 1 MiB O_DIRECT requests. tmemfs holds "
        "`pool_total_size` (its own account: payload plus per-page overhead) and the "
        "daemon's VmRSS growth (from just after the image was created, which is when the "
        "daemon locks its memory, to the end); zram holds mm_stat's `mem_used_total`. "
        "The image is read back and compared after each run. tmemfs runs with "
        f"`--recompress-after {RECOMPRESS_AFTER}`: once the stores are measured, the bench "
        "waits until background recompression has settled, measures again and reads the "
        "image back again. 'zram+zstd-3' is what zram would hold with zstd: each page's "
        f"zstd level 3 size plus zram's {ZRAM_PAGE_OVERHEAD} B per page."
    )
    runs: dict[str, list[Run]] = {name: [] for name in CORPORA}
    with Progress("memory", len(CORPORA) * (cfg.runs + 1)) as bar:
        for name in CORPORA:
            bar.note(f"building the {name} corpus")
            corpus = ctx.corpus(name)
            bar.step()
            for r in range(cfg.runs):
                bar.note(f"run {r + 1}: {name}, {corpus.pages} pages")
                runs[name].append(measure(ctx, corpus, r))
                bar.step()
    references = {name: zstd_reference(ctx.corpus(name)) for name in CORPORA}
    rows, details = summarise(runs, references)
    section.rows.extend(rows)
    section.details.append(details)
    section.plots.append(
        plots.memory_curves(
            ctx.plot_path("memory"),
            {
                name: {
                    "tmemfs pool_total_size": (rs[0].pages, rs[0].pool_total),
                    "tmemfs daemon RSS growth": (rs[0].pages, rs[0].rss_growth),
                    "zram mem_used_total": (rs[0].pages, rs[0].zram_used),
                }
                for name, rs in runs.items()
            },
        )
    )
    section.notes.append(
        "Daemon RSS growth also counts costs paid once, not per page (such as worker "
        "threads started by the first store, whose stacks the daemon's mlockall makes "
        "resident). The column 'RSS per added page after the first step' leaves them out."
    )
    section.notes.append(
        "The zero corpus costs zram nothing (same-filled pages are a flag in "
        "its table), so its ratios are undefined."
    )
    return section


def measure(ctx: Context, corpus: corpora.Corpus, r: int) -> Run:
    result = Run()
    size = corpus.size
    step = max(size // SAMPLES // 4096 * 4096, 4096)
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(
            devices.tmemfs(
                ctx.tmp / f"memory-{corpus.name}-{r}", "--recompress-after", str(RECOMPRESS_AFTER)
            )
        )
        image = mount.image(0, size)
        rss0 = mount.rss()
        with directio.opened(image, os.O_WRONLY) as fd:
            for start in range(0, size, step):
                end = min(start + step, size)
                directio.write_at(fd, corpus.data, start, end, start)
                result.pages.append(end // 4096)
                result.rss_growth.append(mount.rss() - rss0)
                result.pool_total.append(mount.stats()["pool_total_size"])
        time.sleep(0.2)  # let the daemon finish any deferred frees before the last look
        result.rss_growth[-1] = mount.rss() - rss0
        result.tmemfs_stats = mount.stats()
        if directio.read_all(image, size)[:] != corpus.data[:]:
            raise RuntimeError(f"the image returned different data for the {corpus.name} corpus")
        cpu0 = mount.cpu()
        result.recompressed_stats = settle_recompression(mount)
        result.recompress_cpu = mount.cpu() - cpu0
        result.recompressed_rss = mount.rss() - rss0
        if directio.read_all(image, size)[:] != corpus.data[:]:
            raise RuntimeError(f"after recompression the {corpus.name} corpus read back wrong")
        zram = stack.enter_context(devices.zram(size))
        with directio.opened(zram.device, os.O_WRONLY) as fd:
            for start in range(0, size, step):
                directio.write_at(fd, corpus.data, start, min(start + step, size), start)
                result.zram_used.append(zram.mm_stat()["mem_used_total"])
        result.zram_stat = zram.mm_stat()
    return result


def settle_recompression(mount: devices.TmemMount) -> dict[str, int]:
    """The stats once recompression has started and stopped moving for SETTLE seconds,
    or has not started in FIRST (random and same-filled pages gain nothing from zstd)."""
    start = since = time.monotonic()
    stats = mount.stats()
    moved = False
    while time.monotonic() - since < (SETTLE if moved else FIRST) and (
        time.monotonic() - start < SETTLE_MAX
    ):
        time.sleep(0.5)
        now = mount.stats()
        if now["recompressed_pages"] != stats["recompressed_pages"]:
            since, moved = time.monotonic(), True
        stats = now
    return stats


def zstd_reference(corpus: corpora.Corpus, level: int = 3) -> int:
    """Bytes zram would hold for the corpus with zstd (libzstd through ctypes)."""
    lib = ctypes.CDLL("libzstd.so.1")
    lib.ZSTD_compress.restype = ctypes.c_size_t
    lib.ZSTD_compress.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
    ]
    out = ctypes.create_string_buffer(2 * corpora.PAGE)
    total = 0
    for i in range(corpus.pages):
        page = corpus.page(i)
        total += ZRAM_PAGE_OVERHEAD
        if page != page[:8] * (corpora.PAGE // 8):
            total += min(lib.ZSTD_compress(out, len(out), page, len(page), level), corpora.PAGE)
    return total


def summarise(runs: dict[str, list[Run]], references: dict[str, int]) -> tuple[list[Row], Table]:
    rows = []
    table = Table(
        [
            "corpus",
            "pages",
            "tmemfs pool_total_size B/page",
            "tmemfs RSS growth B/page",
            "tmemfs RSS per added page after the first step",
            "zram mem_used_total B/page",
            "tmemfs same_filled_pages",
            "zram same_pages",
            "tmemfs dedup_pages",
            "zram huge_pages",
            "daemon CPU per recompressed page (us)",
        ],
        [],
    )
    for name, rs in runs.items():
        zram = [r.zram_stat["mem_used_total"] for r in rs]
        pool = [r.tmemfs_stats["pool_total_size"] for r in rs]
        rss = [r.rss_growth[-1] for r in rs]
        rows.append(paired(f"{name}: pool_total_size, lz4 only", "MiB", mib(pool), mib(zram)))
        rows.append(paired(f"{name}: daemon RSS growth, lz4 only", "MiB", mib(rss), mib(zram)))
        cold = [r.recompressed_stats["pool_total_size"] for r in rs]
        cold_rss = [r.recompressed_rss for r in rs]
        rows.append(
            paired(
                f"{name}: pool_total_size, recompressed",
                "MiB",
                mib(cold),
                mib(zram),
                GOALS.get(name),
            )
        )
        rows.append(
            paired(f"{name}: daemon RSS growth, recompressed", "MiB", mib(cold_rss), mib(zram))
        )
        rows.append(
            paired(
                f"{name}: pool_total_size, recompressed, vs zstd",
                "MiB",
                mib(cold),
                mib([references[name]] * len(rs)),
                ZSTD_REFERENCE,
            )
        )
        pages = rs[0].pages[-1]
        last = rs[-1]
        table.rows.append(
            [
                name,
                str(pages),
                per_page(pool, pages),
                per_page(rss, pages),
                _num(median([marginal_rss(r) for r in rs])),
                per_page(zram, pages),
                str(last.tmemfs_stats.get("same_filled_pages", "?")),
                str(last.zram_stat["same_pages"]),
                str(last.tmemfs_stats.get("dedup_pages", "?")),
                str(last.zram_stat["huge_pages"]),
                _num(median([c for r in rs if (c := recompress_cpu_per_page(r)) is not None])),
            ]
        )
    return rows, table


def recompress_cpu_per_page(run: Run) -> float | None:
    """Microseconds of daemon CPU per page recompressed while recompression settled;
    None where nothing was (random and same-filled pages)."""
    pages = run.recompressed_stats.get("recompressed_pages", 0)
    return run.recompress_cpu * 1e6 / pages if pages else None


def marginal_rss(run: Run) -> float:
    """RSS added per page after the first step, which also pays the fixed costs."""
    return (run.rss_growth[-1] - run.rss_growth[0]) / max(run.pages[-1] - run.pages[0], 1)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def mib(values: list[int]) -> list[float]:
    return [v / (1 << 20) for v in values]


def per_page(values: list[int], pages: int) -> str:
    m = median(values)
    return "n/a" if m is None else f"{m / pages:.0f}"
