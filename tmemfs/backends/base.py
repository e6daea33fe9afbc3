"""The interface every backend implements.

A backend is an allocator for page contents, like a zpool under zswap: the engine
keeps the index (which key holds which handle) and decides what is admitted; the
backend decides how a page is represented and what it costs. Encoding and decoding
are batched and compiled (tmemfs/_pagestore.pyx): pyfuse3 serves every request
from one trio thread, and a 1 MiB request is 256 pages of CPU work, done in one call
that releases the GIL and uses both cores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

import trio

if TYPE_CHECKING:
    from tmemfs._pagestore import EncodedBatch
    from tmemfs.backends.store import Location
    from tmemfs.engine.keys import PoolId

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class Encoded:
    """A page ready to be kept: its representation, and what keeping it costs at most.

    `poor` says the page compressed worse than the reject ratio and is held raw;
    the engine refuses it instead when --reject-poor is set.
    """

    value: Any
    cost: int
    poor: bool = False


class RestoredPool(NamedTuple):
    """A pool a remote backend still holds from an earlier mount: its pages by index,
    and the size of its block image (None: it had none)."""

    pool: PoolId
    generation: int
    pages: dict[int, Any]
    image_size: int | None = None


class Backend(ABC):
    """Where page contents live. Handles are opaque to the engine.

    A local backend keeps pages in this process: `store_many` completes without
    waiting, so the engine admits and keeps a batch atomically. A remote backend
    (`remote = True`) waits on the network, may fail (StoreUnavailable), and keeps
    each page at a Location that the engine names.
    """

    #: The name used by --backend and shown in stats.
    name: str = ""
    #: Pages live outside this process: stores and deletes wait, and can fail.
    remote: ClassVar[bool] = False
    #: Whole runs of pages can be kept and loaded in one call (encode_run, keep_run,
    #: run_cost, charge_many, load_into): the engine's image path then decides once per
    #: request.
    batches: ClassVar[bool] = False
    #: A remote backend keeps a whole run of pages in one call (encode_run,
    #: store_batch): the engine's image path then decides once per request.
    stores_runs: ClassVar[bool] = False

    def __init__(self, page_size: int, limiter: trio.CapacityLimiter) -> None:
        self.page_size = page_size
        self.limiter = limiter

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect; StoreUnavailable if the backend cannot be reached."""

    async def restore(self) -> list[RestoredPool]:
        """Persistent pools kept from an earlier mount (remote backends only)."""
        return []

    async def save_image(self, pool: str, generation: int, size: int | None) -> None:  # noqa: B027
        """Keep a pool's image size for restore() (remote backends); None: no image."""

    @abstractmethod
    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        """Turn full pages into their stored form (compression happens here)."""

    def store(self, encoded: Encoded) -> Any:
        """Keep an encoded page in this process and return its handle (local backends)."""
        raise NotImplementedError

    async def store_many(
        self, locations: Sequence[Location], encoded: Sequence[Encoded]
    ) -> list[Any]:
        """Keep encoded pages, returning their handles; StoreUnavailable if it cannot."""
        return [self.store(e) for e in encoded]

    def encode_run(self, data: bytes | bytearray | memoryview) -> EncodedBatch:
        """Compress whole pages from one buffer in one compiled call (backends with
        `batches` or `stores_runs` only)."""
        raise NotImplementedError

    async def store_batch(self, locations: Sequence[Location], batch: EncodedBatch) -> list[Any]:
        """Keep every page of a batch at its location, returning their handles;
        StoreUnavailable if not all were kept (backends with `stores_runs` only)."""
        raise NotImplementedError

    @abstractmethod
    async def load_many(
        self, locations: Sequence[Location], handles: Sequence[Any]
    ) -> list[bytes | None]:
        """The full pages behind the handles, in order; None where a page is gone."""

    async def load_many_into(
        self, locations: Sequence[Location], handles: Sequence[Any], out: memoryview
    ) -> list[bool]:
        """`load_many` written into one buffer, page n at n * page_size (zeros where a
        page is gone); whether each page was there. A remote backend decodes a whole
        reply in one compiled call, with no bytes object per page."""
        pages = await self.load_many(locations, handles)
        psize = self.page_size
        for n, page in enumerate(pages):
            out[n * psize : (n + 1) * psize] = bytes(psize) if page is None else page
        return [page is not None for page in pages]

    @abstractmethod
    def invalidate(self, handle: Any) -> None:
        """Release one reference to a handle (what this process holds for it)."""

    def invalidate_many(self, handles: Sequence[Any]) -> None:
        """Release many handles (a batch form of `invalidate`)."""
        for handle in handles:
            self.invalidate(handle)

    async def delete_many(self, locations: Sequence[Location]) -> None:  # noqa: B027
        """Delete remote copies (remote backends); StoreUnavailable if it cannot."""

    async def forget_pool(self, pool: str, generation: int) -> None:  # noqa: B027
        """A persistent pool was flushed: drop what the remote keeps to restore it."""

    # Shared cleancache pools: every mount that names the same UUID sees one pool.
    async def shared_objects(self, pool: str) -> list[str]:
        """The objects other mounts made in a shared pool."""
        return []

    async def publish_object(self, location: Location) -> None:  # noqa: B027
        """Make an object of a shared pool visible to the other mounts."""

    async def unpublish_object(self, location: Location) -> None:  # noqa: B027
        """An object of a shared pool was invalidated: gone for every mount."""

    async def object_pages(self, location: Location) -> list[int]:
        """The page indexes an object of a shared pool holds now, whoever stored them."""
        return []

    def payload_of(self, handle: Any) -> bytes:
        """The payload behind a handle held here, as codec.payload_of would give it."""
        raise NotImplementedError

    @abstractmethod
    def payload_share(self, handle: Any) -> float:
        """Payload bytes charged to one page; a shared (deduplicated) payload is split."""

    def page_charge(self, handle: Any) -> int:
        """What a page costs its pool's limits (.max, --max-pool-per-user): its payload at
        its own size, the same for the handle's whole life (dedup does not split it).
        Limits count memory held here, as --max-pool does: a remote page costs none."""
        return 0 if self.remote else round(self.payload_share(handle))

    @abstractmethod
    def is_same_filled(self, handle: Any) -> bool:
        """Whether the page is kept as a repeated 8-byte word with no payload."""

    @abstractmethod
    def is_shared(self, handle: Any) -> bool:
        """Whether the page's payload is shared with another page (deduplicated)."""

    @abstractmethod
    def memory_used(self) -> int:
        """All memory the backend holds for pages: payloads plus per-handle overhead."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Backend-wide counters (compr_data_size, same_filled_pages, dedup_pages)."""

    def charge_many(self, handles: Sequence[Any]) -> int:
        """The sum of page_charge over handles (backends with `batches` only)."""
        raise NotImplementedError

    def max_page_charge(self) -> int:
        """The most page_charge can be for one page, however it compresses (backends
        with `batches` only)."""
        raise NotImplementedError

    def summarize(self, handles: Sequence[Any] | bytes) -> tuple[int, int, float, int]:
        """Same-filled pages, shared pages, payload bytes charged to them and recompressed
        pages (backends with `batches` or `stores_runs` only); `handles` may be native
        int64s in bytes
        (PageTable.handle_bytes)."""
        raise NotImplementedError

    async def run_recompress(self, activity: Callable[[], int] | None = None) -> None:  # noqa: B027 - optional hook
        """Recompress cold pages in the background, forever (lz4 with zstd); `activity`
        counts the pages stored and loaded so far (the sweep waits while they move)."""

    def is_recompressed(self, handle: Any) -> bool:
        """Whether the page was recompressed in the background (held in zstd)."""
        return False

    def trim(self) -> None:  # noqa: B027 - optional hook
        """After releases: give memory that is no longer needed back to the system."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op for RAM backends
        """Release connections and files."""

    def describe(self) -> str:
        """A one-line description for logs and stats."""
        return self.name
