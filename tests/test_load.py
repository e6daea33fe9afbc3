"""Eight processes storing, loading and invalidating at once, every page checked.

Each worker is its own Python process (no shared GIL, no shared file table) doing
random stores, loads and unlinks for a fixed time on two kinds of pages of one
frontswap pool:
- SHARED pages, which every worker writes: a read must be a whole page that some
  writer stored for that very index (pages carry their index, writer, sequence
  number and a digest, so a mix of two stores or garbage shows);
- the worker's OWN pages, which only it touches: a read must be exactly its last
  store, and a page it invalidated must be gone (ENOENT).
Afterwards the daemon's counters must add up and its log be free of errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import Mount
from tmemfs_testlib import PAGE, load, page_names

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]


PROCESSES = 8
SECONDS = 12.0
SHARED = 64  # indexes 0..63, written by every worker
OWN = 64  # indexes 1000 + 100*w + 0..63, one worker each

_WORKER = r"""
import errno, hashlib, json, os, random, sys, time
import pytest

PAGE = 4096
pool, worker, seconds, shared, own = sys.argv[1], *map(float, sys.argv[2:6])
worker, shared, own = int(worker), int(shared), int(own)
rng = random.Random(worker)

def make(index, seq):
    # Header, then a body that is half text (compresses) and half noise (does not).
    head = f"idx={index:07d} w={worker} seq={seq:09d} ".encode()
    text = (head * 60)[:1024]
    noise = random.Random(index * 1_000_003 + worker * 7919 + seq).randbytes(PAGE - 1024 - 32)
    body = text + noise
    return body + hashlib.sha256(body).digest()

def valid_for(page, index):
    if len(page) != PAGE:
        return False
    body, digest = page[:-32], page[-32:]
    return (hashlib.sha256(body).digest() == digest
            and body.startswith(f"idx={index:07d} ".encode()))

def store(index, data):
    fd = os.open(f"{pool}/{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, data) == PAGE
    finally:
        os.close(fd)

def read(index):
    fd = os.open(f"{pool}/{index}", os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

mine = {1000 + 100 * worker + i: None for i in range(own)}  # index -> last page or None
counts = {"stores": 0, "loads": 0, "misses": 0, "invalidates": 0, "unlink_misses": 0}
errors = []
seq = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and len(errors) < 20:
    index = rng.randrange(shared) if rng.random() < 0.5 else rng.choice(list(mine))
    op = rng.random()
    try:
        if op < 0.45:
            seq += 1
            data = make(index, seq)
            try:
                store(index, data)
            except OSError as exc:
                errors.append(f"store of page {index} failed: {exc!r}")
                if index in mine:
                    mine[index] = data if os.path.exists(f"{pool}/{index}") else None
                continue
            counts["stores"] += 1
            if index in mine:
                mine[index] = data
        elif op < 0.85:
            try:
                page = read(index)
            except FileNotFoundError:
                counts["misses"] += 1
                if index in mine and mine[index] is not None:
                    errors.append(f"own page {index} missing")
                continue
            counts["loads"] += 1
            if index in mine:
                if page != mine[index]:
                    errors.append(f"own page {index} is not the last store")
            elif not valid_for(page, index):
                kind = "zeros" if page == bytes(len(page)) else repr(page[:40])
                errors.append(f"shared page {index} is not a whole stored page: {kind}")
        else:
            try:
                os.unlink(f"{pool}/{index}")
                counts["invalidates"] += 1
            except FileNotFoundError:
                counts["unlink_misses"] += 1
                if index in mine and mine[index] is not None:
                    errors.append(f"own page {index} missing at unlink")
            if index in mine:
                mine[index] = None
    except OSError as exc:
        errors.append(f"{exc!r} on {index}")
final = {i: hashlib.sha256(p).hexdigest() if p else None for i, p in mine.items()}
print(json.dumps({"counts": counts, "errors": errors, "own": final}))
"""


def test_eight_processes_never_see_a_wrong_page(tmem: Mount) -> None:
    pool = tmem.path / "frontswap" / "0"
    pool.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(pool), str(w), str(SECONDS), str(SHARED), str(OWN)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(PROCESSES)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=SECONDS + 60)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    errors = [e for r in results for e in r["errors"]]
    total = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
    assert total["stores"] > 1000 and total["loads"] > 1000, total  # it was a real load

    # Afterwards, every own page is exactly its last store; shared pages are whole.
    for r in results:
        for index, digest in r["own"].items():
            path = pool / index
            if digest is None:
                assert not path.exists(), f"invalidated page {index} is back"
            else:
                assert hashlib.sha256(load(path)).hexdigest() == digest, f"page {index}"
    for name in page_names(pool):
        if int(name) < SHARED:
            page = load(pool / name)
            assert len(page) == PAGE
            assert hashlib.sha256(page[:-32]).digest() == page[-32:], f"shared page {name}"

    # The counters add up: the pool keeps stores - invalidates pages (an overwrite
    # counts as an invalidate of the old copy), and every store the workers made counts.
    stats = tmem.stats("frontswap/0")
    assert stats["stores"] == total["stores"]
    assert stats["stores"] - stats["invalidates"] == stats["stored_pages"]
    assert stats["stored_pages"] == len(page_names(pool))
    assert stats["invalidates"] >= total["invalidates"]
    assert stats["loads"] >= total["loads"]
    print(f"load: {PROCESSES} processes x {SECONDS:g}s: {total}; pool: {stats}")
    assert tmem.alive()
    log = tmem.log_text()
    assert "Traceback" not in log and "unexpected error" not in log
    # Last, as it says the most: no worker ever saw a wrong page or a failed store.
    assert not errors, f"{len(errors)} wrong answers: {sorted(set(errors))[:8]}"
