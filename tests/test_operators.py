"""What an operator uses besides the tree: metrics, `tmemfs stat --watch`, the log.

Each through the real thing: a mount, an HTTP scrape over TCP, the CLI as a process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import Mount
from redis_servers import RedisFactory
from tmemfs_testlib import random_page, store, text_page

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]


TMEMFS = [sys.executable, "-m", "tmemfs"]
pytest_plugins = ["redis_servers"]  # the redis_factory fixture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return reply.read().decode()


def sample(text: str, name: str, pool: str) -> float:
    match = re.search(rf'^{name}{{pool="{re.escape(pool)}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name}{{pool={pool!r}}} not in the scrape"
    return float(match.group(1))


def test_metrics_endpoint_has_every_counter_by_pool(mount_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    tmem: Mount = mount_factory("--metrics", f"127.0.0.1:{port}")
    (tmem.path / "frontswap" / "0").mkdir()
    (tmem.path / "cleancache" / "c" / "o").mkdir(parents=True)
    for i in range(3):
        store(tmem.path / "frontswap" / "0" / str(i), text_page(i))
    store(tmem.path / "cleancache" / "c" / "o" / "0", random_page(1))
    (tmem.path / "frontswap" / "0" / "0").read_bytes()
    text = scrape(port)
    assert sample(text, "tmemfs_stores_total", "frontswap/0") == 3
    assert sample(text, "tmemfs_stored_pages", "cleancache/c") == 1
    assert sample(text, "tmemfs_loads_total", "frontswap/0") == 1
    assert sample(text, "tmemfs_orig_data_size_bytes", "frontswap/0") == 3 * 4096
    # Every counter of SPEC section 5, with units in the names, as node_exporter would.
    for name in (
        "stored_pages",
        "orig_data_size_bytes",
        "compr_data_size_bytes",
        "pool_total_size_bytes",
        "same_filled_pages",
        "dedup_pages",
        "duplicate_entry_total",
        "reject_compress_poor_total",
        "reject_alloc_fail_total",
        "pool_limit_hit_total",
        "written_back_pages_total",
        "evicted_pages_total",
        "loads_total",
        "load_misses_total",
        "stores_total",
        "invalidates_total",
        "lost_pages_total",
    ):
        assert f"\ntmemfs_{name}{{" in text, name
    assert re.search(r"^tmemfs_max_pool_size_bytes \d", text, re.MULTILINE)
    # Mount-wide only (lz4): loads that met a recompressed page; none here.
    assert re.search(r"^tmemfs_recompressed_loads_total 0", text, re.MULTILINE)
    # A second scrape sees what changed in between.
    (tmem.path / "frontswap" / "0" / "1").unlink()
    assert sample(scrape(port), "tmemfs_stored_pages", "frontswap/0") == 2


def test_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "mnt").mkdir()
        result = subprocess.run(
            [*TMEMFS, "mount", "--metrics", f"127.0.0.1:{port}", str(tmp_path / "mnt")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "metrics" in result.stderr
    assert str(tmp_path / "mnt") not in Path("/proc/mounts").read_text()


def test_stat_watch_shows_rates(tmem: Mount) -> None:
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir()
    watcher = subprocess.Popen(
        [*TMEMFS, "stat", "--watch", "0.5", "--json", str(tmem.path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())
        for i in range(200):
            store(pool / str(i), text_page(i))
        lines = [json.loads(watcher.stdout.readline()) for _ in range(3)]
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
    assert first["stats"]["total"]["stores"] == 0
    assert lines[-1]["stats"]["frontswap/0"]["stores"] == 200
    # 200 stores in well under the 2 s the three redraws took: some redraw saw a rate.
    assert max(line["rates"]["frontswap/0"][0] for line in lines) > 0


def test_secrets_never_reach_logs_or_stats(redis_factory: RedisFactory, tmp_path: Path) -> None:
    secret = "s3cr3t-pa55"
    server = redis_factory()
    server.cli("config", "set", "requirepass", secret)
    url = f"redis://:{secret}@127.0.0.1:{server.port}/0"
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    subprocess.run(
        [*TMEMFS, "mount", "--backend", url, "--log", str(log), str(mnt)], check=True, timeout=60
    )
    try:
        (mnt / "frontswap" / "0").mkdir()
        store(mnt / "frontswap" / "0" / "1", text_page(1))
        daemon = (mnt / ".daemon").read_text()
        assert "***" in daemon and secret not in daemon
        assert secret not in (mnt / "stats").read_text()
        # ps shows the daemon's command line: tmemfs rewrites it with the password masked.
        pid = re.search(r"^pid (\d+)$", daemon, re.MULTILINE)
        assert pid is not None
        ps = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", pid.group(1)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "tmemfs" in ps and secret not in ps
        assert secret.encode() not in Path(f"/proc/{pid.group(1)}/cmdline").read_bytes()
    finally:
        subprocess.run([*TMEMFS, "umount", str(mnt)], check=True, timeout=60)
    text = log.read_text()
    assert "mounted" in text and "unmounted" in text
    assert secret not in text
    # A wrong password is one line that does not repeat the password either.
    bad = subprocess.run(
        [*TMEMFS, "mount", "--backend", url.replace(secret, "wrong-" + secret), str(mnt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and secret not in bad.stderr


def test_log_has_start_stop_and_debug_request_lines(tmp_path: Path) -> None:
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    subprocess.run(
        [*TMEMFS, "mount", "--debug", "--log", str(log), "--max-pool", "64M", str(mnt)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    try:
        (mnt / "frontswap" / "0").mkdir()
        store(mnt / "frontswap" / "0" / "1", text_page(1))
        table = subprocess.run(
            [*TMEMFS, "stat", str(mnt)], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    finally:
        subprocess.run([*TMEMFS, "umount", str(mnt)], check=True, timeout=60)
    text = log.read_text()
    start = next(line for line in text.splitlines() if "mounted " + str(mnt) in line)
    assert "backend lz4" in start and "max_pool 67108864" in start
    assert "unmounted " + str(mnt) in text
    # --debug: one line per request, naming it, without page contents.
    assert re.search(r"DEBUG tmemfs.fs: mkdir\(\d+, b'0'", text)
    # (A whole-page write is answered on pyfuse3's fast path, and logged by that name.)
    assert re.search(r"DEBUG tmemfs.fs: write(_now)?\(\d+, 0, <4096 bytes>\)", text)
    header, row = table.splitlines()[:2]
    for column in (
        "PAGES",
        "ORIG",
        "COMPR",
        "RATIO",
        "SAME",
        "DEDUP",
        "WRITTENBACK",
        "REJECTED",
        "LOADS",
        "MISSES",
    ):
        assert column in header
    assert row.split()[:2] == ["frontswap/0", "1"]
