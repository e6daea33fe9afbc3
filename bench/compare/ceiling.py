"""7. Against the FUSE ceiling, and memory that goes back.

The ceiling is bench/barefs.py: a bare pyfuse3 filesystem keeping its bytes in dicts.
Swap-in is a page fault waiting on one small read (swap readahead asks for 8 pages),
so the rate of 32 KiB random direct reads, one in flight, decides swap more than
1 MiB throughput does; zram's rate is printed beside it as context. Then memory:
RSS growth against pool_total_size while a pool fills, and RSS 5 s after the pool
is flushed (rmdir) against RSS before it was filled. The growth goal is judged after
the first eighth of the corpus: what the first stores pay once (OpenMP's threads,
pyfuse3's request buffers, the store's first arenas, all resident under mlockall) is
not what a page costs; the whole growth is shown beside it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench import devices
from bench.config import Context
from bench.directio import direct_write, opened, random_reads, write_at
from bench.model import Goal, Row, Section, at_least, median, paired
from bench.pagefiles import store_and_load
from bench.progress import Progress
from bench.system import vm_rss

NUMBER = 7
TITLE = "FUSE ceiling and memory given back"
SWAPIN_GOAL = at_least(0.85, "bare pyfuse3")
PAGEFILE_GOAL = at_least(1.5, "bare pyfuse3")
GROWTH_GOAL = Goal("within 5% of pool_total_size", minimum=0.95, maximum=1.05)
FLUSH_ALLOWANCE = 8 << 20


@contextlib.contextmanager
def barefs(path: Path, size: int) -> Iterator[Path]:
    """The bare pyfuse3 dict filesystem, mounted on `path` and unmounted whatever happens."""
    path.mkdir(parents=True, exist_ok=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.barefs", str(path), "--size", str(size >> 20)]
    )
    try:
        for _ in range(100):
            if os.path.ismount(path):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("bench.barefs did not mount")
        yield path
    finally:
        subprocess.run(["fusermount3", "-u", str(path)], check=False, timeout=30)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        path.rmdir()


def run(ctx: Context) -> Section:
    cfg = ctx.config
    corpus = ctx.corpus("files")
    size = corpus.size
    section = Section(NUMBER, TITLE, "bench/barefs.py (bare pyfuse3, bytes in dicts)")
    section.method = (
        f"The files corpus ({size >> 20} MiB) written with 1 MiB direct writes to "
        f"`frontswap/0.img`, to bare pyfuse3's `img` and to zram0; then random direct reads, "
        f"one in flight, {cfg.fio_seconds:g} s per run, of 32 KiB (swap readahead) and 4 KiB. "
        f"Page files: `bench.pagefiles.store_and_load` on both filesystems. Memory: the "
        f"daemon's VmRSS before the write, after it, and 5 s after `rmdir frontswap/0`."
    )
    rates: dict[str, dict[int, list[float]]] = {
        n: {32768: [], 4096: []} for n in ("tmemfs", "bare", "zram")
    }
    files: dict[str, dict[str, list[float]]] = {
        n: {"store": [], "load": []} for n in ("tmemfs", "bare")
    }
    growth: list[float] = []
    marginal: list[float] = []
    warm = size // 8 // (1 << 20) * (1 << 20)
    after_flush: list[float] = []
    pages = corpus.page_list(cfg.page_files)
    with Progress("ceiling", cfg.runs * 3) as bar:
        for r in range(cfg.runs):
            with contextlib.ExitStack() as stack:
                mount = stack.enter_context(devices.tmemfs(ctx.tmp / f"ceiling-{r}"))
                bare = stack.enter_context(barefs(ctx.tmp / f"ceiling-bare-{r}", size))
                zram = stack.enter_context(devices.zram(size))
                time.sleep(0.5)
                start = vm_rss(mount.pid)
                targets = {
                    "tmemfs": mount.image(0, size),
                    "bare": bare / "img",
                    "zram": zram.device,
                }
                with opened(targets["tmemfs"], os.O_WRONLY) as fd:
                    write_at(fd, corpus.data, 0, warm, 0)
                time.sleep(0.5)
                warmed, warm_total = vm_rss(mount.pid), mount.stats()["pool_total_size"]
                with opened(targets["tmemfs"], os.O_WRONLY) as fd:
                    write_at(fd, corpus.data, warm, size, warm)
                for name in ("bare", "zram"):
                    direct_write(targets[name], corpus.data, size)
                time.sleep(0.5)
                filled, total = vm_rss(mount.pid), mount.stats()["pool_total_size"]
                growth.append((filled - start) / total)
                marginal.append((filled - warmed) / (total - warm_total))
                bar.step()
                for block in (32768, 4096):
                    for name in targets if r % 2 == 0 else reversed(targets):
                        bar.note(f"run {r + 1}: {block >> 10} KiB random reads on {name}")
                        rates[name][block].append(
                            random_reads(targets[name], block, size, cfg.fio_seconds)
                        )
                bar.step()
                for name, root in (
                    ("tmemfs", mount.path / "frontswap" / "1"),
                    ("bare", bare / "pages"),
                ):
                    store, load = store_and_load(root, pages)
                    files[name]["store"].append(store)
                    files[name]["load"].append(load)
                os.rmdir(mount.path / "frontswap" / "1")
                (mount.path / "frontswap" / "0.img").unlink()
                os.rmdir(mount.path / "frontswap" / "0")
                time.sleep(5)
                after_flush.append(vm_rss(mount.pid) - start)
                bar.step()
    section.rows.append(
        paired(
            "32 KiB random read, one in flight (swap-in)",
            "reads/s",
            rates["tmemfs"][32768],
            rates["bare"][32768],
            SWAPIN_GOAL,
        )
    )
    section.rows.append(
        paired(
            "4 KiB random read, one in flight",
            "reads/s",
            rates["tmemfs"][4096],
            rates["bare"][4096],
        )
    )
    section.rows.append(
        paired(
            "32 KiB random read against zram (context)",
            "reads/s",
            rates["tmemfs"][32768],
            rates["zram"][32768],
        )
    )
    for op, label in (
        ("store", "page file store (open/write/close)"),
        ("load", "page file load (open/read/close)"),
    ):
        section.rows.append(
            paired(label, "pages/s", files["tmemfs"][op], files["bare"][op], PAGEFILE_GOAL)
        )
    ratio = median(marginal)
    section.rows.append(
        Row(
            "daemon RSS growth / pool_total_size, after the first eighth",
            "ratio",
            ratio,
            1.0,
            ratio,
            GROWTH_GOAL,
        )
    )
    whole = median(growth)
    section.rows.append(
        Row("daemon RSS growth / pool_total_size, from the empty image", "ratio", whole, 1.0, whole)
    )
    flushed = median(after_flush)
    section.rows.append(
        Row(
            "RSS 5 s after rmdir, above the start",
            "MiB",
            None if flushed is None else flushed / (1 << 20),
            FLUSH_ALLOWANCE / (1 << 20),
            None if flushed is None else flushed / FLUSH_ALLOWANCE,
            Goal("≤ 1x the 8 MiB allowance", maximum=1.0),
        )
    )
    section.notes.append(
        "Run after run: RSS growth/pool_total_size after the first eighth "
        + ", ".join(f"{g:.3f}" for g in marginal)
        + ", from the empty image "
        + ", ".join(f"{g:.3f}" for g in growth)
        + "; RSS above the start after the flush (MiB) "
        + ", ".join(f"{a / (1 << 20):.1f}" for a in after_flush)
        + "."
    )
    return section
