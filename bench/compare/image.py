"""1. The block image against /dev/zram0 (lz4), through fio with direct I/O."""

from __future__ import annotations

import contextlib

from bench import devices, fio, plots
from bench.config import Context
from bench.model import Section, at_least, paired
from bench.progress import Progress

NUMBER = 1
TITLE = "Image vs zram"
GOAL = {"write": at_least(1.0, "zram"), "read": at_least(1.0, "zram")}


def run(ctx: Context) -> Section:
    cfg = ctx.config
    section = Section(NUMBER, TITLE, "zram0 (lz4)")
    section.method = (
        f"fio, one job, `--ioengine=psync --direct=1` (`libaio --iodepth=8` where named), on "
        f"`MOUNT/frontswap/0.img` and on "
        f"`/dev/zram0` (lz4), both {cfg.fio_size >> 20} MiB. Sequential jobs move the whole "
        f"size; random 4 KiB jobs run {cfg.fio_seconds:g} s each over it. fio fills every "
        f"buffer afresh and half-compressible (`{' '.join(fio.DATA)}`), so neither side can "
        f"deduplicate. Per run the jobs go write, read, random write, random read, "
        f"alternating which store goes first. MB/s = 10^6 bytes/s."
    )
    measured: dict[str, dict[fio.Job, list[float]]] = {"tmemfs": {}, "zram": {}}
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(devices.tmemfs(ctx.tmp / "image"))
        image = str(mount.image(0, cfg.fio_size))
        stack.enter_context(devices.zram(cfg.fio_size))
        targets = {"tmemfs": image, "zram": str(devices.ZRAM_DEV)}
        with Progress("image", cfg.runs * len(fio.JOBS) * 2) as bar:
            for r in range(cfg.runs):
                order = ["tmemfs", "zram"] if r % 2 == 0 else ["zram", "tmemfs"]
                for job in fio.JOBS:
                    for name in order:
                        bar.note(f"run {r + 1}: {job.label} on {name}")
                        rate = fio.measure(job, targets[name], cfg.fio_size, cfg.fio_seconds)
                        measured[name].setdefault(job, []).append(rate)
                        bar.step()
    for job in fio.JOBS:
        goal = None if job.random else GOAL["write" if job.writes else "read"]
        section.rows.append(
            paired(job.label, "MB/s", measured["tmemfs"][job], measured["zram"][job], goal)
        )
    section.plots.append(
        plots.bars(
            ctx.plot_path("image"),
            "Image vs zram: fio, direct I/O",
            [row.measure for row in section.rows],
            "MB/s",
            {
                "tmemfs image": [row.tmemfs for row in section.rows],
                "zram (lz4)": [row.reference for row in section.rows],
            },
        )
    )
    return section
