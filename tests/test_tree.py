"""The tree model without a mount: names, attributes and the rules of who may do what.

The mount tests (test_errno, test_permissions, test_model) check the same rules
through the kernel; these pin them at the model's own interface, where each refusal
is an exception that fs.errno_for maps to one errno.
"""

from __future__ import annotations

import stat

import pytest
from engine_testlib import PAGE, SWAP0, make_engine

from tmemfs.engine import (
    SWAP_OBJECT,
    BadName,
    BadValue,
    Owner,
    PageKey,
    PoolId,
    PoolKind,
    StoreRejected,
)
from tmemfs.nodes import (
    CLEANCACHE,
    FRONTSWAP,
    ROOT,
    STATS,
    AccessDenied,
    IsDirectory,
    Kind,
    Node,
    NodeExists,
    NoSuchNode,
    NotDirectory,
    NotPermitted,
    PastPage,
)
from tmemfs.pagefiles import OpenPage
from tmemfs.tree import OpenText, Tree

BOB = 1001


def alice() -> Owner:
    """A user's pool: each test gets its own, as chmod and chown change it."""
    return Owner(1000, 1000, 0o750)


CACHE = PoolId(PoolKind.EPHEMERAL, "fs")


def make_tree(forgotten: list[tuple[int, bytes]] | None = None, **kwargs: object) -> Tree:
    engine = make_engine(**kwargs)  # type: ignore[arg-type]
    return Tree(engine, forget_names=forgotten.extend if forgotten is not None else None)


def test_names_become_nodes() -> None:
    tree = make_tree()
    assert tree.child(ROOT, b"frontswap") == FRONTSWAP
    assert tree.child(FRONTSWAP, b"3").kind is Kind.POOL
    image = tree.child(FRONTSWAP, b"3.img")
    assert (image.kind, image.pool) == (Kind.IMAGE, PoolId(PoolKind.PERSISTENT, "3"))
    pool = tree.child(FRONTSWAP, b"0")
    assert tree.child(pool, b".stats").kind is Kind.POOL_STATS
    assert tree.child(pool, b".max").kind is Kind.POOL_MAX
    assert tree.child(pool, b"7").index == 7
    staged = tree.child(pool, b".7.aB3xYz")
    assert (staged.kind, staged.index, staged.name) == (Kind.STAGED, 7, ".7.aB3xYz")
    for parent, name in [(ROOT, b"nope"), (FRONTSWAP, b"07"), (FRONTSWAP, b"x"), (STATS, b"a")]:
        with pytest.raises(BadName):
            tree.child(parent, name)
    with pytest.raises(NoSuchNode):
        tree.named(ROOT, b"nope")


async def test_directories_pools_and_objects() -> None:
    tree = make_tree()
    with pytest.raises(NodeExists):
        await tree.mkdir(ROOT, b"stats", alice())
    with pytest.raises(NotPermitted):
        await tree.mkdir(ROOT, b"other", alice())
    pool = await tree.mkdir(CLEANCACHE, b"fs", alice())
    assert tree.exists(pool)
    with pytest.raises(NodeExists):
        await tree.mkdir(pool, b".stats", alice())
    obj = await tree.mkdir(pool, b"inode1", alice())
    assert [name for name, _ in tree.children(pool)] == [b"inode1"]
    with pytest.raises(NotPermitted):  # no directories in an object
        await tree.mkdir(obj, b"x", alice())
    with pytest.raises(NotPermitted):
        await tree.rmdir(ROOT, b"frontswap")
    with pytest.raises(NotDirectory):
        await tree.rmdir(ROOT, b"stats")
    await tree.rmdir(pool, b"inode1")
    assert not tree.exists(obj)
    with pytest.raises(NoSuchNode):
        await tree.rmdir(pool, b"inode1")


