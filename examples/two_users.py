#!/usr/bin/env python3
"""Two users share one tmemfs mount: one floods it, the other just uses its share.

Run as root on a mount made with --allow-other; each user is played by `setpriv`:

    tmemfs mount --allow-other --max-pool 8M /mnt/tmem
    python3 examples/two_users.py /mnt/tmem --weights 100:100
    python3 examples/two_users.py /mnt/tmem --weights 300:100   # the user's : the flooder's

Two phases, both users at once in each:
1. frontswap: the flooder stores pages into its pool until told to stop; the user stores
   its pages into its own. The user's stores are within its share (--max-pool-per-user),
   so they all succeed; the flooder's are refused (ENOSPC) once it is at its limit.
2. cleancache: the flooder puts new pages without end; the user reads a working set at
   random and puts back what missed, as the kernel's cleancache would. Its hit rate is
   about its weighted share of the budget over its working set.

It prints one JSON object: per user, stores accepted and refused, and the hit rate.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOODER, USER = 65534, 1  # nobody and daemon: two unprivileged users every system has
PAGE = 4096


def put(path: Path, data: bytes) -> bool:
    """Store one page; False if the store was refused (ENOSPC)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return False
    return True


def get(path: Path) -> bool:
    """Load one page; False on a miss."""
    try:
        with open(path, "rb") as f:
            return len(f.read()) == PAGE
    except FileNotFoundError:
        return False


def flood(pool: Path, stop: Path, limit: int) -> dict[str, int]:
    """Store new pages into `pool` (a frontswap pool or a cleancache object) until `stop`
    exists or `limit` stores were tried."""
    accepted = refused = 0
    index = 0
    while not stop.exists() and index < limit:
        if put(pool / str(index), os.urandom(PAGE)):
            accepted += 1
        else:
            refused += 1
        index += 1
    return {"accepted": accepted, "refused": refused}


def store_pages(pool: Path, count: int) -> dict[str, int]:
    """Store `count` pages into a frontswap pool and read each back."""
    accepted = refused = 0
    pages = {}
    for index in range(count):
        data = os.urandom(PAGE)
        if put(pool / str(index), data):
            accepted += 1
            pages[index] = data
        else:
            refused += 1
    intact = sum((pool / str(i)).read_bytes() == d for i, d in pages.items())
    return {"accepted": accepted, "refused": refused, "intact": intact}


def reuse(obj: Path, working_set: int, reads: int, seed: int = 1) -> dict[str, float]:
    """Random reads of a working set, putting back each miss; hits after a warm-up."""
    rng = random.Random(seed)
    accepted = refused = hits = 0
    for index in range(working_set):
        if put(obj / str(index), os.urandom(PAGE)):
            accepted += 1
        else:
            refused += 1
    counted = 0
    for n in range(reads):
        index = rng.randrange(working_set)
        hit = get(obj / str(index))
        if n >= reads // 5:  # the first fifth warms the cache up under the flood
            counted += 1
            hits += hit
        if not hit:
            if put(obj / str(index), os.urandom(PAGE)):
                accepted += 1
            else:
                refused += 1
    return {"accepted": accepted, "refused": refused, "hit_rate": hits / max(counted, 1)}


def child_main(argv: list[str]) -> int:
    """What one user runs (under setpriv): a role and its arguments as JSON."""
    role, spec = argv[0], json.loads(argv[1])
    if role == "flood":
        result: dict[str, float] = dict(
            flood(Path(spec["pool"]), Path(spec["stop"]), spec.get("limit", 10**9))
        )
    elif role == "store":
        result = dict(store_pages(Path(spec["pool"]), spec["count"]))
    else:
        result = dict(reuse(Path(spec["object"]), spec["working_set"], spec["reads"]))
    print(json.dumps(result))
    return 0


def as_user(uid: int, role: str, spec: dict[str, object]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            role,
            json.dumps(spec),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, float]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"a user's workload failed ({proc.returncode})")
    result: dict[str, float] = json.loads(out)
    return result


