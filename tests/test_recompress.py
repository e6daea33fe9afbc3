"""Background recompression: idle lz4 pages end up in zstd, and nothing a user sees
changes except that less memory is held.

Three levels: the engine with the real lz4 backend and its sweeps (no mount), the
background task running while pages are stored and loaded, and a real mount that is
left alone until it has recompressed, then read back byte for byte.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
import trio
from conftest import TMEMFS, Mount
from engine_testlib import PAGE, SWAP0
from test_pagestore import ordinary

from bench.pagefiles import usr_lib_pages
from tmemfs.backends import lz4, open_backend
from tmemfs.backends.lz4 import MAX_PUT_OFF, Lz4Backend
from tmemfs.engine import Engine, PageKey
from tmemfs.engine.keys import SWAP_OBJECT

PAGES = [ordinary(seed) for seed in range(300)] + [bytes(PAGE)] * 20


def records(seed: int) -> bytes:
    """A page of JSON-like records: the same keys, other values (a heap's objects), on
    which a trained dictionary saves some 5% over plain zstd."""
    rng = random.Random(seed)
    lines = []
    size = 0
    while size < PAGE:
        line = (
            f'{{"user": "{rng.randbytes(4).hex()}", "id": {rng.randrange(10**6)}, '
            f'"score": {rng.random():.4f}, "active": {rng.choice(["true", "false"])}, '
            f'"tags": ["{rng.choice(["red", "green", "blue", "black"])}"]}}\n'
        ).encode()
        lines.append(line)
        size += len(line)
    return b"".join(lines)[:PAGE]


def lz4_engine(tmp_path: Path | None = None, after: float | None = None) -> Engine:
    limiter = trio.CapacityLimiter(2)
    tier = None
    if tmp_path is not None:
        from tmemfs.backends.filestore import FileStore

        tier = FileStore(tmp_path / "tier", PAGE, limiter)
    backend = open_backend(
        "lz4", page_size=PAGE, limiter=limiter, reject_ratio=0.875, recompress_after=after
    )
    engine = Engine(backend, max_pool=64 << 20, writeback=tier)
    engine.create_pool(SWAP0)
    return engine


def slabs(engine: Engine) -> Lz4Backend:
    assert isinstance(engine.backend, Lz4Backend)
    return engine.backend


async def load_all(engine: Engine, count: int) -> list[bytes | None]:
    return await engine.load_many(SWAP0, SWAP_OBJECT, range(count))


async def test_idle_pages_are_recompressed_and_load_back() -> None:
    engine = lz4_engine()
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(PAGES))
    before = engine.stats()
    backend = slabs(engine)
    assert await backend.recompress_sweep() == 0  # the first sweep marks them idle
    assert await backend.recompress_sweep() == 300
    after = engine.stats()
    assert after["recompressed_pages"] == after["codec_zstd_pages"] == 300
    assert after["codec_lz4_pages"] == 0
    assert after["same_filled_pages"] == 20
    saved = after["recompress_saved_bytes"]
    assert saved > 0.1 * before["compr_data_size"]
    assert after["compr_data_size"] == before["compr_data_size"] - saved
    assert after["compr_data_size"] == after["codec_zstd_data_size"]
    assert after["pool_total_size"] <= before["pool_total_size"] - saved * 0.8
    pool = engine.pool_stats(SWAP0)
    assert pool["recompressed_pages"] == 300
    assert pool["recompress_saved_bytes"] == saved
    # Both load paths: page by page, and the image's run into one buffer. Each load
    # of a recompressed page is counted (the same-filled ones are not in zstd).
    assert after["recompressed_loads"] == 0
    assert await load_all(engine, len(PAGES)) == PAGES
    assert engine.stats()["recompressed_loads"] == 300
    assert engine.load_run(SWAP0, SWAP_OBJECT, 0, len(PAGES)) == b"".join(PAGES)
    assert engine.stats()["recompressed_loads"] == 600
    # Loaded, they stay in zstd; invalidated, the counters go back to nothing.
    assert engine.stats()["recompressed_pages"] == 300
    assert await engine.invalidate_range(SWAP0, SWAP_OBJECT, 0) == len(PAGES)
    gone = engine.stats()
    assert gone["recompressed_pages"] == gone["recompress_saved_bytes"] == 0
    assert gone["pool_total_size"] == 0


async def test_recompressed_pages_go_down_to_the_tier_in_the_codec_format(
    tmp_path: Path,
) -> None:
    """The writeback tier reads payload(): a recompressed page goes down as lz4 and
    comes back up whole."""
    engine = lz4_engine(tmp_path)
    await engine.open()
    try:
        assert await engine.store_many(SWAP0, SWAP_OBJECT, list(enumerate(PAGES)))
        backend = slabs(engine)
        await backend.recompress_sweep()
        assert await backend.recompress_sweep() == 300
        assert await engine._tier.write_back(len(PAGES)) == 300
        assert engine.stats()["written_back_pages"] == 300
        assert engine.stats()["recompressed_pages"] == 0
        assert await load_all(engine, len(PAGES)) == PAGES
    finally:
        await engine.close()


async def test_the_background_task_runs_beside_stores_loads_and_invalidates() -> None:
    """The task sweeps every 10 ms while the same pages are stored, loaded and dropped:
    every load gives what was stored last."""
    engine = lz4_engine(after=0.01)
    expect: dict[int, bytes] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run_recompress)
        for step in range(60):
            if step % 3 == 0:
                first = (step * 37) % 200
                pages = [ordinary(1000 + step + i) for i in range(40)]
                assert await engine.store_run(SWAP0, SWAP_OBJECT, first, b"".join(pages))
                expect.update((first + i, p) for i, p in enumerate(pages))
            elif step % 7 == 0:
                for index in list(expect)[:10]:
                    assert await engine.invalidate_page(PageKey(SWAP0, SWAP_OBJECT, index))
                    del expect[index]
            got = await engine.load_many(SWAP0, SWAP_OBJECT, sorted(expect), exclusive=False)
            assert got == [expect[i] for i in sorted(expect)]
            await trio.sleep(0.02)
        # Left alone, the idle pages are recompressed.
        with trio.fail_after(30):
            while engine.stats()["recompressed_pages"] < len(expect) // 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    got = await engine.load_many(SWAP0, SWAP_OBJECT, sorted(expect), exclusive=False)
    assert got == [expect[i] for i in sorted(expect)]


async def test_the_sweep_is_put_off_while_the_mount_is_busy() -> None:
    """While pages move faster than BUSY_PAGES_PER_SECOND the sweep waits (pages that
    swap keeps cycling would come back and pay zstd's decode); once the mount is quiet,
    the pages idle through the burst are recompressed."""
    engine = lz4_engine(after=0.1)
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(PAGES))
    backend = slabs(engine)
    moved = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run_recompress, lambda: moved[0])
        # 0.3 s at 10,000 pages a second: three intervals, fewer than MAX_PUT_OFF.
        for _ in range(30):
            moved[0] += 100
            await trio.sleep(0.01)
        assert engine.stats()["recompressed_pages"] == 0
        with trio.fail_after(30):
            while engine.stats()["recompressed_pages"] < 300:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert await load_all(engine, len(PAGES)) == PAGES


async def test_the_sweep_resumes_the_interval_after_a_burst_ends() -> None:
    """Busy means the last interval, not the time since the last sweep: a burst of a
    million pages puts the sweep off once, not MAX_PUT_OFF times."""
    after = 0.2
    engine = lz4_engine(after=after)
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(PAGES))
    backend = slabs(engine)
    moved = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run_recompress, lambda: moved[0])
        await trio.sleep(after / 2)
        moved[0] += 1_000_000
        burst_over = trio.current_time()
        with trio.fail_after(30):
            while engine.stats()["recompressed_pages"] < 300:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - burst_over < MAX_PUT_OFF * after


async def test_a_mount_that_is_never_quiet_still_recompresses() -> None:
    """The sweep is put off at most MAX_PUT_OFF times in a row: the first one marks the
    pages idle, and the one after the put-offs recompresses them."""
    after = 0.02
    engine = lz4_engine(after=after)
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(PAGES))
    backend = slabs(engine)
    moved = [0]
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.run_recompress, lambda: moved[0])
        with trio.fail_after(30):
            while engine.stats()["recompressed_pages"] < 300:
                moved[0] += 1000
                await trio.sleep(0.005)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started >= MAX_PUT_OFF * after


async def test_a_trained_dictionary_is_used_retrained_and_old_ones_kept(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(lz4, "DICT_MIN_PAGES", 256)
    engine = lz4_engine()
    backend = slabs(engine)
    backend.recompress_dict = True
    groups = [[records(1000 * g + i) for i in range(400)] for g in range(3)]
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(groups[0]))
    plain = lz4_engine()
    assert await plain.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(groups[0]))
    for e in (engine, plain):
        assert await slabs(e).recompress_sweep() == 0
        assert await slabs(e).recompress_sweep() == 400
    stats = engine.stats()
    first = backend.slabs.current_dict
    assert first >= 0 and backend._dict_saving > 0.01
    assert stats["codec_zstd_dict_pages"] > 300
    assert stats["codec_zstd_pages"] + stats["codec_zstd_dict_pages"] == 400
    assert stats["codec_zstd_dict_dictionary_size"] == backend.slabs.dictionary_bytes > 0
    assert stats["compr_data_size"] < plain.stats()["compr_data_size"]
    # The dictionary is in the budget's count, and still it takes less than without.
    assert (
        stats["pool_total_size"] - stats["codec_zstd_dict_dictionary_size"]
        < (plain.stats()["pool_total_size"])
    )
    assert engine.load_run(SWAP0, SWAP_OBJECT, 0, 400) == b"".join(groups[0])
    # The saving drifts (pretend it was much larger): the next sweep with idle pages
    # retrains, and the pages of the first dictionary keep it.
    backend._dict_saving = 0.9
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 400, b"".join(groups[1]))
    await backend.recompress_sweep()
    await backend.recompress_sweep()
    assert backend._retrain
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 800, b"".join(groups[2]))
    await backend.recompress_sweep()
    await backend.recompress_sweep()
    assert not backend._retrain
    second = backend.slabs.current_dict
    assert second not in (-1, first)
    assert sorted(s for s, _, _ in backend.slabs.dictionary_slots()) == sorted([first, second])
    everything = b"".join(page for group in groups for page in group)
    assert engine.load_run(SWAP0, SWAP_OBJECT, 0, 1200) == everything
    # Once no page uses the first dictionary, it goes, and its bytes with it.
    for index in range(800):
        assert await engine.invalidate_page(PageKey(SWAP0, SWAP_OBJECT, index))
    assert [s for s, _, _ in backend.slabs.dictionary_slots()] == [second]
    assert engine.stats()["codec_zstd_dict_dictionary_size"] == backend.slabs.dictionary_bytes
    assert engine.load_run(SWAP0, SWAP_OBJECT, 800, 400) == b"".join(groups[2])


async def test_no_dictionary_below_the_minimum_or_when_turned_off() -> None:
    engine = lz4_engine()
    assert await engine.store_run(SWAP0, SWAP_OBJECT, 0, b"".join(records(i) for i in range(400)))
    backend = slabs(engine)
    assert not backend.recompress_dict  # off by default
    backend.recompress_dict = True
    await backend.recompress_sweep()
    assert await backend.recompress_sweep() == 400
    assert backend.slabs.current_dict == -1
    assert engine.stats()["codec_zstd_dict_pages"] == 0


# -- a real mount ---------------------------------------------------------------------


def wait_for_recompression(mount: Mount, timeout: float = 90, at_least: int = 1) -> dict[str, int]:
    """Poll the stats until at least `at_least` pages are recompressed and
    recompressed_pages has stopped growing for 2 s."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        stats = mount.stats()
        if stats["recompressed_pages"] != last:
            last, since = stats["recompressed_pages"], time.monotonic()
        elif last >= at_least and time.monotonic() - since > 2:
            return stats
        time.sleep(0.2)
    raise AssertionError(f"recompression did not settle in {timeout}s: {mount.stats()}")


def image_pages() -> bytes:
    """8 MiB of real files, zero pages, and every file page again (dedup)."""
    files = b"".join(usr_lib_pages(6 << 20))
    return files + bytes(1 << 20) + files[: 1 << 20]


def write_image(mount: Mount, data: bytes) -> Path:
    """frontswap/0.img of len(data) bytes, written with dd in 1 MiB O_DIRECT requests."""
    image = mount.path / "frontswap" / "0.img"
    subprocess.run(["truncate", "-s", str(len(data)), str(image)], check=True)
    source = mount.path.parent / "source"
    source.write_bytes(data)
    subprocess.run(
        [
            "dd",
            f"if={source}",
            f"of={image}",
            "bs=1M",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
        check=True,
        timeout=120,
    )
    return image


@pytest.mark.mount
def test_mount_recompresses_cold_pages_and_serves_them_byte_for_byte(mount_factory) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = mount_factory("--recompress-after", "0.5", "--recompress-codec", "zstd:3")
    data = image_pages()
    image = write_image(mount, data)
    stored = mount.stats()
    stats = wait_for_recompression(mount)
    pages = len(data) // PAGE
    assert stats["stored_pages"] == pages
    assert stats["recompressed_pages"] > 0.5 * (pages - stats["same_filled_pages"])
    assert stats["codec_zstd_pages"] == stats["recompressed_pages"]
    assert (
        stats["codec_lz4_pages"] + stats["codec_zstd_pages"] + stats["same_filled_pages"] == pages
    )
    assert stats["compr_data_size"] == (
        stats["codec_lz4_data_size"] + stats["codec_zstd_data_size"]
    )
    # (binaries from /usr/lib: zstd saves 5-10% over lz4 on them, 20% on mixed files)
    assert stats["recompress_saved_bytes"] > 0.03 * stored["compr_data_size"]
    assert stats["compr_data_size"] == stored["compr_data_size"] - stats["recompress_saved_bytes"]
    assert stats["pool_total_size"] < stored["pool_total_size"]
    pool = mount.stats("frontswap/0")
    assert pool["recompressed_pages"] == stats["recompressed_pages"]
    # Every byte, through the image and through a page file.
    back = subprocess.run(
        ["dd", f"if={image}", "bs=1M", "iflag=direct", "status=none"],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    assert back == data
    assert (mount.path / "frontswap" / "0" / "5").read_bytes() == data[5 * PAGE : 6 * PAGE]
    # Every recompressed page was read back at least once, and counted.
    assert mount.stats()["recompressed_loads"] >= stats["recompressed_pages"]
    # The operator's view: a per-codec table, and the same in JSON.
    table = subprocess.run(
        [*TMEMFS, "stat", str(mount.path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    zstd_row = next(line.split() for line in table.splitlines() if line.startswith("zstd "))
    assert zstd_row[1] == str(stats["recompressed_pages"])
    assert f"recompressed {stats['recompressed_pages']} pages" in table
    assert "loads met a recompressed page" in table
    as_json = json.loads(
        subprocess.run(
            [*TMEMFS, "stat", "--json", str(mount.path)],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert as_json["total"]["codec_zstd_pages"] == stats["recompressed_pages"]
    # Dropping the image's pages takes the counters back to nothing.
    image.unlink()
    subprocess.run(["rmdir", str(mount.path / "frontswap" / "0")], check=True)
    gone = mount.stats()
    assert gone["recompressed_pages"] == gone["recompress_saved_bytes"] == 0
    assert gone["stored_pages"] == 0


@pytest.mark.mount
@pytest.mark.parametrize("dictionary", ["--recompress-dict", "--no-recompress-dict"])
def test_mount_with_a_dictionary_serves_every_page_byte_for_byte(mount_factory, dictionary) -> None:  # type: ignore[no-untyped-def]
    """9000 pages (above the 8192 a dictionary waits for), read back after recompression."""
    mount: Mount = mount_factory("--recompress-after", "0.5", dictionary)
    data = b"".join(records(i) for i in range(9000))
    image = write_image(mount, data)
    stats = wait_for_recompression(mount)
    if dictionary == "--recompress-dict":
        assert stats["codec_zstd_dict_pages"] > 0.5 * 9000
        assert stats["codec_zstd_dict_dictionary_size"] > 0
        assert "zstd:3+dict" in (mount.path / ".daemon").read_text()
    else:
        assert stats["codec_zstd_dict_pages"] == stats["codec_zstd_dict_dictionary_size"] == 0
        assert stats["codec_zstd_pages"] > 0.5 * 9000
    back = subprocess.run(
        ["dd", f"if={image}", "bs=1M", "iflag=direct", "status=none"],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    assert back == data
    table = subprocess.run(
        [*TMEMFS, "stat", str(mount.path)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    assert ("zstd dictionaries" in table) == (dictionary == "--recompress-dict")


@pytest.mark.mount
def test_no_recompress_keeps_every_page_in_lz4(mount_factory) -> None:  # type: ignore[no-untyped-def]
    mount: Mount = mount_factory("--no-recompress", "--recompress-after", "0.2")
    pool = mount.path / "frontswap" / "0"
    pool.mkdir(parents=True)
    for i, page in enumerate(PAGES[:50]):
        (pool / str(i)).write_bytes(page)
    time.sleep(2)
    stats = mount.stats()
    assert stats["stored_pages"] == 50
    assert stats["recompressed_pages"] == 0
    assert stats["codec_lz4_pages"] == 50
    assert "recompress none" in (mount.path / ".daemon").read_text()