async def test_attributes() -> None:
    tree = make_tree()
    assert stat.S_IMODE(tree.attributes(FRONTSWAP).mode) == 0o1777
    pool = await tree.mkdir(FRONTSWAP, b"0", alice())
    attrs = tree.attributes(pool)
    assert stat.S_ISDIR(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o750
    assert (attrs.uid, attrs.gid, attrs.nlink) == (1000, 1000, 2)
    await tree.engine.store(PageKey(SWAP0, SWAP_OBJECT, 5), b"a" * PAGE)
    page = tree.child(pool, b"5")
    attrs = tree.attributes(page)
    # A page shows its pool's owner and mode without x bits, and what it costs.
    assert stat.S_ISREG(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o640
    assert attrs.size == PAGE and attrs.blocks > 0
    assert stat.S_IMODE(tree.attributes(STATS).mode) == 0o444
    max_attrs = tree.attributes(tree.child(pool, b".max"))
    assert stat.S_IMODE(max_attrs.mode) == 0o644 and max_attrs.uid == 1000
    # Attribute numbers are the inode table's, stable while the node is known.
    assert tree.attributes(page).inode == tree.inodes.inode(page)


async def test_chmod_and_chown_rules() -> None:
    tree = make_tree()
    pool = await tree.mkdir(FRONTSWAP, b"0", alice())
    with pytest.raises(NotPermitted):
        await tree.set_attributes(pool, BOB, mode=0o700)
    await tree.set_attributes(pool, 1000, mode=0o700)
    assert stat.S_IMODE(tree.attributes(pool).mode) == 0o700
    with pytest.raises(NotPermitted):  # only root gives a pool away
        await tree.set_attributes(pool, 1000, uid=BOB)
    await tree.set_attributes(pool, 1000, gid=50)  # its owner may change the group
    await tree.set_attributes(pool, 0, uid=BOB)
    assert tree.attributes(pool).uid == BOB
    await tree.engine.store(PageKey(SWAP0, SWAP_OBJECT, 1), b"p" * PAGE)
    page = tree.child(pool, b"1")
    # A page's owner and mode are its pool's: setting them as they are succeeds.
    await tree.set_attributes(page, BOB, mode=stat.S_IFREG | 0o600, uid=BOB)
    with pytest.raises(NotPermitted):
        await tree.set_attributes(page, BOB, mode=stat.S_IFREG | 0o644)
    with pytest.raises(PastPage):
        await tree.set_attributes(page, BOB, size=PAGE + 1)
    await tree.set_attributes(page, BOB, size=10)
    assert await tree.engine.load(page.page_key) == b"p" * 10 + bytes(PAGE - 10)
    with pytest.raises(IsDirectory):
        await tree.set_attributes(pool, BOB, size=0)
    with pytest.raises(AccessDenied):
        await tree.set_attributes(STATS, 0, size=0)


async def test_control_files() -> None:
    tree = make_tree()
    pool = await tree.mkdir(FRONTSWAP, b"0", alice())
    limit = tree.child(pool, b".max")
    inode = tree.inodes.inode(limit)
    with pytest.raises(AccessDenied):
        await tree.open(inode, writable=True, truncate=True, caller_uid=BOB)
    handle = await tree.open(inode, writable=True, truncate=True, caller_uid=1000)
    assert isinstance(handle, OpenText) and handle.control == limit
    assert tree.write_control(limit, b"64M\n") == 4
    assert tree.text(limit) == b"67108864\n"  # as memory.max shows it
    for bad in (b"", b" 1M", b"1M\n\n", b"lots", b"\xff"):
        with pytest.raises(BadValue):
            tree.write_control(limit, bad)
    weight = tree.child(pool, b".weight")
    tree.write_control(weight, b"300")
    assert tree.text(weight) == b"300\n"
    with pytest.raises(BadValue):
        tree.write_control(weight, b"-1")
    with pytest.raises(AccessDenied):
        await tree.open(tree.inodes.inode(STATS), writable=True, truncate=False, caller_uid=0)
    with pytest.raises(NotPermitted):
        await tree.unlink(pool, b".max")


async def test_a_created_page_exists_before_its_store_and_goes_with_unlink() -> None:
    forgotten: list[tuple[int, bytes]] = []
    tree = make_tree(forgotten)
    pool = await tree.mkdir(FRONTSWAP, b"0", alice())
    node, handle = await tree.create(pool, b"4", alice(), exclusive=True, truncate=False)
    assert isinstance(handle, OpenPage) and tree.exists(node)
    assert [name for name, _ in tree.children(pool)] == [b"4"]
    assert await tree.files.read(handle, 0, PAGE) == bytes(PAGE)
    await tree.files.write(handle, 100, b"abc")
    await tree.files.flush(handle)
    await tree.files.release(handle)
    assert await tree.engine.load(node.page_key) == bytes(100) + b"abc" + bytes(PAGE - 103)
    with pytest.raises(NodeExists):
        await tree.create(pool, b"4", alice(), exclusive=True, truncate=False)
    with pytest.raises(PastPage):
        await tree.files.write(handle, PAGE - 1, b"ab")
    # Unlink of a page still being created: its open file no longer stores it.
    node, handle = await tree.create(pool, b"9", alice(), exclusive=False, truncate=False)
    tree.inodes.remember(tree.inodes.inode(pool))
    await tree.unlink(pool, b"9")
    assert not tree.exists(node)
    await tree.files.release(handle)
    assert tree.engine.entry(node.page_key) is None
    with pytest.raises(NoSuchNode):
        await tree.unlink(pool, b"9")


async def test_a_refused_created_page_is_forgotten_by_the_kernel() -> None:
    forgotten: list[tuple[int, bytes]] = []
    tree = make_tree(forgotten)
    pool = await tree.mkdir(FRONTSWAP, b"0", alice())
    tree.write_control(tree.child(pool, b".max"), b"1")
    pool_inode = tree.inodes.inode(pool)
    tree.inodes.remember(pool_inode)
    node, handle = await tree.create(pool, b"1", alice(), exclusive=False, truncate=False)
    tree.inodes.remember(tree.inodes.inode(node))
    assert isinstance(handle, OpenPage)
    with pytest.raises(StoreRejected):
        await tree.files.flush(handle)
    assert forgotten == [(pool_inode, b"1")]
    assert not tree.exists(node)


async def test_the_engine_dropping_pages_names_only_what_the_kernel_holds() -> None:
    forgotten: list[tuple[int, bytes]] = []
    tree = make_tree(forgotten)
    pool = await tree.mkdir(FRONTSWAP, b"0", alice())
    for index in (1, 2):
        await tree.engine.store(PageKey(SWAP0, SWAP_OBJECT, index), b"q" * PAGE)
    pool_inode = tree.inodes.inode(pool)
    tree.inodes.remember(pool_inode)
    tree.inodes.remember(tree.inodes.inode(tree.child(pool, b"2")))
    await tree.engine.invalidate_page(PageKey(SWAP0, SWAP_OBJECT, 1))
    await tree.engine.invalidate_page(PageKey(SWAP0, SWAP_OBJECT, 2))
    assert forgotten == [(pool_inode, b"2")]
    forgotten.clear()
    await tree.rmdir(FRONTSWAP, b"0")
    assert forgotten == [(tree.inodes.known(FRONTSWAP), b"0")]


def test_no_pyfuse3_in_the_model() -> None:
    import subprocess
    import sys

    modules = "tmemfs.tree, tmemfs.pagefiles, tmemfs.image"
    code = f"import sys, {modules}; print('pyfuse3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_node_values_are_keys() -> None:
    assert Node(Kind.PAGE, SWAP0, "0", 1) == Node(Kind.PAGE, SWAP0, "0", 1)
    assert CACHE.kind is PoolKind.EPHEMERAL


def test_every_refusal_is_one_errno_in_the_adapter() -> None:
    import errno

    from tmemfs.fs import errno_for
    from tmemfs.image import UnsupportedMode
    from tmemfs.nodes import TreeError

    refusals = TreeError.__subclasses__()
    codes = {cls: errno_for(cls("x")) for cls in refusals}
    assert errno.EIO not in codes.values(), codes
    assert codes[NotPermitted] == errno.EPERM and codes[PastPage] == errno.EFBIG
    assert errno_for(UnsupportedMode("0x8")) == errno.EOPNOTSUPP
    assert errno_for(RuntimeError("a bug")) == errno.EIO
