"""examples/swap_workload.py in a memory cgroup, swapping to zram or to a swap file.

The tmemfs side of comparison 3 is examples/swap-on-loop.sh itself; this is the
same workload, cgroup and swap priority on the two references, with the same
discipline: everything set up here is undone in a `finally`, with timeouts, and
swap that this module did not switch on is never touched.

    python -m bench.swap zram|disk [--limit 256M] [--working-set 512M]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import devices
from bench.system import ROOT, communicate, run, try_run, warn

WORKLOAD = ROOT / "examples" / "swap_workload.py"
SCRIPT = ROOT / "examples" / "swap-on-loop.sh"
PRIORITY = "32767"  # above any swap already on, as swap-on-loop.sh does
MiB = 1 << 20


@dataclass
class Outcome:
    """One run of the workload: its wall time and what the kernel swapped meanwhile."""

    passed: bool
    wall: float  # seconds from start to exit of the workload (fill plus two passes)
    swapped_out: int  # pages, /proc/vmstat pswpout over the run (system-wide)
    swapped_in: int
    tail: str  # the last lines of output, to explain a failure
    memory: Memory = field(default_factory=lambda: Memory())


@dataclass
class Memory:
    """What the swap store held, sampled each second against the swap in use.

    `held` is zram's mem_used_total or tmemfs' pool_total_size; the averages are over
    the samples with at least a tenth of the peak swap in use (start and exit aside).
    """

    peak_used: float = float("nan")  # bytes of swap in use at the peak (/proc/swaps)
    held_at_peak: float = float("nan")  # bytes held at that sample
    held_average: float = float("nan")
    stored_ratio: float = float("nan")  # stored pages / swap in use, average (tmemfs)
    held_after: float = float("nan")  # bytes held once the workload has exited
    # tmemfs: the most pages held in zstd at any sample, and loads that met one
    recompressed_most: int | None = None
    recompressed_loads: int | None = None


def summarize(samples: list[tuple[int, int]], after: float) -> Memory:
    """Memory from (swap in use, held) samples, in bytes."""
    if not samples:
        return Memory(held_after=after)
    top = max(used for used, _ in samples)
    peak = max(samples, key=lambda s: s[0])
    busy = [held for used, held in samples if used and used * 10 >= top]
    return Memory(
        peak[0], peak[1], sum(busy) / len(busy) if busy else float("nan"), held_after=after
    )


class Sampler:
    """Each second, in a thread: bytes of swap in use on `device`, and `held()`."""

    def __init__(self, device: Path, held: Callable[[], int]) -> None:
        self.device, self.held = os.path.realpath(device), held
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((swap_used(self.device), self.held()))


def swap_used(device: str) -> int:
    """Bytes of swap in use on a device, from /proc/swaps."""
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        fields = line.split()
        if fields and os.path.realpath(fields[0]) == device:
            return int(fields[3]) * 1024
    return 0


# -- memory cgroup -----------------------------------------------------------------------


def cgroup_parent() -> tuple[int, Path]:
    """Where to make a memory cgroup: (version, parent), found as swap-on-loop.sh does."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    own = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    v2 = next((Path(m[1]) for m in mounts if m[2] == "cgroup2"), None)
    if v2 is not None and "memory" in _words(v2 / "cgroup.controllers"):
        # Our own cgroup if it hands memory down, else the nearest ancestor that does.
        here = v2 / next(c[2] for c in own if c[0] == "0").lstrip("/")
        for d in (here, *here.parents):
            if "memory" in _words(d / "cgroup.subtree_control"):
                return 2, d
            if d == v2:
                break
    v1 = next(
        (Path(m[1]) for m in mounts if m[2] == "cgroup" and "memory" in m[3].split(",")), None
    )
    mine = next((c[2] for c in own if "memory" in c[1].split(",")), None)
    if v1 is not None and mine is not None:
        # Under our own memory cgroup, so whatever limits the caller has still apply.
        return 1, v1 / mine.lstrip("/")
    raise RuntimeError("no memory cgroup (neither v2 with the memory controller nor v1)")


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


