"""lookup_now, getattr_now, open_now and create_now answer as the async handlers do.

The patched pyfuse3 (patches/pyfuse3-3.5.0-fastpath.patch) calls the `_now` function
first and takes the async handler only when it says None. Here two adapters over
identical engines get the same requests, without a mount: one the way the patched
pyfuse3 asks them, one the way an unpatched pyfuse3 does (the async handler only).
Every reply (attributes, file info, errno) and the state left behind must be the
same, and only what must wait (an image made or truncated, a shared pool on a remote
backend) may leave the fast path.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import pytest
from engine_testlib import PAGE, SWAP0, make_engine
from pyfuse3 import FUSEError

from tmemfs.engine import SWAP_OBJECT, PageKey, PoolId, PoolKind
from tmemfs.fs import TmemOperations
from tmemfs.nodes import FRONTSWAP, ROOT_INODE

FRONTSWAP_INODE = ROOT_INODE + 2
CLEANCACHE_INODE = ROOT_INODE + 3
STATS_INODE = ROOT_INODE + 1
GONE_INODE = 9999
CACHE = PoolId(PoolKind.EPHEMERAL, "fs")


@dataclass(frozen=True)
class Caller:
    """What the adapter reads of pyfuse3's RequestContext."""

    uid: int
    gid: int
    pid: int = 1
    umask: int = 0o022


ROOT_CALLER = Caller(0, 0)
ALICE = Caller(1000, 1000)
BOB = Caller(1001, 1001)

# One reply, as plain values: what the kernel would be told.
Outcome = tuple[Any, ...]
Ask = Callable[[TmemOperations, str, tuple[Any, ...]], Awaitable[tuple[str, Outcome]]]

_ENTRY_FIELDS = (
    "st_ino",
    "generation",
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blksize",
    "st_blocks",
    "entry_timeout",
    "attr_timeout",
)


def described(reply: object) -> Outcome:
    """A reply as values (times left out: a new page's mtime is the moment it is asked)."""
    if isinstance(reply, pyfuse3.EntryAttributes):
        return ("entry", *(getattr(reply, name) for name in _ENTRY_FIELDS))
    if isinstance(reply, pyfuse3.FileInfo):
        fields = ("fh", "direct_io", "keep_cache", "nonseekable", "noflush")
        return ("file", *(getattr(reply, name, None) for name in fields))
    assert isinstance(reply, tuple)
    return ("created", *(described(part) for part in reply))


async def asked_async(ops: TmemOperations, request: str, args: tuple[Any, ...]) -> Outcome:
    try:
        return described(await getattr(ops, request)(*args))
    except FUSEError as exc:
        return ("errno", errno.errorcode[exc.errno])


async def as_unpatched(
    ops: TmemOperations, request: str, args: tuple[Any, ...]
) -> tuple[str, Outcome]:
    """pyfuse3 without the patch: every request is a coroutine."""
    return "async", await asked_async(ops, request, args)


async def as_patched(
    ops: TmemOperations, request: str, args: tuple[Any, ...]
) -> tuple[str, Outcome]:
    """The patched pyfuse3 (handlers.pxi): `_now` first, the coroutine if it says None."""
    try:
        reply = getattr(ops, request + "_now")(*args)
    except FUSEError as exc:
        return "now", ("errno", errno.errorcode[exc.errno])
    if reply is not None:
        return "now", described(reply)
    return "async", await asked_async(ops, request, args)


@dataclass
class Places:
    """Inode numbers of what the setup made."""

    pool: int  # frontswap/0, alice's, 0750, holding page 5
    page: int  # frontswap/0/5
    vanished: int  # frontswap/0/8, looked up, then invalidated
    cache_object: int  # cleancache/fs/inode1, holding page 3


async def setup(ops: TmemOperations) -> Places:
    engine = ops.engine
    pool = (await ops.mkdir(FRONTSWAP_INODE, b"0", 0o750, Caller(1000, 1000, umask=0))).st_ino
    await engine.store(PageKey(SWAP0, SWAP_OBJECT, 5), os.urandom(PAGE))
    await engine.store(PageKey(SWAP0, SWAP_OBJECT, 8), b"8" * PAGE)
    page = (await ops.lookup(pool, b"5", ROOT_CALLER)).st_ino
    vanished = (await ops.lookup(pool, b"8", ROOT_CALLER)).st_ino
    await engine.invalidate_page(PageKey(SWAP0, SWAP_OBJECT, 8))
    cache = (await ops.mkdir(CLEANCACHE_INODE, b"fs", 0o755, ALICE)).st_ino
    cache_object = (await ops.mkdir(cache, b"inode1", 0o755, ALICE)).st_ino
    await engine.store(PageKey(CACHE, "inode1", 3), b"c" * PAGE)
    return Places(pool, page, vanished, cache_object)


