"""The store itself with and without a recompression dictionary (issue 13, item 2).

Each corpus is kept in a SlabStore (one thread), then swept as Lz4Backend sweeps it:
a first sweep marks every page idle, the second recompresses them with zstd-3, in
batches of 256; with the dictionary its first batch is a training batch of 1024
pages (a 64 KiB dictionary). Printed: memory_used after the sweeps (payload slots,
records, the dictionary), that plus the page index's PAGE_BYTES a page (what pool_total_size
adds), both against the per-page zstd-3 reference the bench uses (per-page zstd-3
sizes + 70 B/page); and the CPU time (thread time, so other load does not count) per
page to recompress (training apart) and to load (decompress) every page.

    python -m bench.dict_inprocess [--files MiB] [--anon MiB]
"""

from __future__ import annotations

import argparse
import time

from tmemfs._pagestore import SlabStore
from tmemfs._pagetable import PAGE_BYTES

from bench import corpora
from bench.compare.memory import zstd_reference
from tmemfs.backends.lz4 import DICT_BYTES, RECOMPRESS_BATCH, TRAIN_BATCH

MiB = 1 << 20


def sweep(store: SlabStore, dictionary: bool, train: bool) -> tuple[float, float, int]:
    """One sweep; (CPU seconds of the training batch, of the others, pages they took)."""
    trained = other = 0.0
    pages = 0
    while True:
        batch = store.recompress_begin(
            TRAIN_BATCH if train else RECOMPRESS_BATCH,
            3,
            dictionary=dictionary,
            train=DICT_BYTES if train else 0,
        )
        start = time.thread_time()
        batch.run()
        spent = time.thread_time() - start
        store.recompress_commit(batch)
        if train and batch.count:
            trained += spent
            train = False
        else:
            other += spent
            pages += batch.count
        if batch.sweep_done:
            return trained, other, pages


def measure(corpus: corpora.Corpus) -> None:
    reference = zstd_reference(corpus)
    data = bytes(corpus.data[:])
    print(
        f"{corpus.name}: {corpus.pages} pages, per-page zstd-3 reference {reference / MiB:.2f} MiB"
    )
    for dictionary in (False, True):
        store = SlabStore(corpora.PAGE, corpora.PAGE * 7 // 8, 1)
        handles = store.keep_all(store.encode(data))
        lz4_used = store.memory_used()
        sweep(store, dictionary, False)
        trained, spent, pages = sweep(store, dictionary, dictionary)
        used = store.memory_used()
        pool_total = used + corpus.pages * PAGE_BYTES
        out = bytearray(len(data))
        start = time.thread_time()
        store.load_into(handles, out)
        load = time.thread_time() - start
        assert out == data
        print(
            f"  {'zstd-3+dict' if dictionary else 'zstd-3     '}: memory_used "
            f"{used / MiB:.2f} MiB (lz4 {lz4_used / MiB:.2f}; dictionary "
            f"{store.dictionary_bytes} B, {store.dict_pages} of {store.recompressed_pages} "
            f"recompressed pages use it) = {used / reference:.3f}x reference; with the "
            f"index {pool_total / reference:.3f}x; recompress {spent / max(pages, 1) * 1e6:.1f}"
            f" us/page (+ training {trained:.2f} s); load {load / len(handles) * 1e6:.1f}"
            f" us/page"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=128)
    parser.add_argument("--anon", type=int, default=64)
    args = parser.parse_args()
    if args.anon:
        measure(corpora.anon(args.anon * MiB))
    if args.files:
        measure(corpora.files(args.files * MiB))


if __name__ == "__main__":
    main()
