"""3. The swap experiment: the kernel swaps through tmemfs, zram, or a swap file on disk."""

from __future__ import annotations

from pathlib import Path

from bench import plots, swap
from bench.config import Context
from bench.model import Section, Table, at_most, median, paired
from bench.progress import Progress

NUMBER = 3
TITLE = "Swap experiment"
GOAL = at_most(1.0, "zram swap")
MEMORY_GOAL = at_most(0.85, "zram swap")
RECOMPRESS_COST_GOAL = at_most(1.05, "tmemfs without recompression")
# Recompression for the comparison with it on: pages idle this long get zstd (the
# mount's default, 60 s, is longer than a run here, so the plain runs keep lz4).
RECOMPRESS_AFTER = 2.0
MiB = 1 << 20
PAGE_CLUSTER = Path("/proc/sys/vm/page-cluster")
# The readahead sweep: small, so six settings on two stores fit in about a minute.
SWEEP_LIMIT, SWEEP_SET = 48 << 20, 160 << 20


def run(ctx: Context) -> Section:
    cfg = ctx.config
    limit, ws = cfg.swap_limit, cfg.swap_working_set
    section = Section(NUMBER, TITLE, "zram swap, and a swap file on disk")
    section.method = (
        f"`examples/swap_workload.py --working-set {ws >> 20}M` (fill with checksummed, "
        f"log-like data, then two verified passes, the second shuffled) in a memory cgroup "
        f"limited to {limit >> 20} MiB, on swap with priority 32767: "
        f"`examples/swap-on-loop.sh` for tmemfs (loop device with direct I/O on "
        f"`frontswap/0.img`, a fresh mount each run), zram0 (lz4), and a swap file on the "
        f"root file system. Wall time is the workload's, start to exit. Runs rotate the "
        f"order of the three stores. Each second, swap in use (`/proc/swaps`) is sampled "
        f"against the memory the store holds: zram's `mem_used_total`, tmemfs' "
        f"`pool_total_size` (with `swapon --discard`, so freed slots are invalidated); "
        f"memory held is compared at the peak of swap in use, and averaged over the samples "
        f"with at least a tenth of that peak. 'tmemfs+zstd' is the same run with "
        f"`--recompress-after {RECOMPRESS_AFTER:g}` (pages idle that long recompressed with "
        f"zstd in the background)."
    )
    stores = {
        "tmemfs": lambda: swap.on_tmemfs(limit, ws, cfg.swap_timeout),
        "tmemfs+zstd": lambda: swap.on_tmemfs(
            limit, ws, cfg.swap_timeout, recompress_after=RECOMPRESS_AFTER
        ),
        "zram": lambda: swap.on_zram(limit, ws, cfg.swap_timeout),
        "disk": lambda: swap.on_disk(ctx.tmp, limit, ws, cfg.swap_timeout),
    }
    names = list(stores)
    outcomes: dict[str, list[swap.Outcome]] = {name: [] for name in names}
    with Progress("swap", cfg.runs * len(names)) as bar:
        for r in range(cfg.runs):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                bar.note(f"run {r + 1}: {ws >> 20} MiB in {limit >> 20} MiB on {name}")
                outcome = stores[name]()
                if not outcome.passed:
                    raise RuntimeError(f"the workload failed on {name}:\n{outcome.tail}")
                outcomes[name].append(outcome)
                bar.step()
    wall = {name: [o.wall for o in outs] for name, outs in outcomes.items()}
    section.rows.append(paired("wall time vs zram swap", "s", wall["tmemfs"], wall["zram"], GOAL))
    section.rows.append(paired("wall time vs disk swap", "s", wall["tmemfs"], wall["disk"]))
    section.rows.append(
        paired(
            "wall time with recompression vs without",
            "s",
            wall["tmemfs+zstd"],
            wall["tmemfs"],
            RECOMPRESS_COST_GOAL,
        )
    )
    memory = {
        name: [o.memory for o in outcomes[name]] for name in ("tmemfs", "tmemfs+zstd", "zram")
    }
    for name, how in (("tmemfs", ""), ("tmemfs+zstd", ", with recompression,")):
        section.rows.append(
            paired(
                f"memory held at the peak swap in use{how} vs zram swap",
                "MiB",
                [m.held_at_peak / MiB for m in memory[name]],
                [m.held_at_peak / MiB for m in memory["zram"]],
                MEMORY_GOAL,
            )
        )
        section.rows.append(
            paired(
                f"memory held, average over the run{how} vs zram swap",
                "MiB",
                [m.held_average / MiB for m in memory[name]],
                [m.held_average / MiB for m in memory["zram"]],
            )
        )
    section.details.append(
        Table(
            [
                "swap on",
                "peak swap in use (MiB)",
                "held at that peak (MiB)",
                "held on average (MiB)",
                "held after exit (MiB)",
                "stored pages / swap in use",
                "most pages in zstd / loads that met one",
            ],
            [
                [
                    name,
                    *(
                        ", ".join(f"{getattr(m, a) / MiB:.1f}" for m in ms)
                        for a in ("peak_used", "held_at_peak", "held_average", "held_after")
                    ),
                    ", ".join(f"{m.stored_ratio:.2f}x" for m in ms) if name != "zram" else "-",
                    ", ".join(_recompressed(m) for m in ms) if name != "zram" else "-",
                ]
                for name, ms in memory.items()
            ],
        )
    )
    section.details.append(
        Table(
            ["swap on", "wall time per run (s)", "pswpout per run", "pswpin per run"],
            [
                [
                    name,
                    ", ".join(f"{o.wall:.1f}" for o in outs),
                    ", ".join(str(o.swapped_out) for o in outs),
                    ", ".join(str(o.swapped_in) for o in outs),
                ]
                for name, outs in outcomes.items()
            ],
        )
    )
    section.notes.append("pswpout and pswpin are /proc/vmstat deltas, system-wide.")
    section.notes.append(
        "'most pages in zstd' is the largest recompressed_pages over swap-on-loop.sh's "
        "samples (every 0.5 s); 'loads that met one' is recompressed_loads over the run: "
        "page faults that decoded zstd."
    )
    section.details.append(readahead_sweep(cfg.swap_timeout, quick=cfg.runs == 1))
    section.plots.append(
        plots.bars(
            ctx.plot_path("swap"),
            f"Swap: {ws >> 20} MiB working set in {limit >> 20} MiB",
            ["wall time (lower is better)"],
            "s",
            {name: [median(wall[name])] for name in names},
            log=False,
        )
    )
    return section