def as_owner(uid: int, *paths: Path) -> None:
    """mkdir each path as `uid` (pools and objects belong to whoever makes them)."""
    subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "mkdir",
            *map(str, paths),
        ],
        check=True,
        cwd="/",
        timeout=30,
    )


def write_as(uid: int, path: Path, value: str) -> None:
    subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "sh",
            "-c",
            f'echo {value} > "$1"',
            "sh",
            str(path),
        ],
        check=True,
        cwd="/",
        timeout=30,
    )


def two_users(
    mount: Path,
    *,
    user_weight: int | None = 100,
    flood_weight: int | None = 100,
    user_pages: int = 64,
    working_set: int = 256,
    reads: int = 1500,
    timeout: float = 600,
) -> dict[str, dict[str, float]]:
    """Both phases on a mounted tmemfs; per user and phase, what it saw. Weights of None
    are left alone (a tmemfs without .weight files can be compared)."""
    mine, theirs = mount / "frontswap" / "2", mount / "frontswap" / "1"
    as_owner(FLOODER, theirs, mount / "cleancache" / "flood", mount / "cleancache/flood/o")
    as_owner(USER, mine, mount / "cleancache" / "mine", mount / "cleancache/mine/o")
    if flood_weight is not None:
        write_as(FLOODER, mount / "cleancache/flood/.weight", str(flood_weight))
    if user_weight is not None:
        write_as(USER, mount / "cleancache/mine/.weight", str(user_weight))
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tmemfs-two-users-") as tmp:
        os.chmod(tmp, 0o755)
        # 1. frontswap: the flooder is at its limit before the user starts, and goes on.
        stop = Path(tmp) / "stop-frontswap"
        flooder = as_user(FLOODER, "flood", {"pool": str(theirs), "stop": str(stop)})
        while not (mount / "frontswap/1/.stats").exists() or _stat(theirs, "pool_limit_hit") == 0:
            if flooder.poll() is not None:
                break
            time.sleep(0.1)
        user = as_user(USER, "store", {"pool": str(mine), "count": user_pages})
        result["user_frontswap"] = finish(user, timeout)
        stop.touch()
        result["flooder_frontswap"] = finish(flooder, timeout)
        # The flood is over; it frees its pool, as swapoff would.
        subprocess.run(
            [
                "setpriv",
                f"--reuid={FLOODER}",
                f"--regid={FLOODER}",
                "--clear-groups",
                "rmdir",
                str(theirs),
            ],
            check=True,
            timeout=60,
        )
        # 2. cleancache: the flooder fills the budget before the user starts.
        stop = Path(tmp) / "stop-cleancache"
        flooder = as_user(
            FLOODER, "flood", {"pool": str(mount / "cleancache/flood/o"), "stop": str(stop)}
        )
        while _stat(mount / "cleancache/flood", "evicted_pages") == 0 and (flooder.poll() is None):
            time.sleep(0.1)
        user = as_user(
            USER,
            "reuse",
            {
                "object": str(mount / "cleancache/mine/o"),
                "working_set": working_set,
                "reads": reads,
            },
        )
        result["user_cleancache"] = finish(user, timeout)
        stop.touch()
        result["flooder_cleancache"] = finish(flooder, timeout)
    return result


def _stat(pool: Path, name: str) -> int:
    """One counter of a pool's .stats; 0 while the pool is not there yet."""
    from tmemfs.engine.stats import counters

    try:
        return counters((pool / ".stats").read_text()).get(name, 0)
    except FileNotFoundError:
        return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mount", type=Path)
    parser.add_argument(
        "--weights",
        default="100:100",
        help="USER:FLOODER (default 100:100); 'none' leaves them alone",
    )
    parser.add_argument("--user-pages", type=int, default=64)
    parser.add_argument("--working-set", type=int, default=256)
    parser.add_argument("--reads", type=int, default=1500)
    args = parser.parse_args()
    weights = (None, None)
    if args.weights != "none":
        user, _, flood = args.weights.partition(":")
        weights = (int(user), int(flood))
    result = two_users(
        args.mount,
        user_weight=weights[0],
        flood_weight=weights[1],
        user_pages=args.user_pages,
        working_set=args.working_set,
        reads=args.reads,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
