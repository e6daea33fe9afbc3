"""`raw`: pages kept uncompressed in RAM, as Xen tmem without compression. The baseline."""

from __future__ import annotations

from collections.abc import Sequence

from tmemfs.backends.base import Backend, Encoded
from tmemfs.backends.store import Location

# A bytes object's header, plus its share of the handle's slot in the engine index.
_HANDLE_OVERHEAD = 33


class RawBackend(Backend):
    """Every page costs a full page of RAM; nothing is shared or compressed."""

    name = "raw"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._pages = 0

    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        # Copying is the only work; it is cheap enough for the trio thread.
        return [Encoded(bytes(p), len(p) + _HANDLE_OVERHEAD) for p in pages]

    def store(self, encoded: Encoded) -> bytes:
        self._pages += 1
        return encoded.value

    async def load_many(
        self, locations: Sequence[Location], handles: Sequence[bytes]
    ) -> list[bytes | None]:
        return list(handles)

    def invalidate(self, handle: bytes) -> None:
        self._pages -= 1

    def payload_of(self, handle: bytes) -> bytes:
        return handle

    def payload_share(self, handle: bytes) -> float:
        return len(handle)

    def page_charge(self, handle: bytes) -> int:
        return len(handle) + _HANDLE_OVERHEAD

    def is_same_filled(self, handle: bytes) -> bool:
        return False

    def is_shared(self, handle: bytes) -> bool:
        return False

    def memory_used(self) -> int:
        return self._pages * (self.page_size + _HANDLE_OVERHEAD)

    def stats(self) -> dict[str, int]:
        return {
            "compr_data_size": self._pages * self.page_size,
            "same_filled_pages": 0,
            "dedup_pages": 0,
        }