RDONLY, WRONLY, RDWR = os.O_RDONLY, os.O_WRONLY, os.O_RDWR
CREAT, EXCL, TRUNC = os.O_CREAT, os.O_EXCL, os.O_TRUNC


def requests(at: Places) -> list[tuple[str, tuple[Any, ...]]]:
    """A page file's requests and every refusal on their way, in order (state carries)."""
    pool, page, cache_object = at.pool, at.page, at.cache_object
    made = CREAT | WRONLY | TRUNC
    return [
        ("lookup", (ROOT_INODE, b"frontswap", ROOT_CALLER)),
        ("lookup", (ROOT_INODE, b"nope", ROOT_CALLER)),  # ENOENT
        ("lookup", (FRONTSWAP_INODE, b"0", BOB)),
        ("lookup", (FRONTSWAP_INODE, b"9", ROOT_CALLER)),  # no such pool
        ("lookup", (FRONTSWAP_INODE, b"x", ROOT_CALLER)),  # a name that cannot be there
        ("lookup", (pool, b"5", ALICE)),
        ("lookup", (pool, b"6", ALICE)),  # ENOENT: a store's first request
        ("lookup", (pool, b".stats", ALICE)),
        ("lookup", (pool, b".max", ALICE)),
        ("lookup", (pool, b"8", ALICE)),  # invalidated
        ("lookup", (GONE_INODE, b"5", ALICE)),  # the directory went
        ("lookup", (cache_object, b"3", ALICE)),
        ("getattr", (ROOT_INODE, ROOT_CALLER)),
        ("getattr", (FRONTSWAP_INODE, BOB)),
        ("getattr", (pool, ALICE)),
        ("getattr", (page, ALICE)),
        ("getattr", (cache_object, ALICE)),
        ("getattr", (at.vanished, ALICE)),  # ESTALE: the kernel then looks it up again
        ("getattr", (GONE_INODE, ALICE)),  # ESTALE
        ("open", (page, RDONLY, ALICE)),
        ("open", (page, WRONLY, ALICE)),
        ("open", (page, RDWR | TRUNC, ALICE)),
        ("open", (pool, RDONLY, ALICE)),  # EISDIR
        ("open", (STATS_INODE, WRONLY, ROOT_CALLER)),  # EACCES, even for root
        ("open", (STATS_INODE, RDONLY, BOB)),
        ("open", (at.vanished, RDONLY, ALICE)),  # ENOENT: the page went
        ("open", (at.vanished, WRONLY, ALICE)),  # a write makes it anew
        ("open", (GONE_INODE, RDONLY, ALICE)),  # ENOENT
        ("create", (pool, b"7", 0o644, made, ALICE)),
        ("lookup", (pool, b"7", BOB)),  # being created: it exists
        ("create", (pool, b"7", 0o644, made | EXCL, ALICE)),  # not stored yet: no EEXIST
        ("create", (pool, b"5", 0o644, made | EXCL, ALICE)),  # EEXIST
        ("create", (pool, b"5", 0o644, made, ALICE)),
        ("create", (pool, b".stats", 0o644, made, ALICE)),  # EEXIST
        ("create", (pool, b".max", 0o644, made, ALICE)),  # EEXIST
        ("create", (pool, b"x7", 0o644, made, ALICE)),  # EINVAL: not a page number
        ("create", (ROOT_INODE, b"x", 0o644, made, ROOT_CALLER)),  # EPERM
        ("create", (FRONTSWAP_INODE, b"x", 0o644, made, ROOT_CALLER)),  # EPERM
        ("create", (GONE_INODE, b"1", 0o644, made, ALICE)),  # ENOENT
        ("create", (pool, b".4.aB3xYz", 0o600, made | EXCL, ALICE)),  # rsync's copy
        ("create", (pool, b".4.aB3xYz", 0o600, made | EXCL, ALICE)),  # EEXIST
        ("lookup", (pool, b".4.aB3xYz", ALICE)),
        ("create", (cache_object, b"4", 0o644, made, BOB)),
        ("create", (FRONTSWAP_INODE, b"2.img", 0o644, made, ROOT_CALLER)),  # waits
        ("create", (FRONTSWAP_INODE, b"2.img", 0o644, made | EXCL, ROOT_CALLER)),  # EEXIST
        ("lookup", (FRONTSWAP_INODE, b"2.img", ROOT_CALLER)),
    ]


