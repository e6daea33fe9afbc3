"""How a page is encoded, in RAM, in Redis and in a writeback tier alike.

A page becomes one of three payloads, told apart by length alone:
- 8 bytes: a same-filled page, the repeated word (zero pages included);
- page_size bytes: a page kept raw (it compressed worse than the reject ratio);
- anything else: an lz4 block (no size header; the page size is known).
An lz4 block of a page that is not same-filled is never 8 bytes long, and the
encoder makes sure of it, so the lengths cannot be confused.
"""

from __future__ import annotations

from collections.abc import Sequence

import lz4.block

from tmemfs.backends.base import Encoded

WORD = 8


def encode_pages(
    pages: Sequence[bytes], page_size: int, reject_ratio: float, overhead: int
) -> list[Encoded]:
    """Encode full pages (runs in a worker thread; python-lz4 releases the GIL).

    A same-filled page's value is its word as an int; any other page's value is its
    payload. `overhead` is what keeping one payload costs beyond its bytes.
    """
    limit = int(page_size * reject_ratio)
    words = page_size // WORD
    out: list[Encoded] = []
    for page in pages:
        head = bytes(page[:WORD])
        # Most pages differ within their first two words; only then compare it all.
        if page[WORD : 2 * WORD] == head and page == head * words:
            out.append(Encoded(int.from_bytes(head, "little"), 0))
            continue
        payload = lz4.block.compress(page, store_size=False)
        poor = len(payload) > limit or len(payload) >= page_size or len(payload) == WORD
        if poor:
            payload = bytes(page)
        hash(payload)  # cached in the object, so a dedup lookup costs the trio thread nothing
        out.append(Encoded(payload, len(payload) + overhead, poor))
    return out


def payload_of(value: int | bytes) -> bytes:
    """The bytes a store keeps for an encoded value."""
    return value.to_bytes(WORD, "little") if isinstance(value, int) else value


def decode_payloads(payloads: Sequence[bytes], page_size: int) -> list[bytes]:
    """Full pages from payloads (runs in a worker thread)."""
    words = page_size // WORD
    out: list[bytes] = []
    for payload in payloads:
        if len(payload) == WORD:
            out.append(payload * words)
        elif len(payload) == page_size:
            out.append(payload)
        else:
            out.append(lz4.block.decompress(payload, uncompressed_size=page_size))
    return out
