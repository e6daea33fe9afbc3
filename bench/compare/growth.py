"""6. Growth: store rate and memory per page as the image fills to 10^6 pages."""

from __future__ import annotations

import contextlib
import mmap
import os
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import corpora, devices, directio, plots
from bench.config import Context
from bench.directio import CHUNK
from bench.model import Goal, Row, Section, Table, median, paired
from bench.pagefiles import PAGE
from bench.progress import Progress
from bench.redis import free_port
from tmemfs.engine import stats as statsfmt

NUMBER = 6
TITLE = "Growth"
FLAT = Goal("flat (≤ 1.1x)", maximum=1.1)
# Introspection is timed from the bench's side: a FUSE round trip (or an HTTP one) of
# some 100 µs that the machine's noise moves by tens of µs, so "the same" is 1.25x.
SAME_COST = Goal("the same (≤ 1.25x)", maximum=1.25)
INTROSPECTION = ("reading the pool's .stats", "stat of its image", "a metrics scrape")
PROBE_TRIES = 15
PROBE_AT = 10**3
# Each probe is also timed against a witness of PROBE_AT pages, probe for probe in
# turn: the pool's .stats and its image's stat against a second pool (WITNESS) of the
# same mount, the scrape against a second mount holding two such pools (as the grown
# mount holds two, so the scrapes list as many). On this shared host the same probe of
# an idle daemon drifted from 0.30 to 0.47 ms over 30 s with 2,000 pages stored, as
# much as 10^3 against 10^6 pages ever moved it, so only a reference timed in the same
# seconds says whether the cost grows with the pages.
WITNESS = 1


@dataclass
class Point:
    """Both stores after `pages` pages, and the seconds spent writing since the last point."""

    pages: int
    tmemfs_seconds: float
    zram_seconds: float
    pool_total: int
    compr: int
    rss_growth: int
    zram_used: int
    zram_compr: int
    # Seconds each of INTROSPECTION took (the median of PROBE_TRIES), then each one's
    # witness, timed in turn with it.
    introspection: tuple[float, ...] = ()


@dataclass
class Run:
    points: list[Point] = field(default_factory=list)
    # INTROSPECTION's seconds at PROBE_AT pages, the small store they are compared with.
    small: tuple[float, ...] = ()


def run(ctx: Context) -> Section:
    cfg = ctx.config
    points = cfg.growth_points
    base = ctx.corpus("files")
    section = Section(NUMBER, TITLE, "zram0 (lz4), written the same pages in step")
    section.method = (
        f"One fresh tmemfs (`--max-pool {cfg.growth_max_pool}`) and zram0, each written "
        f"{_count(points[-1])} distinct pages in 1 MiB O_DIRECT requests, chunk by chunk in "
        f"turn: the files corpus repeated, each page stamped with its number in its first 8 "
        f"bytes so none is a duplicate. At {', '.join(_count(p) for p in points)} pages: the "
        f"store rate of the segment just written (pages/s, write calls only) and the bytes "
        f"of memory held per page. Overhead is what is held beyond the compressed payload "
        f"(pool_total_size - compr_data_size; zram: mem_used_total - compr_data_size). "
        f"Introspection, at {_count(PROBE_AT)} pages and at each point: the median of "
        f"{PROBE_TRIES} times of {', '.join(INTROSPECTION)} (the mount's `--metrics`), "
        f"timed by the bench, each in turn with a witness of {_count(PROBE_AT)} pages: "
        f"a second pool of the mount, written before the first point (the memory "
        f"figures are the grown pool's own, and RSS growth starts after it was "
        f"written); for the scrape, a second mount holding two such pools."
    )
    runs = []
    with Progress("growth", cfg.growth_runs * len(points)) as bar:
        for r in range(cfg.growth_runs):
            runs.append(measure(ctx, base, points, r, bar))
    section.rows.extend(rows(runs, points))
    section.details.append(detail_table(runs, points))
    rates = {
        "tmemfs": [_rate(runs, i, "tmemfs") for i in range(len(points))],
        "zram": [_rate(runs, i, "zram") for i in range(len(points))],
    }
    held = {
        "tmemfs pool_total_size": [_per_page(runs, i, "pool_total") for i in range(len(points))],
        "tmemfs daemon RSS growth": [_per_page(runs, i, "rss_growth") for i in range(len(points))],
        "zram mem_used_total": [_per_page(runs, i, "zram_used") for i in range(len(points))],
    }
    section.plots.append(plots.growth(ctx.plot_path("growth"), points, rates, held))
    if cfg.growth_runs == 1:
        section.notes.append(
            "One run (the 10^6-page run is the longest part of the bench): "
            "these figures are single measurements, not medians."
        )
    return section


