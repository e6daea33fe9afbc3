"""How a page is encoded, in RAM, in Redis and in a writeback tier alike.

A page becomes one of three payloads, told apart by length alone:
- 8 bytes: a same-filled page, the repeated word (zero pages included);
- page_size bytes: a page kept raw (it compressed worse than the reject ratio);
- anything else: an lz4 block (no size header; the page size is known).
An lz4 block of a page that is not same-filled is never 8 bytes long, and the
encoder makes sure of it, so the lengths cannot be confused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tmemfs.backends.base import Encoded

if TYPE_CHECKING:
    from tmemfs._pagestore import EncodedBatch

WORD = 8


def encode_pages(
    pages: Sequence[bytes], page_size: int, reject_ratio: float, overhead: int
) -> list[Encoded]:
    """Encode full pages in one compiled call (the GIL released, both cores for many).

    A same-filled page's value is its word as an int; any other page's value is its
    payload. `overhead` is what keeping one payload costs beyond its bytes.
    """
    from tmemfs._pagestore import SlabStore

    batch = SlabStore(page_size, int(page_size * reject_ratio)).encode(b"".join(pages))
    return encoded_values(batch, lambda length: length + overhead)


def encoded_values(batch: EncodedBatch, cost: Callable[[int], int]) -> list[Encoded]:
    """One Encoded per page of a compiled batch; `cost` prices a payload by its length."""
    out: list[Encoded] = []
    for i in range(batch.count):
        if batch.is_same_filled(i):
            out.append(Encoded(batch.word(i), 0))
        else:
            length = batch.length(i)
            out.append(Encoded(batch.payload(i), cost(length), batch.is_poor(i)))
    return out


def payload_of(value: int | bytes) -> bytes:
    """The bytes a store keeps for an encoded value."""
    return value.to_bytes(WORD, "little") if isinstance(value, int) else value


def decode_payloads(payloads: Sequence[bytes], page_size: int) -> list[bytes]:
    """Full pages from payloads, decoded in one compiled call."""
    from tmemfs._pagestore import decode_payloads as decode_into

    out = bytearray(len(payloads) * page_size)
    decode_into(list(payloads), page_size, out)
    view = memoryview(out)
    return [bytes(view[i * page_size : (i + 1) * page_size]) for i in range(len(payloads))]


def decode_payloads_into(
    payloads: Sequence[bytes | None], page_size: int, out: bytearray | memoryview
) -> None:
    """Full pages from payloads into one buffer, page n at n * page_size, zeros for a
    None (a page the store did not have), in one compiled call."""
    from tmemfs._pagestore import decode_payloads as decode_into

    decode_into(payloads, page_size, out)
