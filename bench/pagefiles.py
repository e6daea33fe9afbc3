"""Page files through Python open/write/close and open/read/close, tmemfs vs tmpfs.

    python -m bench.pagefiles [--pages 20000] [--corpus-mib 64]

Mounts a fresh tmemfs and a tmpfs side by side (root needed), stores and loads the
same pages through both, and prints pages/s and the ratio. Then stores the first
--corpus-mib MiB of the files under /usr/lib as page files and prints the
compression ratio and pool_total_size.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tmemfs.engine import stats as statsfmt

PAGE = 4096


def tree_pages(root: str) -> Iterator[bytes]:
    """Whole pages of the regular files under `root`, sorted walk, symlinks skipped."""
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                data = Path(path).read_bytes()
            except OSError:
                continue
            for off in range(0, len(data) - PAGE + 1, PAGE):
                yield data[off : off + PAGE]


def usr_lib_pages(limit: int) -> Iterator[bytes]:
    """Whole pages of the files under /usr/lib, in sorted order, up to `limit` bytes."""
    return itertools.islice(tree_pages("/usr/lib"), limit // PAGE)


def store_and_load(pool: Path, pages: list[bytes]) -> tuple[float, float]:
    pool.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, page in enumerate(pages):
        with open(pool / str(i), "wb", buffering=0) as f:
            f.write(page)
    stored = time.perf_counter() - start
    start = time.perf_counter()
    for i, page in enumerate(pages):
        with open(pool / str(i), "rb", buffering=0) as f:
            if f.read() != page:
                raise SystemExit(f"page {i} came back different")
    loaded = time.perf_counter() - start
    return len(pages) / stored, len(pages) / loaded


def stats(mount: Path) -> dict[str, int]:
    """The global counters of a mount, read with tmemfs's own parser."""
    return statsfmt.counters((mount / "stats").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20000)
    parser.add_argument("--corpus-mib", type=int, default=64)
    args = parser.parse_args()
    tmemfs = [sys.executable, "-m", "tmemfs"]
    with tempfile.TemporaryDirectory() as tmp:
        tmem, tmpfs = Path(tmp, "tmem"), Path(tmp, "tmpfs")
        tmem.mkdir()
        tmpfs.mkdir()
        subprocess.run([*tmemfs, "mount", str(tmem)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
        try:
            pages = list(itertools.islice(usr_lib_pages(1 << 40), args.pages))
            t_store, t_load = store_and_load(tmem / "frontswap" / "0", pages)
            r_store, r_load = store_and_load(tmpfs / "frontswap" / "0", pages)
            print(f"page files ({len(pages)} pages of /usr/lib, Python open/write/close):")
            print(
                f"  store  tmemfs {t_store:8.0f} pages/s  tmpfs {r_store:8.0f} pages/s  "
                f"ratio {t_store / r_store:.3f}"
            )
            print(
                f"  load   tmemfs {t_load:8.0f} pages/s  tmpfs {r_load:8.0f} pages/s  "
                f"ratio {t_load / r_load:.3f}"
            )
            subprocess.run(["rmdir", str(tmem / "frontswap" / "0")], check=True)
            corpus = list(usr_lib_pages(args.corpus_mib << 20))
            store_and_load(tmem / "frontswap" / "1", corpus)
            s = stats(tmem)
            print(f"first {args.corpus_mib} MiB of /usr/lib as page files ({len(corpus)} pages):")
            print(
                f"  orig_data_size {s['orig_data_size']}  compr_data_size {s['compr_data_size']}"
                f"  ratio {s['orig_data_size'] / s['compr_data_size']:.2f}"
            )
            print(
                f"  pool_total_size {s['pool_total_size']} "
                f"({s['orig_data_size'] / s['pool_total_size']:.2f}x smaller than the data)  "
                f"same_filled_pages {s['same_filled_pages']}  dedup_pages {s['dedup_pages']}"
            )
        finally:
            subprocess.run(["umount", str(tmpfs)], check=False)
            subprocess.run([*tmemfs, "umount", str(tmem)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