def measure(
    ctx: Context, base: corpora.Corpus, points: tuple[int, ...], r: int, bar: Progress
) -> Run:
    size = points[-1] * PAGE
    result = Run()
    chunk = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    with contextlib.ExitStack() as stack:
        port = free_port()
        mount = stack.enter_context(
            devices.tmemfs(
                ctx.tmp / f"growth-{r}",
                "--max-pool",
                ctx.config.growth_max_pool,
                "--metrics",
                f"127.0.0.1:{port}",
            )
        )
        image = mount.image(0, size)
        witness = mount.image(WITNESS, PROBE_AT * PAGE)
        witness_port = free_port()
        small = stack.enter_context(
            devices.tmemfs(
                ctx.tmp / f"growth-{r}-witness", "--metrics", f"127.0.0.1:{witness_port}"
            )
        )
        # Stamps past the grown image's, so no witness page is a duplicate of another.
        for k, path in enumerate(
            (witness, small.image(0, PROBE_AT * PAGE), small.image(WITNESS, PROBE_AT * PAGE))
        ):
            _fill(path, base, points[-1] + k * PROBE_AT, chunk)
        zram = stack.enter_context(devices.zram(size))
        rss0 = mount.rss()
        tm_fd = stack.enter_context(directio.opened(image, os.O_WRONLY))
        zr_fd = stack.enter_context(directio.opened(zram.device, os.O_WRONLY))
        done = 0
        for target in points:
            bar.note(f"run {r + 1}: writing pages {done}-{target}")
            t_tm = t_zr = 0.0
            while done < target:
                if done == PROBE_AT:
                    result.small = introspection(image, witness, port, witness_port)
                n = min(CHUNK // PAGE, target - done, max(PROBE_AT - done, 0) or CHUNK // PAGE)
                corpora.stamp_unique(base, done, chunk)
                t_tm += directio.write_at(tm_fd, chunk, 0, n * PAGE, done * PAGE)
                t_zr += directio.write_at(zr_fd, chunk, 0, n * PAGE, done * PAGE)
                done += n
            stats, mm = statsfmt.counters(_stats_file(image).read_text()), zram.mm_stat()
            result.points.append(
                Point(
                    target,
                    t_tm,
                    t_zr,
                    stats["pool_total_size"],
                    stats["compr_data_size"],
                    mount.rss() - rss0,
                    mm["mem_used_total"],
                    mm["compr_data_size"],
                    introspection(image, witness, port, witness_port),
                )
            )
            bar.step()
        bar.note("unmounting (freeing the pool)")
    return result


def _fill(image: Path, base: corpora.Corpus, first_stamp: int, chunk: mmap.mmap) -> None:
    """Write every page of a small image, stamped from `first_stamp` on."""
    pages = image.stat().st_size // PAGE
    with directio.opened(image, os.O_WRONLY) as fd:
        for first in range(0, pages, CHUNK // PAGE):
            n = min(CHUNK // PAGE, pages - first)
            corpora.stamp_unique(base, first_stamp + first, chunk)
            directio.write_at(fd, chunk, 0, n * PAGE, first * PAGE)


def introspection(image: Path, witness: Path, port: int, witness_port: int) -> tuple[float, ...]:
    """Seconds to read the image pool's .stats, to stat the image and to scrape the
    metrics, then the same for their witnesses: the median of PROBE_TRIES each, a
    witness probe beside each of its counterpart's, either first as often."""

    def scrape_of(port: int) -> Callable[[], None]:
        def scrape() -> None:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=30) as reply:
                reply.read()

        return scrape

    probes = (
        (_stats_file(image).read_bytes, _stats_file(witness).read_bytes),
        (lambda: os.stat(image), lambda: os.stat(witness)),
        (scrape_of(port), scrape_of(witness_port)),
    )
    out, against = [], []
    for probe, reference in probes:
        times, ref_times = [], []
        for i in range(PROBE_TRIES):
            if i % 2:  # either goes first as often
                ref_times.append(_timed(reference))
                times.append(_timed(probe))
            else:
                times.append(_timed(probe))
                ref_times.append(_timed(reference))
        out.append(statistics.median(times))
        against.append(statistics.median(ref_times))
    return (*out, *against)


def _stats_file(image: Path) -> Path:
    """The .stats of an image's pool: frontswap/N.img is pool frontswap/N."""
    return image.parent / image.stem / ".stats"


def _timed(probe: Callable[[], object]) -> float:
    start = time.perf_counter()
    probe()
    return time.perf_counter() - start


def rows(runs: list[Run], points: tuple[int, ...]) -> list[Row]:
    out = []
    for i, p in enumerate(points):
        added = p - (points[i - 1] if i else 0)
        out.append(
            paired(
                f"store rate, pages {_segment(points, i)}",
                "pages/s",
                [added / run.points[i].tmemfs_seconds for run in runs],
                [added / run.points[i].zram_seconds for run in runs],
            )
        )
    for i, p in enumerate(points):
        out.append(
            paired(
                f"memory per page at {_count(p)} (pool_total_size)",
                "B/page",
                [run.points[i].pool_total / p for run in runs],
                [run.points[i].zram_used / p for run in runs],
            )
        )
    for i, p in enumerate(points):
        out.append(
            paired(
                f"memory per page at {_count(p)} (daemon RSS growth)",
                "B/page",
                [run.points[i].rss_growth / p for run in runs],
                [run.points[i].zram_used / p for run in runs],
            )
        )
    # Flat means the cost of one more page does not grow with the store. Compare the last
    # segment with the one before it: the first segment also pays the fixed costs (worker
    # threads' stacks, which the daemon's mlockall makes resident).
    last, before = len(points) - 1, max(len(points) - 2, 0)
    out.append(
        paired(
            f"overhead per page at {_count(points[last])} vs at "
            f"{_count(points[before])} (tmemfs vs tmemfs)",
            "B/page",
            [_overhead(run, last) for run in runs],
            [_overhead(run, before) for run in runs],
            FLAT,
        )
    )
    out.append(
        paired(
            f"RSS per added page, {_segment(points, last)} vs "
            f"{_segment(points, before)} (tmemfs vs tmemfs)",
            "B/page",
            [_marginal_rss(run, last) for run in runs],
            [_marginal_rss(run, before) for run in runs],
            FLAT,
        )
    )
    at = _count(PROBE_AT)
    witnesses = (f"a {at}-page pool's", f"a {at}-page image's", f"a mount's of two {at}-page pools")
    for k, (name, witness) in enumerate(zip(INTROSPECTION, witnesses, strict=True)):
        out.append(
            paired(
                f"{name} at {_count(points[last])} pages vs {witness}, timed in turn "
                "(tmemfs vs tmemfs)",
                "ms",
                [run.points[last].introspection[k] * 1e3 for run in runs],
                [run.points[last].introspection[len(INTROSPECTION) + k] * 1e3 for run in runs],
                SAME_COST,
            )
        )
    if all(run.small for run in runs):
        for k, name in enumerate(INTROSPECTION):
            out.append(
                paired(
                    f"{name} at {_count(points[last])} vs at {_count(PROBE_AT)} pages "
                    "(tmemfs vs tmemfs)",
                    "ms",
                    [run.points[last].introspection[k] * 1e3 for run in runs],
                    [run.small[k] * 1e3 for run in runs],
                    None,  # minutes apart: context beside the witnesses
                )
            )
    return out


def detail_table(runs: list[Run], points: tuple[int, ...]) -> Table:
    table = Table(
        [
            "pages",
            "tmemfs pool_total_size",
            "tmemfs compr_data_size",
            "tmemfs overhead B/page",
            "daemon RSS growth",
            "zram mem_used_total",
            "zram overhead B/page",
        ],
        [],
    )
    for i, p in enumerate(points):
        pts = [run.points[i] for run in runs]
        table.rows.append(
            [
                _count(p),
                _mib(median([x.pool_total for x in pts])),
                _mib(median([x.compr for x in pts])),
                _num(median([(x.pool_total - x.compr) / p for x in pts])),
                _mib(median([x.rss_growth for x in pts])),
                _mib(median([x.zram_used for x in pts])),
                _num(median([(x.zram_used - x.zram_compr) / p for x in pts])),
            ]
        )
    return table


def _overhead(run: Run, i: int) -> float:
    point = run.points[i]
    return (point.pool_total - point.compr) / point.pages


def _marginal_rss(run: Run, i: int) -> float:
    """Daemon RSS added per page stored in segment i."""
    previous = run.points[i - 1] if i else Point(0, 0, 0, 0, 0, 0, 0, 0)
    point = run.points[i]
    return (point.rss_growth - previous.rss_growth) / (point.pages - previous.pages)


def _segment(points: tuple[int, ...], i: int) -> str:
    return f"{_count(points[i - 1]) if i else 0}→{_count(points[i])}"


def _rate(runs: list[Run], i: int, side: str) -> float | None:
    p = runs[0].points[i].pages
    previous = runs[0].points[i - 1].pages if i else 0
    seconds = [getattr(run.points[i], f"{side}_seconds") for run in runs]
    return median([(p - previous) / s for s in seconds])


def _per_page(runs: list[Run], i: int, attr: str) -> float | None:
    return median([getattr(run.points[i], attr) / run.points[i].pages for run in runs])


def _count(n: int) -> str:
    """10^k for powers of ten, as the issue names them; the number otherwise."""
    k = len(str(n)) - 1
    return f"10^{k}" if n == 10**k and k > 0 else str(n)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / (1 << 20):.1f} MiB"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"
