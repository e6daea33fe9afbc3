"""Does a trained zstd dictionary pay for page-by-page recompression? (issue 13, item 2)

For each bench corpus: the sum over distinct, not same-filled pages of each page's zstd
size rounded up to the store's 16-byte slots (a page that does not shrink costs 4096),
without a dictionary and with one trained (ZDICT_trainFromBuffer) on an evenly spaced
sample of the corpus's own distinct pages; the dictionary's own bytes are added.
libzstd through ctypes, so nothing has to be installed.

    python -m bench.dict_measure [--files MiB] [--anon MiB] [--random MiB]
"""

from __future__ import annotations

import argparse
import ctypes
import time

from tmemfs._pagestore import CLASS_STEP

from bench import corpora

PAGE = corpora.PAGE
SLOT = CLASS_STEP
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
lib.ZSTD_isError.restype = ctypes.c_uint
lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
lib.ZSTD_createCCtx.restype = ctypes.c_void_p
lib.ZSTD_createCDict.restype = ctypes.c_void_p
lib.ZSTD_createCDict.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
lib.ZSTD_freeCDict.argtypes = [ctypes.c_void_p]
lib.ZSTD_compress_usingCDict.restype = ctypes.c_size_t
lib.ZSTD_compress_usingCDict.argtypes = [
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
]
lib.ZDICT_trainFromBuffer.restype = ctypes.c_size_t
lib.ZDICT_trainFromBuffer.argtypes = [
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.c_uint,
]
lib.ZDICT_isError.restype = ctypes.c_uint
lib.ZDICT_isError.argtypes = [ctypes.c_size_t]

OUT = ctypes.create_string_buffer(2 * PAGE)


def slots(size: int) -> int:
    return PAGE if size >= PAGE else -(-size // SLOT) * SLOT


def distinct_pages(corpus: corpora.Corpus) -> list[bytes]:
    """What the store keeps a payload for: same-filled pages and duplicates cost none."""
    seen: set[bytes] = set()
    pages = []
    for i in range(corpus.pages):
        page = corpus.page(i)
        if page == page[:8] * (PAGE // 8) or page in seen:
            continue
        seen.add(page)
        pages.append(page)
    return pages


def plain(pages: list[bytes], level: int) -> int:
    return sum(slots(lib.ZSTD_compress(OUT, len(OUT), p, PAGE, level)) for p in pages)


def train(pages: list[bytes], sample_bytes: int, dict_size: int) -> bytes:
    count = min(len(pages), max(sample_bytes // PAGE, 1))
    step = len(pages) / count
    sample = [pages[int(i * step)] for i in range(count)]
    sizes = (ctypes.c_size_t * count)(*([PAGE] * count))
    buffer = ctypes.create_string_buffer(dict_size)
    n = lib.ZDICT_trainFromBuffer(buffer, dict_size, b"".join(sample), sizes, count)
    if lib.ZDICT_isError(n):
        raise RuntimeError("ZDICT_trainFromBuffer failed")
    return buffer.raw[:n]


def with_dict(pages: list[bytes], dictionary: bytes, level: int) -> tuple[int, float]:
    cctx = lib.ZSTD_createCCtx()
    cdict = lib.ZSTD_createCDict(dictionary, len(dictionary), level)
    start = time.perf_counter()
    total = sum(
        slots(lib.ZSTD_compress_usingCDict(cctx, OUT, len(OUT), p, PAGE, cdict)) for p in pages
    )
    elapsed = time.perf_counter() - start
    lib.ZSTD_freeCDict(cdict)
    lib.ZSTD_freeCCtx(ctypes.c_void_p(cctx))
    return total + len(dictionary), elapsed


def measure(corpus: corpora.Corpus, level: int, samples: list[int], dicts: list[int]) -> None:
    pages = distinct_pages(corpus)
    start = time.perf_counter()
    base = plain(pages, level)
    per_page = (time.perf_counter() - start) / max(len(pages), 1)
    print(
        f"{corpus.name}: {corpus.pages} pages, {len(pages)} distinct not same-filled; "
        f"zstd-{level} in slots {base / MiB:.2f} MiB ({base / max(len(pages), 1):.0f} B/page, "
        f"{per_page * 1e6:.1f} us/page)"
    )
    for sample in samples:
        for dict_size in dicts:
            start = time.perf_counter()
            dictionary = train(pages, sample, dict_size)
            trained = time.perf_counter() - start
            total, elapsed = with_dict(pages, dictionary, level)
            print(
                f"  sample {sample // MiB:>3} MiB dict {dict_size // 1024:>3} KiB: "
                f"{total / MiB:.2f} MiB = {total / base:.3f}x (dict included; "
                f"train {trained:.1f} s, {elapsed / max(len(pages), 1) * 1e6:.1f} us/page)"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=128)
    parser.add_argument("--anon", type=int, default=64)
    parser.add_argument("--random", type=int, default=8)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--samples", default="1,4,16")
    parser.add_argument("--dicts", default="16,32,64,112")
    args = parser.parse_args()
    samples = [int(s) * MiB for s in args.samples.split(",")]
    dicts = [int(d) * 1024 for d in args.dicts.split(",")]
    for name in ("anon", "files", "random"):
        size = getattr(args, name) * MiB
        if size:
            measure(
                {"random": corpora.random_pages}.get(name, getattr(corpora, name))(size),
                args.level,
                samples,
                dicts,
            )


if __name__ == "__main__":
    main()
