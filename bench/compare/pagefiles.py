"""4. Page files through Python open/write/close and open/read/close, against tmpfs."""

from __future__ import annotations

import contextlib
import os
import shutil

from bench import devices, plots
from bench.config import Context
from bench.model import Section, at_least, paired
from bench.pagefiles import store_and_load
from bench.progress import Progress

NUMBER = 4
TITLE = "Page files"
GOAL = at_least(0.3, "tmpfs")


def run(ctx: Context) -> Section:
    cfg = ctx.config
    pages = ctx.corpus("files").page_list(cfg.page_files)
    section = Section(NUMBER, TITLE, "tmpfs")
    section.method = (
        f"{len(pages)} pages of the files corpus, each stored with Python "
        f"`open(..., 'wb', buffering=0)`/`write`/`close` into a new pool directory, then each "
        f"loaded and compared with `open`/`read`/`close` (`bench.pagefiles.store_and_load`), "
        f"on tmemfs's `frontswap/N/` and on a tmpfs; runs alternate which goes first."
    )
    rates: dict[str, dict[str, list[float]]] = {
        "tmemfs": {"store": [], "load": []},
        "tmpfs": {"store": [], "load": []},
    }
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(devices.tmemfs(ctx.tmp / "pagefiles-tmemfs"))
        tmpfs = stack.enter_context(devices.tmpfs(ctx.tmp / "pagefiles-tmpfs"))
        roots = {"tmemfs": mount.path, "tmpfs": tmpfs}
        with Progress("pagefiles", cfg.runs * 2) as bar:
            for r in range(cfg.runs):
                for name in ("tmemfs", "tmpfs") if r % 2 == 0 else ("tmpfs", "tmemfs"):
                    bar.note(f"run {r + 1}: {len(pages)} page files on {name}")
                    pool = roots[name] / "frontswap" / str(r)
                    store, load = store_and_load(pool, pages)
                    rates[name]["store"].append(store)
                    rates[name]["load"].append(load)
                    # On tmemfs rmdir flushes the pool (SPEC 2); tmpfs needs its files removed.
                    os.rmdir(pool) if name == "tmemfs" else shutil.rmtree(pool)
                    bar.step()
    for op, label in (("store", "store (open/write/close)"), ("load", "load (open/read/close)")):
        section.rows.append(paired(label, "pages/s", rates["tmemfs"][op], rates["tmpfs"][op], GOAL))
    section.plots.append(
        plots.bars(
            ctx.plot_path("pagefiles"),
            "Page files: Python open/write/close, open/read/close",
            [row.measure for row in section.rows],
            "pages/s",
            {
                "tmemfs": [row.tmemfs for row in section.rows],
                "tmpfs": [row.reference for row in section.rows],
            },
        )
    )
    return section
