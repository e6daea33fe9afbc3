"""A second tier under the local pool (`--writeback FILE` or `--writeback redis://...`).

With a budget far smaller than the pages stored, frontswap stores are not refused:
the coldest persistent pages move down (zswap writeback), `written_back_pages`
counts them, the local pool stays within the budget, and every page still loads
byte for byte (SPEC section 3).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from redis_servers import RedisFactory
from test_redis import (
    FAST,
    assert_counters_sane,
    dd,
    direct_pread,
    name,
    outcome,
    wait_until_stores_work,
)
from tmemfs_testlib import PAGE, load, page_names, random_page, text_page, try_store

pytest_plugins = ["redis_servers"]
pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MountFactory = Callable[..., Mount]
MiB = 1 << 20
BUDGET = "2M"
BUDGET_BYTES = 2 * MiB
PAGES = 8 * MiB // PAGE  # four times the budget, incompressible


def tier_target(kind: str, tmp_path: Path, redis_factory: RedisFactory) -> str:
    if kind == "file":
        return str(tmp_path / "tier")
    return redis_factory().url


def assert_within_budget(mount: Mount, when: str) -> None:
    total = mount.stats()["pool_total_size"]
    assert total <= BUDGET_BYTES, f"pool_total_size {total} over the budget {when}"


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_pages_move_down_instead_of_being_refused(
    kind: str, tmp_path: Path, redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    mount = mount_factory(
        "--max-pool", BUDGET, "--writeback", tier_target(kind, tmp_path, redis_factory)
    )
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    for i in range(PAGES):
        err = try_store(fs / str(i), random_page(i))
        assert err == 0, f"store {i} with a {kind} tier below: {name(err)}"
        if i % 128 == 0:
            assert_within_budget(mount, f"after page {i}")
    assert_within_budget(mount, "after all stores")
    stats = mount.stats()
    assert stats["written_back_pages"] > 0, f"nothing moved down: {stats}"
    assert mount.stats("frontswap/0")["stored_pages"] == PAGES, "a page went missing"
    assert page_names(fs) == {str(i) for i in range(PAGES)}
    for i in range(PAGES):
        got = outcome(fs / str(i))
        assert got == random_page(i), f"frontswap/0/{i} ({kind} tier): {name(got)}"
    assert_within_budget(mount, "after loading every page")
    assert_counters_sane(mount)

    # Invalidates reach pages wherever they are; a flush empties both tiers.
    for i in range(0, PAGES, 2):
        os.unlink(fs / str(i))
    assert page_names(fs) == {str(i) for i in range(1, PAGES, 2)}
    for i in (0, 2, 100, PAGES - 2):
        assert outcome(fs / str(i)) == errno.ENOENT
    for i in range(1, PAGES, 98):  # odd: still stored
        assert load(fs / str(i)) == random_page(i)
    os.rmdir(fs)
    fs.mkdir()
    assert page_names(fs) == set()
    assert outcome(fs / "1") == errno.ENOENT
    assert mount.stats()["lost_pages"] == 0


def test_image_under_a_tiny_budget(tmp_path: Path, mount_factory: MountFactory) -> None:
    """1 MiB O_DIRECT writes of an image four times the budget, read back whole."""
    mount = mount_factory("--max-pool", BUDGET, "--writeback", str(tmp_path / "tier"))
    img = mount.path / "frontswap" / "1.img"
    subprocess.run(["truncate", "-s", str(16 * MiB), str(img)], check=True)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(8 * MiB) + b"".join(text_page(i) for i in range(2048)))
    result = dd(f"if={source}", f"of={img}", "bs=1M", "oflag=direct", "conv=notrunc")
    assert result.returncode == 0, result.stderr
    assert_within_budget(mount, "after the image writes")
    assert mount.stats()["written_back_pages"] > 0
    assert direct_pread(img, 0, 16 * MiB) == source.read_bytes()
    assert_within_budget(mount, "after the image reads")


def test_cleancache_is_not_written_back(tmp_path: Path, mount_factory: MountFactory) -> None:
    """Ephemeral pages are evicted, never moved down: a miss is fine, wrong data is not."""
    mount = mount_factory("--max-pool", BUDGET, "--writeback", str(tmp_path / "tier"))
    obj = mount.path / "cleancache" / "cc" / "o"
    obj.parent.mkdir()
    obj.mkdir()
    for i in range(PAGES):
        err = try_store(obj / str(i), random_page(i))
        assert err in (0, errno.ENOSPC), f"cleancache store {i}: {name(err)}"
    assert_within_budget(mount, "after the cleancache stores")
    stats = mount.stats()
    assert stats["evicted_pages"] > 0, f"nothing evicted: {stats}"
    for i in range(0, PAGES, 7):
        got = outcome(obj / str(i))
        assert got in (random_page(i), errno.ENOENT), f"cleancache {i}: {name(got)}"


def test_redis_tier_down_and_back(redis_factory: RedisFactory, mount_factory: MountFactory) -> None:
    """With the tier gone, moved-down pages are EIO and stores past the budget ENOSPC;
    pages still in the local pool load; with the tier back (AOF), everything loads."""
    server = redis_factory(aof=True)
    mount = mount_factory("--max-pool", BUDGET, "--writeback", server.url, *FAST)
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    count = PAGES // 2
    for i in range(count):
        assert try_store(fs / str(i), random_page(i)) == 0, f"store {i}"
    assert mount.stats()["written_back_pages"] > 0

    server.kill()
    results = {"right": 0, "EIO": 0}
    for i in range(0, count, 4):
        got = outcome(fs / str(i))
        if got == errno.EIO:
            results["EIO"] += 1
        else:
            assert got == random_page(i), f"frontswap/0/{i} with the tier down: {name(got)}"
            results["right"] += 1
    assert results["EIO"] > 0, f"every page loaded with the tier down: {results}"
    kept: set[int] = set()
    for i in range(count, count + 700):  # more than the budget holds
        err = try_store(fs / str(i), random_page(i))
        assert err in (0, errno.ENOSPC), f"store {i} with the tier down: {name(err)}"
        if not err:
            kept.add(i)
        assert_within_budget(mount, f"after store {i} with the tier down")
    assert len(kept) < 700, "700 pages past a full budget were all kept with the tier down"
    assert mount.alive()

    server.restart()
    wait_until_stores_work(fs)
    for i in range(count):
        got = outcome(fs / str(i))
        assert got == random_page(i), f"frontswap/0/{i} with the tier back: {name(got)}"
    for i in range(count, count + 700):
        got = outcome(fs / str(i))
        expected = random_page(i) if i in kept else errno.ENOENT
        assert got == expected, f"frontswap/0/{i}, stored with the tier down: {name(got)}"
    assert mount.stats()["lost_pages"] == 0


def test_redis_tier_restarted_empty_loses_pages_loudly(
    redis_factory: RedisFactory, mount_factory: MountFactory
) -> None:
    """Pages moved down to a Redis that came back empty are EIO and counted as lost;
    the pages still in the local pool are untouched."""
    server = redis_factory()  # no persistence
    mount = mount_factory("--max-pool", BUDGET, "--writeback", server.url)
    mount.expect_error(r"page \d+ is lost: its store no longer has it")  # loudly, as asked
    fs = mount.path / "frontswap" / "0"
    fs.mkdir()
    count = PAGES // 2
    for i in range(count):
        assert try_store(fs / str(i), random_page(i)) == 0, f"store {i}"
    moved = mount.stats()["written_back_pages"]
    assert moved > 0
    server.kill()
    server.restart()
    wait_until_stores_work(fs)
    lost = 0
    for i in range(count):
        got = outcome(fs / str(i))
        if got == errno.EIO:
            lost += 1
        else:
            assert got == random_page(i), f"frontswap/0/{i}: {name(got)}"
    assert lost > 0, "no page was lost with the tier's data"
    assert mount.stats()["lost_pages"] == lost
    assert mount.alive()
