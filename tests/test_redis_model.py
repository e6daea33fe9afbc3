"""The tmem model of tests/test_model.py, run over Redis.

Two mounts: every page in Redis (`--backend redis://...`), and a tiny local budget
with Redis as the writeback tier, so that most persistent pages move down and are
loaded from there. The model is the same; only the refusals it allows differ: with
a tier below, a frontswap store is never refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import mounted
from hypothesis import HealthCheck, settings
from redis_servers import RedisFactory
from test_model import TINY_BUDGET, run_model
from tmemfs_testlib import load, random_page, store

pytest_plugins = ["redis_servers"]
pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

# Fewer examples than the local runs: every step is a round trip to Redis, and each
# variant must stay under a minute.
REDIS_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.timeout(120)
def test_model_redis_backend(redis_factory: RedisFactory, tmp_path: Path) -> None:
    server = redis_factory()
    with mounted(tmp_path / "mnt", "--backend", server.url) as mount:
        run_model(mount, tiny=False, config=REDIS_SETTINGS)
        assert mount.alive()
        stats = mount.stats()
        assert stats["evicted_pages"] == 0
        assert stats["pool_limit_hit"] == 0
        assert stats["lost_pages"] == 0


@pytest.mark.timeout(120)
def test_model_redis_writeback_tier(redis_factory: RedisFactory, tmp_path: Path) -> None:
    server = redis_factory()
    with mounted(tmp_path / "mnt", "--max-pool", TINY_BUDGET, "--writeback", server.url) as mount:
        run_model(mount, tiny=True, writeback=True, config=REDIS_SETTINGS)
        assert mount.alive()
        # Whatever the examples drew, twice the budget of frontswap pages must go down.
        pool = mount.path / "frontswap" / "0"
        for i in range(12):
            store(pool / str(100 + i), random_page(i))
        for i in range(12):
            assert load(pool / str(100 + i)) == random_page(i)
        stats = mount.stats()
        assert stats["written_back_pages"] > 0, f"nothing moved down to Redis: {stats}"
        assert stats["lost_pages"] == 0
