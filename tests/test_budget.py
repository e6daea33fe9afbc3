"""The memory budget (--max-pool): ephemeral pages go first, persistent stores are then
refused with ENOSPC, the bound is never exceeded, and nothing persistent is lost
(SPEC sections 2 and 3).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from tmemfs_testlib import PAGE, ZERO_PAGE, load, random_page, run, store, text_page, try_store

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MountFactory = Callable[..., Mount]

BUDGET = 8 * 1024 * 1024
MAX_PAGES = BUDGET // PAGE
CLEANCACHE_PAGES = 1200  # about 5 MiB of incompressible pages: well inside the budget


def total_size(mount: Mount) -> int:
    return mount.stats()["pool_total_size"]


def test_full_budget_evicts_cleancache_then_refuses_frontswap(
    mount_factory: MountFactory,
) -> None:
    mount = mount_factory("--max-pool", "8M")
    obj = mount.path / "cleancache" / "cc" / "o"
    obj.parent.mkdir()
    obj.mkdir()
    for index in range(CLEANCACHE_PAGES):
        store(obj / str(index), random_page())
        assert total_size(mount) <= BUDGET
    cc = mount.stats("cleancache/cc")
    assert cc["stored_pages"] == CLEANCACHE_PAGES, "evicted with room to spare"
    assert cc["evicted_pages"] == 0

    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    kept: dict[int, bytes] = {}
    first_refusal = None
    for index in range(2 * MAX_PAGES):
        data = random_page()
        err = try_store(fs / str(index), data)
        assert total_size(mount) <= BUDGET, f"over budget after storing page {index}"
        if err:
            assert err == errno.ENOSPC, f"store {index}: {os.strerror(err)}"
            first_refusal = index
            break
        kept[index] = data
    assert first_refusal is not None, f"{2 * MAX_PAGES} pages fit in an 8 MiB budget"

    # Every cleancache page was evicted before the first frontswap refusal.
    cc = mount.stats("cleancache/cc")
    assert cc["stored_pages"] == 0, "frontswap refused while cleancache still held pages"
    assert cc["evicted_pages"] == CLEANCACHE_PAGES
    assert mount.stats()["evicted_pages"] >= CLEANCACHE_PAGES
    for index in (0, CLEANCACHE_PAGES // 2, CLEANCACHE_PAGES - 1):
        with pytest.raises(OSError) as exc:
            load(obj / str(index))
        assert exc.value.errno == errno.ENOENT

    # The budget was really used: full to within a couple of pages, counting
    # per-page overhead, so at least three quarters of 8 MiB / 4 KiB pages fit.
    stats = mount.stats()
    assert stats["pool_total_size"] > BUDGET - 3 * PAGE
    assert 0.75 * MAX_PAGES <= len(kept) <= MAX_PAGES
    assert stats["pool_limit_hit"] == 1

    # More refusals are counted, and the refused pages are not there.
    refusals = [try_store(fs / str(first_refusal + i), random_page()) for i in range(5)]
    assert refusals == [errno.ENOSPC] * 5
    assert mount.stats()["pool_limit_hit"] == 6
    with pytest.raises(OSError) as exc:
        load(fs / str(first_refusal))
    assert exc.value.errno == errno.ENOENT
    assert total_size(mount) <= BUDGET

    # Nothing persistent was dropped to make room.
    for index, data in kept.items():
        assert load(fs / str(index)) == data, f"frontswap page {index} changed or lost"
    assert mount.stats("frontswap/0")["stored_pages"] == len(kept)


def test_refused_store_of_an_existing_page_invalidates_it(mount_factory: MountFactory) -> None:
    mount = mount_factory("--max-pool", "256K")
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    old = text_page(0)
    store(fs / "0", old)
    # Fill the budget with incompressible pages, then the gaps with small ones, so
    # that even with the old copy dropped an incompressible page cannot fit.
    index = 1
    while try_store(fs / str(index), random_page()) == 0:
        index += 1
    index += 1
    while try_store(fs / str(index), text_page(index)) == 0:
        index += 1
    assert load(fs / "0") == old
    before = mount.stats()

    err = try_store(fs / "0", random_page())

    assert err == errno.ENOSPC
    with pytest.raises(OSError) as exc:
        load(fs / "0")
    assert exc.value.errno == errno.ENOENT, "a refused store left the stale page"
    assert "0" not in os.listdir(fs)
    after = mount.stats()
    assert after["stored_pages"] == before["stored_pages"] - 1
    assert after["pool_limit_hit"] == before["pool_limit_hit"] + 1
    assert mount.alive()


def test_refused_dd_reports_no_space(mount_factory: MountFactory, tmp_path: Path) -> None:
    """What a shell user sees when the budget is full: dd fails with ENOSPC's message."""
    mount = mount_factory("--max-pool", "64K")
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    src = tmp_path / "random.bin"
    for index in range(64):
        src.write_bytes(random_page())
        dd = run(
            "dd",
            f"if={src}",
            f"of={fs / str(index)}",
            "bs=4096",
            "count=1",
            "status=none",
            check=False,
        )
        if dd.returncode != 0:
            break
    else:
        pytest.fail("64 incompressible pages fit in a 64K budget")
    assert b"No space left on device" in dd.stderr
    assert mount.alive()


