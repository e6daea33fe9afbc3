"""Pages in Redis, Valkey or a Redis Cluster: RAMster's remote memory on an engine
people already run.

Layout. Pages are fields of hashes, one hash per cleancache object and one per 256
pages of a frontswap pool, so a 1 MiB request is one or two HSET/HMGET and, in a
cluster, a hash sits on one slot (the whole name is the hash tag). Every hash name
carries its pool's or object's generation: flushing a pool or an object only
forgets a generation, and its hashes are deleted by name, never by scanning.

    tmemfs:{NS|frontswap/N|GEN|CHUNK}     field INDEX -> payload   (CHUNK = INDEX // 256)
    tmemfs:{NS|cleancache/P|GEN|OBJ}      field INDEX -> payload
    tmemfs:NS:pools                       frontswap/N -> GEN        (what a remount restores)
    tmemfs:NS:images                      frontswap/N -> "GEN SIZE" (its image, if it has one)
    tmemfs:NS:chunks:frontswap/N:GEN      set of CHUNK              (what a flush deletes)

NS is the mount's namespace (--namespace; shared pools use "shared", so every mount
that names the same UUID finds the same pages). Payloads are the codec's.

Failures. Every call has a deadline. Anything that goes wrong (unreachable, timed
out, OOM under noeviction, a cluster slot down) is StoreUnavailable; the engine
turns it into ENOSPC for a store, EIO for a persistent load, a miss for an
ephemeral one. The client reconnects by itself, so the mount works again when
Redis does.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import ssl
import urllib.parse
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import coredis
import coredis.exceptions
import trio
from coredis.connection import TCPLocation

from tmemfs.backends.base import Backend, Encoded, RestoredPool
from tmemfs.backends.codec import (
    decode_payloads,
    decode_payloads_into,
    encoded_values,
    payload_of,
)
from tmemfs.backends.store import Location, PageStore, StoreUnavailable
from tmemfs.engine.keys import PoolId, PoolKind, is_shared_pool_name

if TYPE_CHECKING:
    from tmemfs._pagestore import EncodedBatch

log = logging.getLogger(__name__)

CHUNK = 256
SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://")
_FAILURES = (coredis.exceptions.RedisError, OSError, trio.TooSlowError, EOFError)


def is_redis_url(spec: str) -> bool:
    return spec.startswith(SCHEMES)


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs, stats and errors."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# The URL parameters of rediss:// (coredis's own names). The server's certificate is
# verified against the system's CAs, or ssl_ca_certs, and must name the host in the URL.
_TLS_PARAMETERS = (
    "ssl_ca_certs",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_certfile",
    "ssl_keyfile",
)
_CERT_REQS = ("required", "optional", "none")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def tls_options(url: str) -> dict[str, Any]:
    """coredis's ssl_* arguments from a rediss:// URL's parameters; ValueError if bad.

    The defaults verify: the certificate chain (ssl_cert_reqs=required) and that the
    certificate names the host (ssl_check_hostname=true), which coredis itself would
    not check.
    """
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(_TLS_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} (known: {', '.join(_TLS_PARAMETERS)})")
    if not parts.scheme.startswith("rediss"):
        if query:
            raise ValueError(f"{next(iter(query))} needs a rediss:// URL")
        return {"ssl": False}
    value = {name: values[-1] for name, values in query.items()}
    reqs = value.get("ssl_cert_reqs", "required")
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {reqs!r}")
    check = value.get("ssl_check_hostname", "true" if reqs == "required" else "false").lower()
    if check not in _BOOLEANS:
        raise ValueError(f"ssl_check_hostname must be true or false, not {check!r}")
    if _BOOLEANS[check] and reqs == "none":
        raise ValueError("ssl_check_hostname=true needs ssl_cert_reqs optional or required")
    options: dict[str, Any] = {
        "ssl": True,
        "ssl_cert_reqs": reqs,
        "ssl_check_hostname": _BOOLEANS[check],
    }
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in value:
            if not os.path.exists(value[name]):
                raise ValueError(f"{name}: {value[name]} does not exist")
            options[name] = value[name]
    return options


def make_client(url: str, timeout: float) -> coredis.Redis[bytes] | coredis.RedisCluster[bytes]:
    """A client for redis://, rediss://, redis+cluster:// or rediss+cluster:// URLs."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"no host in {mask_url(url)}")
    common: dict[str, Any] = {
        "decode_responses": False,
        "stream_timeout": timeout,
        "connect_timeout": timeout,
        "username": urllib.parse.unquote(parts.username) if parts.username else None,
        "password": urllib.parse.unquote(parts.password) if parts.password else None,
        **tls_options(url),
    }
    if parts.scheme.endswith("+cluster"):
        nodes = []
        for hostport in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = hostport.rpartition(":")
            nodes.append(TCPLocation(host.strip("[]"), int(port or 6379)))
        return coredis.RedisCluster(startup_nodes=nodes, **common)
    db = int(parts.path.strip("/") or 0)
    return coredis.Redis(host=parts.hostname, port=parts.port or 6379, db=db, **common)


