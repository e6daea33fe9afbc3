"""`python -m bench --quick`: every comparison runs, the report and plots are written, and
nothing the bench set up is left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

ROOT = Path(__file__).resolve().parent.parent
SKIP = 77
COMPARISONS = (
    "1. Image vs zram",
    "2. Memory held",
    "3. Swap experiment",
    "4. Page files",
    "5. Redis backend",
    "6. Growth",
    "7. FUSE ceiling and memory given back",
)
PLOTS = ("image", "memory", "swap", "pagefiles", "redis", "growth")


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the bench resets zram0, turns swap on and mounts file systems"
    if not Path("/sys/block/zram0").is_dir():
        return "needs zram (/sys/block/zram0 missing)"
    return None


def _published() -> dict[str, int]:
    """What a full run publishes: bench/results/* and BENCHMARKS.md, with mtimes."""
    paths = [*ROOT.joinpath("bench", "results").glob("*"), ROOT / "BENCHMARKS.md"]
    return {str(p): p.stat().st_mtime_ns for p in paths if p.exists()}


def _leftovers(scratch_prefix: str) -> list[str]:
    found = []
    if Path("/sys/block/zram0/disksize").read_text().strip() != "0":
        found.append("zram0 still has a disksize")
    if (
        "/dev/zram0" in Path("/proc/swaps").read_text()
        or "bench.swap" in Path("/proc/swaps").read_text()
    ):
        found.append("swap of the bench still on")
    found += [
        line for line in Path("/proc/mounts").read_text().splitlines() if scratch_prefix in line
    ]
    found += [str(p) for p in Path("/sys/fs/cgroup").rglob("bench-swap-*")]
    return found


@pytest.mark.timeout(300)
def test_quick_bench_writes_every_comparison(tmp_path: Path) -> None:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    before = _published()
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode == SKIP:
        pytest.skip(output.strip().splitlines()[-1])
    assert result.returncode == 0, output[-4000:]

    reports = list(out.glob("*.md"))
    assert len(reports) == 1, os.listdir(out)
    text = reports[0].read_text()
    for heading in COMPARISONS:
        assert f"## {heading}" in text, heading
    assert "This comparison failed" not in text, text
    for section in ("## Machine", "## Versions", "## Corpora", "| cores |", "| redis-server |"):
        assert section in text
    stem = reports[0].stem
    for plot in PLOTS:
        png = out / f"{stem}-{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({stem}-{plot}.png)" in text
    # Every goal is printed next to its figure.
    for goal in (
        "≥ 1x zram",
        "≤ 1x zram swap",
        "≤ 0.85x zram",
        "≥ 0.3x tmpfs",
        "≥ 0.5x redis-benchmark",
        "≥ 0.85x bare pyfuse3",
        "≥ 1.5x bare pyfuse3",
    ):
        assert goal in text, goal
    assert re.search(r"\| 1 MiB sequential write \| MB/s \| [\d,.]+ \| [\d,.]+ \| [\d.]+x", text)
    # A quick run into --out leaves bench/results and BENCHMARKS.md alone, and the
    # machine as it was.
    assert _published() == before
    assert _leftovers("/var/tmp/tmemfs-bench.") == []