def test_a_refused_page_can_be_stored_again_when_there_is_room(
    mount_factory: MountFactory,
) -> None:
    mount = mount_factory("--max-pool", "64K")
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    store(fs / "0", b"old")  # a short page: cheap, stored at close
    index = 1
    while try_store(fs / str(index), random_page()) == 0:
        index += 1
    assert try_store(fs / "0", random_page()) == errno.ENOSPC

    os.unlink(fs / "1")
    os.unlink(fs / "2")
    data = random_page()
    assert try_store(fs / "0", data) == 0, "the refused page cannot be stored again"
    assert load(fs / "0") == data


def test_an_assembled_page_is_refused_at_close(mount_factory: MountFactory) -> None:
    """A partial write is stored at close, so that is where a full budget says ENOSPC."""
    mount = mount_factory("--max-pool", "64K")
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    # Full of incompressible pages, then the gaps filled with small ones.
    index = 0
    while try_store(fs / str(index), random_page()) == 0:
        index += 1
    index += 1
    while try_store(fs / str(index), text_page(index)) == 0:
        index += 1
    page = fs / str(index + 1)

    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, os.urandom(3000)) == 3000
    finally:
        with pytest.raises(OSError) as exc:
            os.close(fd)
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as exc:
        load(page)
    assert exc.value.errno == errno.ENOENT


@pytest.mark.parametrize("backend", ["lz4", "raw"])
def test_an_evicted_page_can_be_put_again(mount_factory: MountFactory, backend: str) -> None:
    """cleancache: a put after an eviction is an ordinary put, never ENOENT."""
    mount = mount_factory("--backend", backend, "--max-pool", "24K")
    obj = mount.path / "cleancache" / "c" / "o"
    obj.parent.mkdir()
    obj.mkdir()
    for index in range(6):  # room for 5 incompressible pages: page 0 is evicted
        store(obj / str(index), random_page())
    assert mount.stats("cleancache/c")["evicted_pages"] >= 1
    assert "0" not in os.listdir(obj)

    data = random_page()
    store(obj / "0", data)

    assert load(obj / "0") == data


def test_create_and_close_on_a_full_budget_is_refused_at_close(
    mount_factory: MountFactory,
) -> None:
    """touch stores a zero page; when even that cannot be kept, close() says ENOSPC."""
    mount = mount_factory("--max-pool", "24K")
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    index = 0
    # Full to the last bytes: incompressible pages, then small ones, then zero pages.
    for make in (lambda i: random_page(), text_page, lambda i: ZERO_PAGE):
        while try_store(fs / str(index), make(index)) == 0:
            index += 1
        index += 1
    page = fs / str(index)

    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.close(fd)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
        return
    # close() said yes, so the page is there, now and when the user looks again.
    for _ in range(200):
        assert load(page) == ZERO_PAGE, "close() succeeded but the page was not kept"
    assert page.name in os.listdir(fs)
