"""Does `pool_total_size` tell the truth about the daemon's memory, and does the budget hold?

Measured from outside, as an operator would: VmRSS of the daemon's pid before and
after storing through the block image with `dd oflag=direct`. The baseline is taken
after a warm-up: the first WARM_MIB of the corpus stored (and recompressed, where the
test recompresses). What the first stores pay once (the first image makes the daemon
mlockall, which makes its already-mapped code resident; OpenMP's threads, pyfuse3's
request buffers, the recompression thread and its zstd contexts, all resident under
mlockall) is not what pages cost; everything after the baseline counts, and is
compared with what pool_total_size grew by.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Mount

from bench.pagefiles import usr_lib_pages

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MIB = 1 << 20
PAGE = 4096
HONEST_MIB = 160  # real-file pages stored for the honesty check
WARM_MIB = 16  # of them, stored before the baseline
TOLERANCE = 0.10  # pool_total_size within 10% of RSS growth
CAP_MIB = 64  # --max-pool of the cap check
PUSH_MIB = 256  # incompressible data pushed at it
# The fixed overhead allowed above --max-pool: two worker threads' 8 MiB stacks
# (resident under mlockall) plus 8 MiB for request buffers and allocator slack.
FIXED_OVERHEAD_MIB = 24


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def real_file_corpus(path: Path, size: int) -> None:
    """The first `size` bytes of whole pages of the files under /usr/lib, in sorted order
    (the bench's corpus of real files, read the same way)."""
    with open(path, "wb") as out:
        taken = sum(out.write(page) for page in usr_lib_pages(size))
    if taken < size:
        raise AssertionError(f"/usr/lib holds only {taken} bytes of whole pages")


def settle(pid: int) -> int:
    time.sleep(0.5)
    return vm_rss(pid)


def store_corpus(corpus: Path, image: Path, first_mib: int, count_mib: int) -> None:
    """dd MiBs first..first+count of the corpus to the same place in the image."""
    subprocess.run(
        [
            "dd",
            f"if={corpus}",
            f"of={image}",
            "bs=1M",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
            f"skip={first_mib}",
            f"seek={first_mib}",
            f"count={count_mib}",
        ],
        check=True,
        timeout=120,
    )


def test_pool_total_size_tracks_rss_growth(tmp_path: Path, mount_factory) -> None:  # type: ignore[no-untyped-def]
    corpus = tmp_path / "corpus"
    real_file_corpus(corpus, HONEST_MIB * MIB)
    mount: Mount = mount_factory()
    image = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", f"{2 * HONEST_MIB}M", str(image)], check=True)
    store_corpus(corpus, image, 0, WARM_MIB)
    baseline, warm = settle(mount.proc.pid), mount.stats()
    store_corpus(corpus, image, WARM_MIB, HONEST_MIB - WARM_MIB)
    growth = settle(mount.proc.pid) - baseline
    stats = mount.stats()
    assert stats["stored_pages"] == HONEST_MIB * MIB // PAGE
    total = stats["pool_total_size"] - warm["pool_total_size"]
    print(
        f"honesty: stored {HONEST_MIB - WARM_MIB} MiB after {WARM_MIB}, RSS growth {growth} B,"
        f" pool_total_size grew {total} B, growth/total {growth / total:.3f}"
    )
    assert abs(growth - total) <= TOLERANCE * growth, (
        f"RSS grew {growth / MIB:.1f} MiB, pool_total_size says {total / MIB:.1f} MiB "
        f"({(growth - total) / total:+.1%})"
    )


def test_pool_total_size_tracks_rss_after_recompression(tmp_path: Path, mount_factory) -> None:  # type: ignore[no-untyped-def]
    """Recompression frees lz4 slots and takes zstd ones: RSS must follow the figure."""
    from test_recompress import wait_for_recompression

    corpus = tmp_path / "corpus"
    real_file_corpus(corpus, HONEST_MIB * MIB)
    # Sweeps every 4 s: the first after the stores only marks them idle, so the RSS
    # before recompression can be read in between.
    mount: Mount = mount_factory("--recompress-after", "4")
    image = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", f"{2 * HONEST_MIB}M", str(image)], check=True)
    store_corpus(corpus, image, 0, WARM_MIB)
    warm = wait_for_recompression(mount, timeout=180)
    baseline = settle(mount.proc.pid)
    store_corpus(corpus, image, WARM_MIB, HONEST_MIB - WARM_MIB)
    stored = mount.stats()
    growth_before = settle(mount.proc.pid) - baseline
    assert mount.stats()["recompressed_pages"] == warm["recompressed_pages"]
    # Most of the new pages shrink by a size class or more under zstd.
    stats = wait_for_recompression(
        mount,
        timeout=180,
        at_least=warm["recompressed_pages"] + (HONEST_MIB - WARM_MIB) * MIB // PAGE // 2,
    )
    growth = settle(mount.proc.pid) - baseline
    total = stats["pool_total_size"] - warm["pool_total_size"]
    print(
        f"honesty after recompression: pool_total_size {stored['pool_total_size']} -> "
        f"{total} B ({stats['recompressed_pages']} pages recompressed), RSS growth "
        f"{growth_before} -> {growth} B, growth/total {growth / total:.3f}"
    )
    # What recompression gave back, RSS and pool_total_size agree on.
    freed = stored["pool_total_size"] - stats["pool_total_size"]
    assert abs((growth_before - growth) - freed) <= TOLERANCE * freed + 2 * MIB
    assert stats["recompressed_pages"] > 0
    assert stats["pool_total_size"] < stored["pool_total_size"]
    assert abs(growth - total) <= TOLERANCE * growth, (
        f"RSS grew {growth / MIB:.1f} MiB, pool_total_size says {total / MIB:.1f} MiB "
        f"({(growth - total) / total:+.1%})"
    )


def test_memory_stays_within_max_pool(mount_factory) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = mount_factory("--max-pool", f"{CAP_MIB}M")
    image = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", f"{PUSH_MIB}M", str(image)], check=True)
    pid = mount.proc.pid
    baseline = settle(pid)
    peak, refused = baseline, 0
    fd = os.open(image, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT wants
        for i in range(PUSH_MIB):
            buf[:] = os.urandom(MIB)
            try:
                os.pwrite(fd, buf, i * MIB)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                refused += 1
            peak = max(peak, vm_rss(pid))
    finally:
        os.close(fd)
    peak = max(peak, settle(pid))
    stats = mount.stats()
    print(
        f"cap: pushed {PUSH_MIB} MiB into --max-pool {CAP_MIB}M: {refused} MiB requests "
        f"refused, peak RSS growth {(peak - baseline) / MIB:.1f} MiB, pool_total_size "
        f"{stats['pool_total_size'] / MIB:.1f} MiB, stored_pages {stats['stored_pages']}"
    )
    assert refused > PUSH_MIB // 2, "most of it must be refused"
    assert stats["pool_limit_hit"] > 0
    assert stats["pool_total_size"] <= CAP_MIB * MIB
    assert peak - baseline <= (CAP_MIB + FIXED_OVERHEAD_MIB) * MIB
    assert mount.alive()