def readahead_sweep(timeout: int, *, quick: bool) -> Table:
    """Wall time at each vm.page-cluster (swap readahead of 2^N pages), tmemfs and zram.

    FUSE costs more per request than per byte, so larger clusters may pay for tmemfs,
    where zram does not care. The setting is global: it is restored whatever happens.
    """
    limit, ws = (SWEEP_LIMIT, SWEEP_SET) if not quick else (32 << 20, 64 << 20)
    settings = range(6) if not quick else (0, 3)
    saved = PAGE_CLUSTER.read_text()
    rows: list[list[str]] = []
    try:
        for cluster in settings:
            PAGE_CLUSTER.write_text(str(cluster))
            tmem = swap.on_tmemfs(limit, ws, timeout, page_cluster="keep")
            zram = swap.on_zram(limit, ws, timeout)
            rows.append(
                [
                    str(cluster),
                    f"{1 << cluster}",
                    f"{tmem.wall:.1f}",
                    f"{zram.wall:.1f}",
                    f"{tmem.wall / zram.wall:.2f}x" if zram.wall else "-",
                    "PASS" if tmem.passed and zram.passed else "FAIL",
                ]
            )
    finally:
        PAGE_CLUSTER.write_text(saved)
    return Table(
        [
            f"vm.page-cluster ({ws >> 20} MiB in {limit >> 20} MiB)",
            "pages per read",
            "tmemfs (s)",
            "zram (s)",
            "ratio",
            "workload",
        ],
        rows,
    )


def _recompressed(memory: swap.Memory) -> str:
    """What recompression did during one run, as the script's summary gives it."""
    if memory.recompressed_most is None:
        return "?"
    return f"{memory.recompressed_most} / {memory.recompressed_loads}"