class RedisStore(PageStore):
    """Payloads in Redis hashes, batched per request; see the module's layout."""

    def __init__(self, url: str, *, namespace: str, timeout: float = 2.0) -> None:
        self.url = url
        self.namespace = namespace
        self.timeout = timeout
        self.description = f"redis {mask_url(url)}"
        self._client = make_client(url, timeout)
        self._exit = contextlib.AsyncExitStack()
        # Chunks of frontswap pools known to be in the chunk registry already.
        self._registered: set[tuple[str, int, int]] = set()
        self._spaces: dict[str, str] = {}

    # -- names -----------------------------------------------------------------------

    def _space(self, pool: str) -> str:
        """The namespace of a pool's keys: the mount's own, or "shared" for a UUID pool."""
        space = self._spaces.get(pool)
        if space is None:
            kind, _, name = pool.partition("/")
            shared = kind == PoolKind.EPHEMERAL.value and is_shared_pool_name(name)
            space = self._spaces[pool] = "shared" if shared else self.namespace
        return space

    def hash_of(self, loc: Location) -> bytes:
        """The hash a page lives in; the whole name is the cluster hash tag."""
        return self._hash_name(loc.pool, loc.generation, self._part(loc))

    @staticmethod
    def _part(loc: Location) -> str | int:
        """What tells a page's hash apart within its pool: the object, or the chunk."""
        return loc.index // CHUNK if loc.pool.startswith("frontswap/") else loc.object

    def _hash_name(self, pool: str, generation: int, part: str | int) -> bytes:
        return f"tmemfs:{{{self._space(pool)}|{pool}|{generation}|{part}}}".encode()

    def _group(self, locations: Sequence[Location]) -> dict[bytes, list[int]]:
        """Positions of the locations by hash, each hash named once."""
        by_part: dict[tuple[str, int, str | int], list[int]] = defaultdict(list)
        for position, loc in enumerate(locations):
            by_part[(loc.pool, loc.generation, self._part(loc))].append(position)
        return {self._hash_name(*part): positions for part, positions in by_part.items()}

    def _pools_key(self) -> bytes:
        return f"tmemfs:{self.namespace}:pools".encode()

    def _images_key(self) -> bytes:
        return f"tmemfs:{self.namespace}:images".encode()

    def _chunks_key(self, pool: str, generation: int) -> bytes:
        return f"tmemfs:{self.namespace}:chunks:{pool}:{generation}".encode()

    # -- life ------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            # The client's context holds a task group for the mount's lifetime: it must
            # not be entered inside a cancel scope that ends before it does.
            await self._exit.enter_async_context(self._client)
            with trio.fail_after(self.timeout * 2):
                await self._client.ping()
        except _FAILURES as exc:
            await self._exit.aclose()
            raise StoreUnavailable(f"{self.description}: {_reason(exc)}") from None

    async def close(self) -> None:
        with contextlib.suppress(*_FAILURES):
            await self._exit.aclose()

    # -- pages -----------------------------------------------------------------------

    async def put_many(self, items: Sequence[tuple[Location, bytes]]) -> None:
        groups = self._group([loc for loc, _ in items])
        new_chunks: list[tuple[str, int, int]] = []
        for positions in groups.values():
            loc = items[positions[0]][0]
            if loc.pool.startswith("frontswap/"):
                chunk = (loc.pool, loc.generation, loc.index // CHUNK)
                if chunk not in self._registered:
                    new_chunks.append(chunk)

        def run(pipe: Any) -> None:
            for name, positions in groups.items():
                pipe.hset(name, {str(items[p][0].index).encode(): items[p][1] for p in positions})
            for pool, generation, chunk in new_chunks:
                pipe.sadd(self._chunks_key(pool, generation), [str(chunk).encode()])
                pipe.hset(self._pools_key(), {pool.encode(): str(generation).encode()})

        await self._pipeline(run)
        self._registered.update(new_chunks)

    async def get_many(self, locations: Sequence[Location]) -> list[bytes | None]:
        groups = self._group(locations)
        names = list(groups)

        def run(pipe: Any) -> None:
            for name in names:
                pipe.hmget(name, [str(locations[p].index).encode() for p in groups[name]])

        replies = await self._pipeline(run)
        out: list[bytes | None] = [None] * len(locations)
        for name, values in zip(names, replies, strict=True):
            for position, value in zip(groups[name], values, strict=True):
                out[position] = value
        return out

    async def delete_many(self, locations: Sequence[Location]) -> None:
        groups = self._group(locations)

        def run(pipe: Any) -> None:
            for name, positions in groups.items():
                pipe.hdel(name, [str(locations[p].index).encode() for p in positions])

        await self._pipeline(run)

    async def drop_hashes(self, names: Sequence[bytes]) -> None:
        """Delete whole hashes (a flushed object or pool generation), by name."""

        def run(pipe: Any) -> None:
            for name in names:
                pipe.delete([name])

        await self._pipeline(run)

    async def forget_pool(self, pool: str, generation: int) -> None:
        """A flushed frontswap pool: delete its chunks and its registration."""
        chunks_key = self._chunks_key(pool, generation)
        chunks = await self._call(self._client.smembers(chunks_key))
        names = [self.hash_of(Location(pool, generation, "", int(c) * CHUNK)) for c in chunks]
        await self.drop_hashes([*names, chunks_key])
        await self._call(self._client.hdel(self._pools_key(), [pool.encode()]))
        await self._call(self._client.hdel(self._images_key(), [pool.encode()]))
        self._registered = {c for c in self._registered if c[:2] != (pool, generation)}

    async def registered_pools(self) -> dict[str, int]:
        pools = await self._call(self._client.hgetall(self._pools_key()))
        return {k.decode(): int(v) for k, v in pools.items()}

    async def save_image(self, pool: str, generation: int, size: int | None) -> None:
        """Record a pool's image size (None: it has none), and the pool with it."""

        def run(pipe: Any) -> None:
            if size is None:
                pipe.hdel(self._images_key(), [pool.encode()])
            else:
                pipe.hset(self._images_key(), {pool.encode(): f"{generation} {size}".encode()})
                pipe.hset(self._pools_key(), {pool.encode(): str(generation).encode()})

        await self._pipeline(run)

    async def image_sizes(self, registered: dict[str, int]) -> dict[str, int]:
        """The image size of each registered pool that has one (of that generation)."""
        images = await self._call(self._client.hgetall(self._images_key()))
        sizes = {}
        for pool, value in images.items():
            generation, _, size = value.decode().partition(" ")
            if registered.get(pool.decode()) == int(generation):
                sizes[pool.decode()] = int(size)
        return sizes

    async def pool_pages(self, pool: str, generation: int) -> dict[int, int]:
        """Index -> payload length of every page a frontswap pool generation holds."""
        chunks = await self._call(self._client.smembers(self._chunks_key(pool, generation)))
        pages: dict[int, int] = {}
        for chunk in sorted(int(c) for c in chunks):
            name = self.hash_of(Location(pool, generation, "", chunk * CHUNK))
            fields = await self._call(self._client.hkeys(name))
            lengths = await self._pipeline(
                lambda pipe, name=name, fields=fields: [pipe.hstrlen(name, f) for f in fields]
            )
            for field, length in zip(fields, lengths, strict=True):
                pages[int(field)] = int(length)
            self._registered.add((pool, generation, chunk))
        return pages

    async def object_pages(self, loc: Location) -> list[int]:
        """The page indexes a (shared) object's hash holds now."""
        return sorted(int(f) for f in await self._call(self._client.hkeys(self.hash_of(loc))))

    def _objects_key(self, pool: str) -> bytes:
        return f"tmemfs:{self._space(pool)}:objects:{pool}".encode()

    async def shared_objects(self, pool: str) -> list[str]:
        return sorted(
            m.decode() for m in await self._call(self._client.smembers(self._objects_key(pool)))
        )

    async def publish_object(self, loc: Location) -> None:
        await self._call(self._client.sadd(self._objects_key(loc.pool), [loc.object.encode()]))

    async def unpublish_object(self, loc: Location) -> None:
        def run(pipe: Any) -> None:
            pipe.srem(self._objects_key(loc.pool), [loc.object.encode()])
            pipe.delete([self.hash_of(loc)])

        await self._pipeline(run)

    # -- plumbing --------------------------------------------------------------------

    async def _pipeline(self, fill: Any) -> list[Any]:
        try:
            with trio.fail_after(self.timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    fill(pipe)
                return list(pipe.results or ())
        except _FAILURES as exc:
            raise StoreUnavailable(f"{self.description}: {_reason(exc)}") from None

    async def _call(self, awaitable: Any) -> Any:
        try:
            with trio.fail_after(self.timeout):
                return await awaitable
        except _FAILURES as exc:
            raise StoreUnavailable(f"{self.description}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    # coredis says only "Unable to establish a connection"; a TLS failure says why.
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: the server's certificate is not trusted: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _no_cost(length: int) -> int:
    return 0


class RedisBackend(Backend):
    """Every page lives in Redis; this process keeps only the index."""

    name = "redis"
    remote = True
    stores_runs = True

    def __init__(
        self,
        page_size: int,
        limiter: trio.CapacityLimiter,
        *,
        url: str,
        namespace: str,
        timeout: float = 2.0,
        reject_ratio: float = 0.875,
    ) -> None:
        super().__init__(page_size, limiter)
        self.store_ = RedisStore(url, namespace=namespace, timeout=timeout)
        self.reject_ratio = reject_ratio
        self._payload_bytes = 0
        self._same_filled = 0
        # One encoder for the mount: its scratch (a batch's worth of lz4 blocks) is
        # reused; a fresh one per 1 MiB request cost 2 ms of its 4 (allocated, faulted
        # in and given back each time). Imported here: a missing build fails the mount
        # in one line (tmemfs.backends.lz4.MISSING), not the import of this module.
        from tmemfs._pagestore import SlabStore

        self._encoder = SlabStore(page_size, int(page_size * reject_ratio))

    def describe(self) -> str:
        return f"{self.store_.description} (namespace {self.store_.namespace})"

    async def open(self) -> None:
        await self.store_.open()

    async def close(self) -> None:
        await self.store_.close()

    async def restore(self) -> list[RestoredPool]:
        restored = []
        registered = await self.store_.registered_pools()
        images = await self.store_.image_sizes(registered)
        for pool, generation in registered.items():
            kind, _, name = pool.partition("/")
            if kind != PoolKind.PERSISTENT.value:
                continue
            pages = await self.store_.pool_pages(pool, generation)
            for length in pages.values():
                self._account(length, +1)
            restored.append(
                RestoredPool(PoolId(PoolKind.PERSISTENT, name), generation, pages, images.get(pool))
            )
        return restored

    async def save_image(self, pool: str, generation: int, size: int | None) -> None:
        await self.store_.save_image(pool, generation, size)

    def encode_run(self, data: bytes | bytearray | memoryview) -> EncodedBatch:
        """Compress whole pages from one buffer (an image write), in one compiled call."""
        return self._encoder.encode(data)

    async def store_batch(self, locations: Sequence[Location], batch: EncodedBatch) -> list[int]:
        """Send a batch's payloads as they are: no Encoded, no bytes copy per page."""
        payloads = batch.payloads()
        await self.store_.put_many(list(zip(locations, payloads, strict=True)))
        lengths = [len(p) for p in payloads]
        same_filled = lengths.count(8)
        self._same_filled += same_filled
        self._payload_bytes += sum(lengths) - 8 * same_filled
        return lengths

    async def encode_many(self, pages: Sequence[bytes]) -> list[Encoded]:
        # One compiled call, on both cores for a large batch: no hop to a worker thread.
        # Nothing but the index entry is held here, so a page costs no local payload.
        return encoded_values(self._encoder.encode(b"".join(pages)), _no_cost)

    async def store_many(
        self, locations: Sequence[Location], encoded: Sequence[Encoded]
    ) -> list[int]:
        payloads = [payload_of(e.value) for e in encoded]
        await self.store_.put_many(list(zip(locations, payloads, strict=True)))
        for payload in payloads:
            self._account(len(payload), +1)
        return [len(p) for p in payloads]

    async def load_many(
        self, locations: Sequence[Location], handles: Sequence[int]
    ) -> list[bytes | None]:
        payloads = await self.store_.get_many(locations)
        present = [p for p in payloads if p is not None]
        pages = iter(decode_payloads(present, self.page_size))
        return [None if p is None else next(pages) for p in payloads]

    async def load_many_into(
        self, locations: Sequence[Location], handles: Sequence[int], out: memoryview
    ) -> list[bool]:
        payloads = await self.store_.get_many(locations)
        # The whole reply in one call, holes (None) as zeros: no bytes per page.
        decode_payloads_into(payloads, self.page_size, out)
        return [p is not None for p in payloads]

    async def delete_many(self, locations: Sequence[Location]) -> None:
        await self.store_.delete_many(locations)

    async def forget_pool(self, pool: str, generation: int) -> None:
        await self.store_.forget_pool(pool, generation)

    async def shared_objects(self, pool: str) -> list[str]:
        return await self.store_.shared_objects(pool)

    async def publish_object(self, location: Location) -> None:
        await self.store_.publish_object(location)

    async def unpublish_object(self, location: Location) -> None:
        await self.store_.unpublish_object(location)

    async def object_pages(self, location: Location) -> list[int]:
        return await self.store_.object_pages(location)

    def invalidate(self, handle: int) -> None:
        self._account(handle, -1)

    def _account(self, length: int, sign: int) -> None:
        if length == 8:
            self._same_filled += sign
        else:
            self._payload_bytes += sign * length

    def payload_of(self, handle: int) -> bytes:
        raise NotImplementedError("redis pages are not held here")

    def payload_share(self, handle: int) -> float:
        return 0 if handle == 8 else handle

    def is_same_filled(self, handle: int) -> bool:
        return handle == 8

    def is_shared(self, handle: int) -> bool:
        return False

    def memory_used(self) -> int:
        return 0

    def summarize(self, handles: Sequence[int] | bytes) -> tuple[int, int, float, int]:
        """Same-filled pages, shared (none), payload bytes and recompressed (none), over
        the handles (payload sizes) in C loops: no Python int per page from bytes."""
        sizes = array.array("q", handles) if isinstance(handles, bytes) else handles
        same_filled = sizes.count(8)
        return same_filled, 0, sum(sizes) - 8 * same_filled, 0

    def stats(self) -> dict[str, int]:
        return {
            "compr_data_size": self._payload_bytes,
            "same_filled_pages": self._same_filled,
            "dedup_pages": 0,
        }