def image_requests(image: int) -> list[tuple[str, tuple[Any, ...]]]:
    return [
        ("getattr", (image, ROOT_CALLER)),
        ("open", (image, RDONLY, ROOT_CALLER)),
        ("open", (image, RDWR, ROOT_CALLER)),
        ("open", (image, WRONLY | TRUNC, ROOT_CALLER)),  # waits: the image is emptied
    ]


def state(ops: TmemOperations) -> object:
    """What the requests left behind: open files, pages being created, staged copies."""
    files = ops.tree.files
    return (
        [(fh, type(handle).__name__) for fh, handle in ops._handles.items()],
        sorted(map(str, files._creators)),
        sorted(node.name or "" for node in files.staged),
        ops.engine.stats()["stored_pages"],
    )


async def run(ask: Ask) -> tuple[TmemOperations, list[tuple[str, str, Outcome]]]:
    ops = TmemOperations(make_engine("lz4"))
    at = await setup(ops)
    answers = []
    for request, args in requests(at):
        path, outcome = await ask(ops, request, args)
        answers.append((request, path, outcome))
    image = ops.inodes.inode(ops.tree.child(FRONTSWAP, b"2.img"))
    for request, args in image_requests(image):
        path, outcome = await ask(ops, request, args)
        answers.append((request, path, outcome))
    return ops, answers


async def test_the_fast_path_answers_as_the_async_handlers_do() -> None:
    patched, fast = await run(as_patched)
    unpatched, slow = await run(as_unpatched)
    for (request, _, now), (_, _, then) in zip(fast, slow, strict=True):
        assert now == then, request
    assert state(patched) == state(unpatched)
    # The refusals are the ones the tree decides, on either path.
    errnos = [outcome[1] for _, _, outcome in fast if outcome[0] == "errno"]
    assert errnos == [
        *["ENOENT"] * 6,
        *["ESTALE"] * 2,
        "EISDIR",
        "EACCES",
        "ENOENT",
        "ENOENT",
        "EEXIST",
        "EEXIST",
        "EEXIST",
        "EINVAL",
        "EPERM",
        "EPERM",
        "ENOENT",
        "EEXIST",
        "EEXIST",
    ]


async def test_only_what_must_wait_leaves_the_fast_path() -> None:
    ops, answers = await run(as_patched)
    waited = [(request, outcome[0]) for request, path, outcome in answers if path == "async"]
    # Making an image, making it again (EEXIST: decided where it is made), emptying it.
    assert waited == [("create", "created"), ("create", "errno"), ("open", "file")]
    answered = {
        request: sum(
            1 for r, path, o in answers if r == request and path == "now" and o[0] != "errno"
        )
        for request in ("lookup", "getattr", "open", "create")
    }
    counters = ops._fast_path_counters()
    assert answered == {
        "lookup": counters["fastpath_lookups"],
        "getattr": counters["fastpath_getattrs"],
        "open": counters["fastpath_opens"],
        "create": counters["fastpath_creates"],
    }
    assert all(answered.values())
    assert counters["fastpath_requests"] == 0  # reads and writes, counted apart


async def test_a_shared_pool_on_a_remote_backend_is_looked_up_the_usual_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its contents are asked of the remote first, which waits: lookup_now declines."""
    ops = TmemOperations(make_engine("lz4"))
    shared = PoolId(PoolKind.EPHEMERAL, "0b5f3c2e-8d4a-4c1e-9f6b-2a7d1e3c5b90")
    ops.engine.create_pool(shared)
    assert ops.engine.pools[shared].shared
    assert not ops.engine.refreshes_shared(shared)
    monkeypatch.setattr(type(ops.engine.backend), "remote", True)
    assert ops.engine.refreshes_shared(shared)
    assert not ops.engine.refreshes_shared(CACHE)
    pool = ops.tree.child(ops.tree.node(CLEANCACHE_INODE), shared.name.encode())
    inode = ops.inodes.inode(pool)
    assert ops.lookup_now(inode, b"obj", ALICE) is None
    # Above the pool, nothing is shared: answered now.
    assert ops.lookup_now(CLEANCACHE_INODE, shared.name.encode(), ALICE) is not None
    with pytest.raises(FUSEError) as refused:
        await ops.lookup(inode, b"obj", ALICE)
    assert refused.value.errno == errno.ENOENT
