"""`lz4`: compressed pages in RAM, as zswap and zram keep them.

Three rules, in the order a store meets them (as in zswap_store):
same-filled pages (one 8-byte word repeated, zero pages included) keep just the
word; other pages are lz4-compressed, and kept raw when they compress worse than
the reject ratio (zram's huge pages); identical payloads are kept once with a
reference count.
"""

from __future__ import annotations

from collections.abc import Sequence

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.codec import decode_payloads, encode_pages, payload_of
from tmemfs.backends.store import Location

# Measured CPython costs, so the budget counts what the daemon really holds:
# a Blob (48) + its bytes header (33) + its slot in the dedup table (~50).
_BLOB_OVERHEAD = 131
# A same-filled page keeps only an int, usually a shared small one.
_SAME_FILLED_OVERHEAD = 0


class Blob:
    """One stored payload and the number of pages that use it."""

    __slots__ = ("data", "refs")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.refs = 1


class Lz4Backend(Backend):
    """Compressed RAM with same-filled detection and deduplication."""

    name = "lz4"

    def __init__(self, *args: object, reject_ratio: float = 0.875, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if not 0 < reject_ratio <= 1:
            raise ValueError("reject ratio must be in (0, 1]")
        self.reject_ratio = reject_ratio
        # Keyed by the payload itself: a dict hit compares the bytes in full, so a hash
        # collision can never share two different pages. lz4 is deterministic, so equal
        # pages give equal payloads.
        self._blobs: dict[bytes, Blob] = {}
        self._payload_bytes = 0
        self._same_filled = 0
        self._shared_pages = 0
        self._words = self.page_size // 8

    # Encoding and decoding run in worker threads; python-lz4 releases the GIL.
    def _encode_chunk(self, pages: Sequence[bytes]) -> list[Encoded]:
        return encode_pages(pages, self.page_size, self.reject_ratio, _BLOB_OVERHEAD)

    def _decode_chunk(self, payloads: Sequence[bytes]) -> list[bytes]:
        return decode_payloads(payloads, self.page_size)

    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        return await self.run_batched(self._encode_chunk, pages)

    def store(self, encoded: Encoded) -> int | Blob:
        value = encoded.value
        if isinstance(value, int):
            self._same_filled += 1
            return value
        blob = self._blobs.get(value)
        if blob is None:
            blob = self._blobs[value] = Blob(value)
            self._payload_bytes += len(value)
            return blob
        blob.refs += 1
        self._shared_pages += 2 if blob.refs == 2 else 1
        return blob

    async def load_many(
        self, locations: Sequence[Location], handles: Sequence[int | Blob]
    ) -> list[bytes | None]:
        pages: list[bytes | None] = []
        compressed: list[tuple[int, bytes]] = []
        for i, handle in enumerate(handles):
            if isinstance(handle, int):
                pages.append(handle.to_bytes(8, "little") * self._words)
            elif len(handle.data) == self.page_size:
                pages.append(handle.data)
            else:
                pages.append(b"")
                compressed.append((i, handle.data))
        if compressed:
            decoded = await self.run_batched(self._decode_chunk, [p for _, p in compressed])
            for (i, _), page in zip(compressed, decoded, strict=True):
                pages[i] = page
        return pages

    def invalidate(self, handle: int | Blob) -> None:
        if isinstance(handle, int):
            self._same_filled -= 1
            return
        handle.refs -= 1
        if handle.refs == 0:
            del self._blobs[handle.data]
            self._payload_bytes -= len(handle.data)
        else:
            self._shared_pages -= 2 if handle.refs == 1 else 1

    def payload_of(self, handle: int | Blob) -> bytes:
        return payload_of(handle if isinstance(handle, int) else handle.data)

    def payload_share(self, handle: int | Blob) -> float:
        if isinstance(handle, int):
            return 0
        return len(handle.data) / handle.refs

    def is_same_filled(self, handle: int | Blob) -> bool:
        return isinstance(handle, int)

    def is_shared(self, handle: int | Blob) -> bool:
        return not isinstance(handle, int) and handle.refs > 1

    def memory_used(self) -> int:
        return (
            self._payload_bytes
            + len(self._blobs) * _BLOB_OVERHEAD
            + self._same_filled * _SAME_FILLED_OVERHEAD
        )

    def stats(self) -> dict[str, int]:
        return {
            "compr_data_size": self._payload_bytes,
            "same_filled_pages": self._same_filled,
            "dedup_pages": self._shared_pages,
        }

    def describe(self) -> str:
        return f"lz4 (reject ratio {self.reject_ratio})"
