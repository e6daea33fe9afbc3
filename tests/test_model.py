"""tmem semantics checked against a model, with random operations through the mount.

The model is what SPEC section 2 promises:
- a frontswap (persistent) page returns exactly the last bytes stored, until it is
  invalidated or its pool is flushed;
- a cleancache (ephemeral) page may miss at any time, but never returns a page it does
  not hold, and after a miss it keeps missing until the next put;
- a refused store (ENOSPC) of a page that exists invalidates the old copy.

- a frontswap pool's image (N.img) is a view of the same pages: page k at byte k*P,
  zeros where nothing is stored; a shrinking truncate invalidates the pages past the
  end; unlink removes the view only; rmdir of the pool removes both, and a truncate
  right after makes a new pool and image (no sleeps: names must not linger).

Two mounts: the default budget, and a tiny one where eviction and refusals happen.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, mounted
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tmemfs_testlib import (
    PAGE,
    ZERO_PAGE,
    load,
    padded,
    page_names,
    patched,
    random_page,
    same_filled_page,
    text_page,
    try_store,
)

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

# Where pages go: frontswap pools are single directories of pages, cleancache pages
# live in objects. The paths are relative to the mount.
PERSISTENT = ("frontswap/0", "frontswap/1")
EPHEMERAL = ("cleancache/m/a", "cleancache/m/b", "cleancache/n/a")
POOLS = ("frontswap/0", "frontswap/1", "cleancache/m", "cleancache/n")
INDEXES = (0, 1, 2, 3, 4711, 2**40)
# Image sizes, in pages: some cut off pages of INDEXES, one holds 4711.
IMAGE_PAGES = (0, 1, 3, 4712)

# About 5 incompressible pages: small enough that 30 steps evict and refuse.
TINY_BUDGET = "24K"
TINY_BUDGET_BYTES = 24 * 1024

# Pages are drawn as (kind, seed) and made in the rule, so a failing example prints
# short. Few seeds, so identical pages (deduplication) are common.
PAGE_KINDS = ("zero", "same", "random", "text")
pages = st.tuples(st.sampled_from(PAGE_KINDS), st.integers(0, 31))
short_data = st.binary(min_size=1, max_size=64)
# A write inside one page: (offset, length, seed); the bytes come from the seed.
patches = st.tuples(
    st.one_of(st.sampled_from([0, 1, 100, PAGE - 8, PAGE - 1]), st.integers(0, PAGE - 1)),
    st.sampled_from([1, 3, 100, 1000, PAGE]),
    st.integers(0, 2**16),
)


def make_page(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return ZERO_PAGE
    if kind == "same":
        return same_filled_page(seed * 0x0101_0101_0101_0101 + seed)
    if kind == "random":
        return random_page(seed)
    return text_page(seed)


class TmemModel(RuleBasedStateMachine):
    """Random store/load/invalidate/flush through one mount, checked against the model."""

    mount: Mount
    tiny: bool  # the budget is TINY_BUDGET: stores may be refused, pages evicted
    writeback: bool = False  # a tier below takes persistent pages: never refused

    def __init__(self) -> None:
        super().__init__()
        self.mnt = self.mount.path
        # Persistent pages: exactly what a load returns.
        self.persistent: dict[str, dict[int, bytes]] = {d: {} for d in PERSISTENT}
        # Ephemeral pages: the contents a load may return; empty = must miss.
        self.ephemeral: dict[str, dict[int, set[bytes]]] = {d: {} for d in EPHEMERAL}
        # Each frontswap pool's image size in bytes, or None when it has no image.
        self.images: dict[str, int | None] = {d: None for d in PERSISTENT}
        self.reset_pools()

    def reset_pools(self) -> None:
        """Flush every pool left by the previous example and make the layout anew."""
        for kind in ("frontswap", "cleancache"):
            for name in os.listdir(self.mnt / kind):
                if not name.endswith(".img"):  # an image goes with its pool
                    os.rmdir(self.mnt / kind / name)
        for pool in POOLS:
            os.mkdir(self.mnt / pool)
        for obj in EPHEMERAL:
            os.mkdir(self.mnt / obj)

    # -- helpers -----------------------------------------------------------------------

    def path(self, directory: str, index: int) -> Path:
        return self.mnt / directory / str(index)

    def check_refusal(self, err: int, what: str, *, persistent: bool) -> None:
        """Only ENOSPC may refuse a store, and only when the budget is tiny."""
        assert err == errno.ENOSPC, f"{what}: {errno.errorcode.get(err, err)}"
        assert self.tiny, f"{what}: ENOSPC with the default budget"
        assert not (persistent and self.writeback), f"{what}: ENOSPC with a writeback tier"

    def put(
        self, directory: str, index: int, data: bytes, *, offset: int = 0, truncate: bool = True
    ) -> None:
        """Store through the mount and update the model with what must now be there."""
        err = try_store(self.path(directory, index), data, offset=offset, truncate=truncate)
        what = f"store {directory}/{index}"
        if directory in self.persistent:
            model = self.persistent[directory]
            if err:
                self.check_refusal(err, what, persistent=True)
                model.pop(index, None)  # a refused store invalidates the old copy
                self.after_persistent_refusal()
                return
            base = ZERO_PAGE if truncate else model.get(index, ZERO_PAGE)
            model[index] = patched(base, offset, data)
        else:
            emodel = self.ephemeral[directory]
            if err:
                self.check_refusal(err, what, persistent=False)
                emodel[index] = set()
                return
            # The old copy may have been evicted before the read-modify-write read it.
            bases = {ZERO_PAGE} if truncate else emodel.get(index, set()) | {ZERO_PAGE}
            emodel[index] = {patched(base, offset, data) for base in bases}

    def after_persistent_refusal(self) -> None:
        """Ephemeral pages are evicted before any persistent store is refused."""
        for pool in ("cleancache/m", "cleancache/n"):
            assert self.mount.stats(pool)["stored_pages"] == 0, (
                f"a frontswap store was refused while {pool} still held pages"
            )
        for emodel in self.ephemeral.values():
            for index in emodel:
                emodel[index] = set()

    # -- rules -------------------------------------------------------------------------

    @rule(
        directory=st.sampled_from(PERSISTENT + EPHEMERAL),
        index=st.sampled_from(INDEXES),
        page=pages,
    )
    def store_page(self, directory: str, index: int, page: tuple[str, int]) -> None:
        self.put(directory, index, make_page(*page))

    @rule(
        directory=st.sampled_from(PERSISTENT + EPHEMERAL),
        indexes=st.lists(st.sampled_from(INDEXES), min_size=2, max_size=6, unique=True),
        seed=st.integers(0, 2**16),
    )
    def store_burst(self, directory: str, indexes: list[int], seed: int) -> None:
        """Several incompressible pages in a row: the pressure that makes a budget bite."""
        for i, index in enumerate(indexes):
            self.put(directory, index, random_page(seed + i))

    @rule(
        directory=st.sampled_from(PERSISTENT + EPHEMERAL),
        index=st.sampled_from(INDEXES),
        data=short_data,
    )
    def store_short(self, directory: str, index: int, data: bytes) -> None:
        """Like `echo data > page`: zero-padded."""
        self.put(directory, index, data)
        if directory in self.persistent and index in self.persistent[directory]:
            assert self.persistent[directory][index] == padded(data)

    @rule(
        directory=st.sampled_from(PERSISTENT + EPHEMERAL),
        index=st.sampled_from(INDEXES),
        patch=patches,
    )
    def store_patch(self, directory: str, index: int, patch: tuple[int, int, int]) -> None:
        """A write into a page opened without O_TRUNC: read-modify-write."""
        offset, length, seed = patch
        data = random_page(seed)[: min(length, PAGE - offset)]
        self.put(directory, index, data, offset=offset, truncate=False)

    @rule(directory=st.sampled_from(PERSISTENT + EPHEMERAL), index=st.sampled_from(INDEXES))
    def load_page(self, directory: str, index: int) -> None:
        try:
            data: bytes | None = load(self.path(directory, index))
        except OSError as exc:
            assert exc.errno == errno.ENOENT, f"load {directory}/{index}: {exc}"
            data = None
        if directory in self.persistent:
            expected = self.persistent[directory].get(index)
            assert data == expected, (
                f"frontswap {directory}/{index}: got "
                f"{'a miss' if data is None else 'other bytes'}, stored "
                f"{'nothing' if expected is None else 'a page'}"
            )
            return
        possible = self.ephemeral[directory].get(index, set())
        if data is None:
            self.ephemeral[directory][index] = set()
            return
        assert len(data) == PAGE
        assert possible, f"cleancache {directory}/{index}: a hit after a miss or a flush"
        assert data in possible, f"cleancache {directory}/{index}: a page never stored there"
        self.ephemeral[directory][index] = {data}

    @rule(directory=st.sampled_from(PERSISTENT + EPHEMERAL), index=st.sampled_from(INDEXES))
    def invalidate_page(self, directory: str, index: int) -> None:
        try:
            os.unlink(self.path(directory, index))
            removed = True
        except OSError as exc:
            assert exc.errno == errno.ENOENT, f"unlink {directory}/{index}: {exc}"
            removed = False
        if directory in self.persistent:
            assert removed == (index in self.persistent[directory])
            self.persistent[directory].pop(index, None)
        else:
            if removed:
                assert self.ephemeral[directory].get(index), "unlinked a page known missing"
            self.ephemeral[directory][index] = set()

    @rule(pool=st.sampled_from(POOLS))
    def flush_pool(self, pool: str) -> None:
        os.rmdir(self.mnt / pool)
        assert not (self.mnt / pool).exists()
        if pool in self.persistent:
            assert not self.image_path(pool).exists(), f"{pool}.img outlived its pool"
        os.mkdir(self.mnt / pool)
        if pool in self.persistent:
            self.persistent[pool] = {}
            self.images[pool] = None
        for obj in EPHEMERAL:
            if obj.startswith(pool + "/"):
                os.mkdir(self.mnt / obj)
                self.ephemeral[obj] = {}

    @rule(obj=st.sampled_from(EPHEMERAL))
    def flush_object(self, obj: str) -> None:
        os.rmdir(self.mnt / obj)
        assert not (self.mnt / obj).exists()
        os.mkdir(self.mnt / obj)
        self.ephemeral[obj] = {}

    # -- the block image -----------------------------------------------------------------

    def image_path(self, directory: str) -> Path:
        return self.mnt / f"{directory}.img"

    def resize_image(self, directory: str, pages: int) -> None:
        """`truncate -s`: O_CREAT then ftruncate; the model drops what is cut off."""
        fd = os.open(self.image_path(directory), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, pages * PAGE)
        finally:
            os.close(fd)
        old = self.images[directory]
        if old is not None and pages * PAGE < old:
            model = self.persistent[directory]
            for index in [i for i in model if i >= pages]:
                del model[index]
        self.images[directory] = pages * PAGE

    @rule(directory=st.sampled_from(PERSISTENT), pages=st.sampled_from(IMAGE_PAGES))
    def truncate_image(self, directory: str, pages: int) -> None:
        self.resize_image(directory, pages)

    @rule(directory=st.sampled_from(PERSISTENT), pages=st.sampled_from(IMAGE_PAGES))
    def flush_pool_then_image(self, directory: str, pages: int) -> None:
        """rmdir the pool, then at once make its image, which makes the pool anew."""
        os.rmdir(self.mnt / directory)
        self.persistent[directory] = {}
        self.images[directory] = None
        self.resize_image(directory, pages)
        assert os.path.isdir(self.mnt / directory)

    @rule(directory=st.sampled_from(PERSISTENT))
    def unlink_image(self, directory: str) -> None:
        try:
            os.unlink(self.image_path(directory))
            removed = True
        except OSError as exc:
            assert exc.errno == errno.ENOENT, f"unlink {directory}.img: {exc}"
            removed = False
        assert removed == (self.images[directory] is not None)
        self.images[directory] = None

    @precondition(lambda self: any(size for size in self.images.values()))
    @rule(directory=st.sampled_from(PERSISTENT), index=st.sampled_from(INDEXES), page=pages)
    def write_image(self, directory: str, index: int, page: tuple[str, int]) -> None:
        size = self.images[directory]
        if not size or index * PAGE >= size:
            return
        data = make_page(*page)
        fd = os.open(self.image_path(directory), os.O_WRONLY)
        err = 0
        try:
            assert os.pwrite(fd, data, index * PAGE) == PAGE
        except OSError as exc:
            err = exc.errno or -1
        finally:
            os.close(fd)
        model = self.persistent[directory]
        if err:
            self.check_refusal(err, f"image write {directory}/{index}", persistent=True)
            model.pop(index, None)
            self.after_persistent_refusal()
        else:
            model[index] = data

    @precondition(lambda self: any(size for size in self.images.values()))
    @rule(directory=st.sampled_from(PERSISTENT), index=st.sampled_from(INDEXES))
    def read_image(self, directory: str, index: int) -> None:
        size = self.images[directory]
        if not size or index * PAGE >= size:
            return
        fd = os.open(self.image_path(directory), os.O_RDONLY)
        try:
            data = os.pread(fd, PAGE, index * PAGE)
        finally:
            os.close(fd)
        assert data == self.persistent[directory].get(index, ZERO_PAGE), (
            f"{directory}.img page {index} is not page file {directory}/{index}"
        )

    @precondition(lambda self: self.tiny)
    @rule()
    def check_budget(self) -> None:
        stats = self.mount.stats()
        assert stats["pool_total_size"] <= TINY_BUDGET_BYTES

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def listings_match(self) -> None:
        for directory, model in self.persistent.items():
            assert page_names(self.mnt / directory) == {str(i) for i in model}, directory
            assert self.mount.stats(directory)["stored_pages"] == len(model)
        for directory, emodel in self.ephemeral.items():
            possible = {str(i) for i, contents in emodel.items() if contents}
            listed = page_names(self.mnt / directory)
            assert listed <= possible, f"{directory} lists pages it cannot hold"
        assert page_names(self.mnt / "cleancache/m") == {"a", "b"}
        for directory, size in self.images.items():
            image = self.image_path(directory)
            if size is None:
                assert not image.exists(), f"{image.name} exists after it went"
            else:
                assert image.stat().st_size == size, image.name
        assert page_names(self.mnt / "cleancache/n") == {"a"}


def model_mount(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("model") / "mnt", *args) as mount:
        yield mount


@pytest.fixture(scope="module")
def default_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from model_mount(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    yield from model_mount(tmp_path_factory, "--max-pool", TINY_BUDGET)


SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def run_model(
    mount: Mount, tiny: bool, *, writeback: bool = False, config: settings = SETTINGS
) -> None:
    """Run TmemModel over `mount` (tests/test_redis_model.py reuses it for Redis)."""
    machine = type("Machine", (TmemModel,), {"mount": mount, "tiny": tiny, "writeback": writeback})
    run_state_machine_as_test(machine, settings=config)


def test_model_default_budget(default_mount: Mount) -> None:
    run_model(default_mount, tiny=False)
    assert default_mount.alive()
    assert default_mount.stats()["evicted_pages"] == 0
    assert default_mount.stats()["pool_limit_hit"] == 0


def test_model_tiny_budget(tiny_mount: Mount) -> None:
    run_model(tiny_mount, tiny=True)
    assert tiny_mount.alive()
    stats = tiny_mount.stats()
    assert stats["evicted_pages"] > 0, f"the tiny budget never evicted a cleancache page {stats}"
    assert stats["pool_limit_hit"] > 0, "the tiny budget never refused a store"
