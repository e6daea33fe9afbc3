"""Would packing cold runs pay? (issue 13, item 3: measure before building.)

For each bench corpus, in the order its pages would sit in an image: the pages that
keep a payload (not same-filled, not a duplicate of an earlier page, which dedup keeps
once) are compressed with zstd-3 one by one, and in packs of 2, 4 and 8 consecutive
ones (a swap cluster's neighbours). Each payload is rounded up to the store's 16-byte
slots and pays one 28-byte record; a pack pays one record, plus 2 bytes per page for
its offset in the pack. libzstd through ctypes, so nothing has to be installed.

    python -m bench.pack_measure [--files MiB] [--anon MiB]
"""

from __future__ import annotations

import argparse
import ctypes
import time

from tmemfs._pagestore import CLASS_STEP, RECORD_OVERHEAD

from bench import corpora
from bench.dict_measure import distinct_pages

PAGE = corpora.PAGE
SLOT, RECORD = CLASS_STEP, RECORD_OVERHEAD
OFFSET = 2  # a packed page's offset in its pack
MiB = 1 << 20

lib = ctypes.CDLL("libzstd.so.1")
lib.ZSTD_compress.restype = ctypes.c_size_t
lib.ZSTD_compress.argtypes = [
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_int,
]
OUT = ctypes.create_string_buffer(16 * PAGE)


def packed_cost(pages: list[bytes], per_pack: int, level: int) -> tuple[int, float]:
    """Bytes held with packs of `per_pack` pages, and compression seconds per page."""
    total = 0
    start = time.perf_counter()
    for first in range(0, len(pages), per_pack):
        group = b"".join(pages[first : first + per_pack])
        size = min(lib.ZSTD_compress(OUT, len(OUT), group, len(group), level), len(group))
        total += -(-size // SLOT) * SLOT + RECORD + (OFFSET * per_pack if per_pack > 1 else 0)
    return total, (time.perf_counter() - start) / max(len(pages), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=128)
    parser.add_argument("--anon", type=int, default=64)
    parser.add_argument("--level", type=int, default=3)
    args = parser.parse_args()
    for name in ("files", "anon"):
        pages = distinct_pages(getattr(corpora, name)(getattr(args, name) * MiB))
        base, base_time = packed_cost(pages, 1, args.level)
        print(
            f"{name}: {len(pages)} pages keep a payload; zstd-{args.level} page by page "
            f"{base / MiB:.2f} MiB ({base_time * 1e6:.1f} us/page)"
        )
        for per_pack in (2, 4, 8):
            cost, seconds = packed_cost(pages, per_pack, args.level)
            print(
                f"  packs of {per_pack}: {cost / MiB:.2f} MiB = {cost / base:.3f}x "
                f"({seconds * 1e6:.1f} us/page to compress; a load decompresses "
                f"{per_pack} pages)"
            )


if __name__ == "__main__":
    main()