@contextlib.contextmanager
def memory_cgroup(limit: int, name: str) -> Iterator[Path]:
    version, parent = cgroup_parent()
    path = parent / name
    path.mkdir()
    try:
        if version == 2:
            (path / "memory.max").write_text(str(limit))
            with contextlib.suppress(OSError):  # keep zswap out of the way of the device
                (path / "memory.zswap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):
                (path / "memory.swappiness").write_text("100")
        yield path
    finally:
        remove_cgroup(path)


def remove_cgroup(path: Path) -> None:
    """Kill whatever is left in our cgroup, then remove it (it empties asynchronously)."""
    for i in range(100):
        pids = [int(p) for p in _words(path / "cgroup.procs")]
        if i > 10:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        with contextlib.suppress(OSError):
            path.rmdir()
            return
        time.sleep(0.1)
    warn(f"cleanup: could not remove cgroup {path}; undo by hand: rmdir {path}")


# -- swap devices ------------------------------------------------------------------------


@contextlib.contextmanager
def swap_on(device: Path) -> Iterator[Path]:
    run(["mkswap", str(device)])
    run(["swapon", "-p", PRIORITY, str(device)])
    try:
        yield device
    finally:
        # swapoff reads every swapped page back in: allow for a slow disk.
        if not try_run(["swapoff", str(device)], timeout=600):
            raise RuntimeError(f"swapoff {device} failed; it is still swap")


@contextlib.contextmanager
def zram_swap(size: int) -> Iterator[Path]:
    with devices.zram(size) as zram, swap_on(zram.device) as device:
        yield device


@contextlib.contextmanager
def file_swap(directory: Path, size: int) -> Iterator[Path]:
    """A swap file on the disk under `directory`, fully allocated (swap wants no holes)."""
    path = directory / "bench.swap"
    try:
        with open(path, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            os.posix_fallocate(f.fileno(), 0, size)
        with swap_on(path):
            yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.resolve().as_posix() not in Path("/proc/swaps").read_text():
                path.unlink()


# -- runs --------------------------------------------------------------------------------


def vmstat(name: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        key, value = line.split()
        if key == name:
            return int(value)
    return 0


def workload(limit: int, working_set: int, timeout: float) -> Outcome:
    """Run the workload in a new memory cgroup on whatever swap is on now."""
    with memory_cgroup(limit, f"bench-swap-{os.getpid()}") as cgroup:
        out0, in0 = vmstat("pswpout"), vmstat("pswpin")
        start = time.monotonic()
        # The shell joins the cgroup, then becomes the workload: only it runs there.
        proc = subprocess.Popen(
            [
                "sh",
                "-c",
                'echo $$ > "$1" && shift && exec "$@"',
                "bench-swap-workload",
                str(cgroup / "cgroup.procs"),
                sys.executable,
                "-u",
                str(WORKLOAD),
                "--working-set",
                str(working_set),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\ntimed out after {timeout:.0f} s"
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.monotonic() - start
        return Outcome(
            proc.returncode == 0 and "workload: PASS" in output,
            wall,
            vmstat("pswpout") - out0,
            vmstat("pswpin") - in0,
            _tail(output),
        )


def on_zram(limit: int, working_set: int, timeout: float) -> Outcome:
    # zram needs room for the whole overflow uncompressed: disksize counts pages, not bytes held.
    with zram_swap(working_set + 64 * MiB) as device:
        held = lambda: devices.Zram.mm_stat()["mem_used_total"]  # noqa: E731
        with Sampler(device, held) as sampler:
            outcome = workload(limit, working_set, timeout)
        # zram frees a slot as swap frees it (swap_slot_free_notify); allow a moment.
        time.sleep(2)
        outcome.memory = summarize(sampler.samples, held())
        return outcome


def on_disk(directory: Path, limit: int, working_set: int, timeout: float) -> Outcome:
    with file_swap(directory, working_set + 64 * MiB):
        return workload(limit, working_set, timeout)


def on_tmemfs(
    limit: int,
    working_set: int,
    timeout: float,
    page_cluster: str = "5",
    recompress_after: float | None = None,
) -> Outcome:
    """examples/swap-on-loop.sh, which mounts, swaps, runs and undoes everything itself
    (at its default vm.page-cluster 5; "keep" runs at whatever is set now), with the
    mount's default recompression unless `recompress_after` says otherwise."""
    tmemfs = Path(sys.executable).parent / "tmemfs"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        TMEMFS=str(tmemfs) if tmemfs.exists() else f"{sys.executable} -m tmemfs",
    )
    proc = subprocess.Popen(
        [
            "bash",
            str(SCRIPT),
            "--limit",
            str(limit),
            "--working-set",
            str(working_set),
            "--image-size",
            str(working_set + 64 * MiB),
            "--timeout",
            str(int(timeout)),
            "--page-cluster",
            page_cluster,
            *(["--recompress-after", f"{recompress_after:g}"] if recompress_after else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output = communicate(proc, timeout + 660)  # the script enforces --timeout itself
    wall = re.search(r"^wall time:\s+([\d.]+) s", output, re.MULTILINE)
    out = re.search(r"^pages swapped out:\s+(\d+)", output, re.MULTILINE)
    back = re.search(r"^pages swapped in:\s+(\d+)", output, re.MULTILINE)
    return Outcome(
        proc.returncode == 0 and "workload: PASS" in output,
        float(wall.group(1)) if wall else float("nan"),
        int(out.group(1)) if out else 0,
        int(back.group(1)) if back else 0,
        _tail(output),
        script_memory(output),
    )


def script_memory(output: str) -> Memory:
    """The figures swap-on-loop.sh's summary gives, which it samples as Sampler does."""
    memory = Memory()
    held = re.search(
        r"^memory held:\s+([\d.]+) MiB \(pool_total_size\) at the peak swap in "
        r"use, ([\d.]+) MiB = \d+%; average ([\d.]+) MiB",
        output,
        re.MULTILINE,
    )
    if held:
        memory.held_at_peak, memory.peak_used, memory.held_average = (
            float(g) * MiB for g in held.groups()
        )
    ratio = re.search(r"^stored vs swap in use:\s+average ([\d.]+)x", output, re.MULTILINE)
    if ratio:
        memory.stored_ratio = float(ratio.group(1))
    after = re.search(r"^tmemfs holds after exit:\s+([\d.]+) MiB", output, re.MULTILINE)
    if after:
        memory.held_after = float(after.group(1)) * MiB
    recompressed = re.search(
        r"^recompressed:\s+at most (\d+) pages in zstd at any sample; \+(-?\d+) loads",
        output,
        re.MULTILINE,
    )
    if recompressed:
        memory.recompressed_most, memory.recompressed_loads = map(int, recompressed.groups())
    return memory


def _tail(output: str, lines: int = 12) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device", choices=("zram", "disk", "tmemfs"))
    parser.add_argument("--limit", type=int, default=256, help="MiB (default 256)")
    parser.add_argument("--working-set", type=int, default=512, help="MiB (default 512)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds (default 600)")
    args = parser.parse_args()
    limit, ws = args.limit * MiB, args.working_set * MiB
    if args.device == "zram":
        outcome = on_zram(limit, ws, args.timeout)
    elif args.device == "disk":
        with _scratch() as directory:
            outcome = on_disk(directory, limit, ws, args.timeout)
    else:
        outcome = on_tmemfs(limit, ws, args.timeout)
    print(outcome.tail)
    print(
        f"{args.device}: {'PASS' if outcome.passed else 'FAIL'} in {outcome.wall:.1f} s, "
        f"pswpout {outcome.swapped_out} pswpin {outcome.swapped_in}"
    )
    m = outcome.memory
    print(
        f"memory held: {m.held_at_peak / MiB:.1f} MiB at the peak swap in use "
        f"({m.peak_used / MiB:.1f} MiB), {m.held_average / MiB:.1f} MiB on average, "
        f"{m.held_after / MiB:.1f} MiB after exit; stored/in use {m.stored_ratio:.2f}x"
    )
    return 0 if outcome.passed else 1


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tmemfs-bench.", dir="/var/tmp") as tmp:
        yield Path(tmp)


if __name__ == "__main__":
    raise SystemExit(main())
