"""fio, as both sides of comparison 1 run it: one job, direct I/O, JSON out."""

from __future__ import annotations

import json
from dataclasses import dataclass

from bench.system import run


@dataclass(frozen=True)
class Job:
    """One fio workload: sequential jobs move `size` bytes, random ones run for `seconds`."""

    label: str
    rw: str  # fio --rw: write, read, randwrite, randread
    block: str  # fio --bs
    depth: int = 1  # requests in flight: 1 with psync, more with libaio

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def writes(self) -> bool:
        return "write" in self.rw


JOBS = (
    Job("1 MiB sequential write", "write", "1M"),
    Job("1 MiB sequential read", "read", "1M"),
    Job("1 MiB sequential write, iodepth 8", "write", "1M", 8),
    Job("1 MiB sequential read, iodepth 8", "read", "1M", 8),
    Job("4 KiB random write", "randwrite", "4k"),
    Job("4 KiB random read", "randread", "4k"),
)

# Fresh, half-compressible data in every page (about 2x with lz4, like the file
# corpus): fio's default buffers repeat, which tmemfs would deduplicate and zram not.
DATA = ["--refill_buffers", "--buffer_compress_percentage=50", "--buffer_compress_chunk=4096"]


def command(job: Job, target: str, size: int, seconds: float) -> list[str]:
    engine = "psync" if job.depth == 1 else "libaio"
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={target}",
        "--direct=1",
        f"--ioengine={engine}",
        f"--iodepth={job.depth}",
        "--numjobs=1",
        f"--rw={job.rw}",
        f"--bs={job.block}",
        f"--size={size}",
        "--randrepeat=1",
        "--output-format=json",
        *DATA,
    ]
    if job.random:
        cmd += ["--time_based", f"--runtime={seconds}s"]
    return cmd


def measure(job: Job, target: str, size: int, seconds: float) -> float:
    """MB/s (10^6 bytes per second, as fio's bw_bytes) of one fio run."""
    out = run(command(job, target, size, seconds), timeout=300).stdout
    result = json.loads(out[out.index("{") :])  # fio may print notes before the JSON
    side = result["jobs"][0]["write" if job.writes else "read"]
    return float(side["bw_bytes"]) / 1e6
