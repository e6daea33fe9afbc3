"""The kernel swaps through tmemfs: examples/swap-on-loop.sh, run small.

The script makes its own mount, image, loop device, swap and memory cgroup (under
this test's cgroup) and undoes them itself; the test checks that it did.
"""

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
SCRIPT = ROOT / "examples" / "swap-on-loop.sh"
SKIP = 77


def _swaps() -> str:
    return Path("/proc/swaps").read_text()


def _loops() -> str:
    return subprocess.run(
        ["losetup", "-l", "-n"], capture_output=True, text=True, check=False
    ).stdout


def test_kernel_swaps_through_tmemfs(tmp_path: Path) -> None:
    page_cluster = Path("/proc/sys/vm/page-cluster").read_text()
    env = dict(
        os.environ,
        TMEMFS=str(Path(sys.executable).parent / "tmemfs"),
        PYTHON=sys.executable,
        TMPDIR=str(tmp_path),
    )
    result = subprocess.run(
        # An image over twice the swap in use keeps churn low (README: sizing an image).
        [
            "bash",
            str(SCRIPT),
            "--limit",
            "48M",
            "--working-set",
            "160M",
            "--image-size",
            "512M",
            "--timeout",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode == SKIP:
        # 77 says the machine lacks something, and the script checks that before it
        # mounts: a skip after mounting could hide a tmemfs failure.
        assert "mounting tmemfs" not in output, output[-4000:]
        pytest.skip(output.strip().splitlines()[-1])
    assert result.returncode == 0, output[-4000:]
    assert "workload: PASS" in output
    stores = re.search(r"tmemfs stores/loads:\s+\+(\d+) / \+(\d+)", output)
    assert stores, output[-2000:]
    # The kernel stored at least the working set beyond the limit, and read pages back.
    assert int(stores.group(1)) > (160 - 48) * 256
    assert int(stores.group(2)) > 0
    # swapon --discard: slots swap frees are invalidated, so what tmemfs stores tracks
    # the swap in use (sampled each second), and goes once the workload has exited.
    ratio = re.search(
        r"stored vs swap in use:\s+average ([\d.]+)x, peak ([\d.]+)x "
        r"\((\d+) samples",
        output,
    )
    assert ratio, output[-2000:]
    average, peak, samples = float(ratio.group(1)), float(ratio.group(2)), int(ratio.group(3))
    print(f"stored_pages / swap in use: average {average}x, peak {peak}x, {samples} samples")
    assert samples >= 3
    assert average <= 1.25, output[-3000:]
    after = re.search(r"stored after exit:\s+(\d+) pages \([\d.]+% of the peak (\d+)\)", output)
    assert after, output[-2000:]
    assert int(after.group(1)) < int(after.group(2)) / 10, output[-2000:]
    # The summary says what background recompression did meanwhile: under the default
    # --recompress-after (60 s) a run this short holds no page in zstd and no page
    # fault pays for a zstd decode.
    recompressed = re.search(
        r"^recompressed:\s+at most (\d+) pages in zstd at any sample; \+(\d+) loads",
        output,
        re.MULTILINE,
    )
    assert recompressed, output[-2000:]
    assert recompressed.groups() == ("0", "0"), output[-2000:]
    # Nothing is left behind: no swap, no loop device, no mount of ours.
    assert Path("/proc/sys/vm/page-cluster").read_text() == page_cluster  # put back
    assert str(tmp_path) not in _swaps()
    assert str(tmp_path) not in _loops()
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
