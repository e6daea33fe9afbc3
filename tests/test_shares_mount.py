"""Fair shares through a real mount: two users, `.max` and `.weight`, and what operators see.

The two users are `setpriv` children (nobody floods, daemon uses its share), driven
by examples/two_users.py, the same script the man page's example and the issue's
figures come from. The errno matrix of the control files runs each step as another
user in a child Python, as tests/test_permissions.py does.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, mounted
from test_operators import free_port
from test_permissions import NOBODY, OTHER, as_user, as_user_values

from tmemfs.engine import stats as statsfmt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import two_users

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="two users need root to play them"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
]

TMEMFS = [sys.executable, "-m", "tmemfs"]
BUDGET = 2 << 20


def pool_stats(path: Path) -> dict[str, str]:
    return statsfmt.parse((path / ".stats").read_text())


# -- two users ------------------------------------------------------------------------------


# With the default --max-pool-per-user (50%) each user is sure of half the budget; at 90%
# only a tenth (about 48 pages), but weights then decide more of cleancache.
@pytest.mark.parametrize(
    ("weights", "per_user", "user_pages"), [((100, 100), None, 64), ((300, 100), "90%", 32)]
)
def test_a_flooding_user_cannot_starve_the_other(
    shared_dir: Path, weights: tuple[int, int], per_user: str | None, user_pages: int
) -> None:
    args = ["--allow-other", "--max-pool", str(BUDGET)]
    if per_user:
        args += ["--max-pool-per-user", per_user]
    with mounted(shared_dir / "mnt", *args) as tmem:
        result = two_users.two_users(
            tmem.path,
            user_weight=weights[0],
            flood_weight=weights[1],
            user_pages=user_pages,
            working_set=256,
            reads=1500,
        )
        mine_fs, mine_cc = (
            pool_stats(tmem.path / "frontswap/2"),
            pool_stats(tmem.path / "cleancache/mine"),
        )
        total = tmem.stats()
        log = tmem.log_text()

    # frontswap: every store of the user within its share succeeded and reads back;
    # the flooder was refused (ENOSPC) at its own limit, and the log says which limit.
    assert result["user_frontswap"] == {"accepted": user_pages, "refused": 0, "intact": user_pages}
    assert result["flooder_frontswap"]["refused"] > 0
    assert total["pool_limit_hit"] >= result["flooder_frontswap"]["refused"]
    assert "pool_limit_hit in frontswap/1, by --max-pool-per-user" in log
    # cleancache: the user keeps at least its weighted share of hits. Its share is its
    # weight's part of what the frontswap pages leave, and no more than its own limit.
    cap = int(mine_cc["user_max_size"])
    held_fs = int(mine_fs["charged_size"])
    share = min(cap - held_fs, (BUDGET - held_fs) * weights[0] // sum(weights))
    page_cost = int(mine_cc["charged_size"]) / int(mine_cc["stored_pages"])
    expected = min(1.0, share / page_cost / 256)
    assert result["user_cleancache"]["hit_rate"] >= 0.85 * expected, (result, expected)
    assert result["user_cleancache"]["refused"] == 0
    assert result["flooder_cleancache"]["accepted"] > 0


# -- .max and .weight: the errno matrix ---------------------------------------------------


@pytest.fixture
def shared_mount(shared_dir: Path) -> Iterator[Mount]:
    with mounted(shared_dir / "mnt", "--allow-other", "--max-pool", "64M") as mount:
        yield mount


def write_steps(path: Path, values: dict[str, bytes]) -> dict[str, str]:
    """Child steps: open the file for writing and write each value in one write()."""
    return {
        name: f"os.write(os.open({str(path)!r}, os.O_WRONLY), {value!r})"
        for name, value in values.items()
    }


def test_control_files_errno_matrix(shared_mount: Mount) -> None:
    pool = shared_mount.path / "cleancache" / "mine"
    two_users.as_owner(OTHER, pool)
    limit, weight = pool / ".max", pool / ".weight"
    st = os.stat(limit)
    assert (st.st_uid, st.st_mode & 0o777) == (OTHER, 0o644)
    assert limit.read_text() == "max\n" and weight.read_text() == "100\n"

    # The owner: good values are taken; each bad one is EINVAL and the old value stays.
    good = as_user_values(OTHER, write_steps(limit, {"64M": b"64M\n"}))
    assert good["64M"] == (0, 4)
    assert limit.read_text() == "67108864\n"
    bad_max = {
        "word": b"bogus\n",
        "negative": b"-1\n",
        "unit": b"64Q\n",
        "blank": b"\n",
        "two lines": b"64M\n32M\n",
        "spaces": b" 64M\n",
        "percent": b"200%\n",
        "binary": b"\xff\n",
    }
    assert as_user(OTHER, write_steps(limit, bad_max)) == dict.fromkeys(bad_max, errno.EINVAL)
    assert limit.read_text() == "67108864\n"
    bad_weight = {
        "zero": b"0\n",
        "too big": b"10001\n",
        "fraction": b"1.5\n",
        "word": b"heavy\n",
        "signed": b"+300\n",
        "max": b"max\n",
        "blank": b"\n",
        "spaces": b"300 \n",
    }
    assert as_user(OTHER, write_steps(weight, bad_weight)) == dict.fromkeys(
        bad_weight, errno.EINVAL
    )
    assert weight.read_text() == "100\n"

    # Partial lines: each write() is one whole value, newline or not; a value split over
    # two writes is two values, and the second (alone) decides, if it is one.
    split = (
        f"fd = os.open({str(limit)!r}, os.O_WRONLY); os.write(fd, b'6'); "
        "os.write(fd, b'4M'); os.close(fd)"
    )
    seen = as_user_values(
        OTHER,
        {
            "no newline": f"os.write(os.open({str(weight)!r}, os.O_WRONLY), b'300')",
            "split": f"exec({split!r})",
            "split bad": (
                f'exec("fd = os.open({str(limit)!r}, os.O_WRONLY); '
                "os.write(fd, b'32'); os.write(fd, b'K\\\\n'); os.close(fd)\")"
            ),
            "percent": f"os.write(os.open({str(limit)!r}, os.O_WRONLY), b'50%')",
        },
    )
    assert seen["no newline"] == (0, 3)
    assert seen["split"][0] == 0
    assert seen["split bad"][0] == errno.EINVAL  # "K\n" is no value
    assert seen["percent"] == (0, 3)
    assert weight.read_text() == "300\n"
    assert limit.read_text() == f"{32 << 20}\n"  # 50% of --max-pool 64M
    # The shell's way, and `max` back.
    subprocess.run(
        [
            "setpriv",
            f"--reuid={OTHER}",
            f"--regid={OTHER}",
            "--clear-groups",
            "sh",
            "-c",
            f"echo max > {limit} && echo 7 > {weight}",
        ],
        check=True,
        timeout=30,
    )
    assert limit.read_text() == "max\n" and weight.read_text() == "7\n"

    # Another user may read them, not write them (nor truncate): EACCES, value unchanged.
    other = as_user(
        NOBODY,
        {
            "read max": f"open({str(limit)!r}).read()",
            "read weight": f"open({str(weight)!r}).read()",
            **write_steps(limit, {"write max": b"1M\n"}),
            **write_steps(weight, {"write weight": b"10000\n"}),
            "truncate": f"os.truncate({str(limit)!r}, 0)",
            "unlink": f"os.unlink({str(limit)!r})",
        },
    )
    assert other == {
        "read max": 0,
        "read weight": 0,
        "write max": errno.EACCES,
        "write weight": errno.EACCES,
        "truncate": errno.EACCES,
        "unlink": errno.EACCES,
    }
    assert limit.read_text() == "max\n" and weight.read_text() == "7\n"
    # Root may; the owner may not remove or make them.
    limit.write_text("1M\n")
    assert limit.read_text() == f"{1 << 20}\n"
    owner = as_user(
        OTHER,
        {
            "unlink": f"os.unlink({str(limit)!r})",
            "mkdir": f"os.mkdir({str(pool / '.weight')!r})",
            "rename": f"os.rename({str(limit)!r}, {str(pool / 'x')!r})",
        },
    )
    assert owner == {"unlink": errno.EPERM, "mkdir": errno.EEXIST, "rename": errno.EPERM}
    # .stats shows the same values.
    stats = pool_stats(pool)
    assert (stats["max_size"], stats["weight"]) == (str(1 << 20), "7")


def test_limits_and_weights_show_in_stat_json_and_metrics(shared_dir: Path) -> None:
    port = free_port()
    with mounted(
        shared_dir / "mnt",
        "--allow-other",
        "--max-pool",
        "8M",
        "--max-pool-per-user",
        "4M",
        "--metrics",
        f"127.0.0.1:{port}",
    ) as tmem:
        (tmem.path / "frontswap" / "0").mkdir()
        two_users.as_owner(OTHER, tmem.path / "cleancache" / "c")
        (tmem.path / "frontswap/0/.max").write_text("1M\n")
        (tmem.path / "cleancache/c/.weight").write_text("250\n")
        (tmem.path / "frontswap/0/0").write_bytes(os.urandom(4096))
        as_json = json.loads(
            subprocess.run(
                [*TMEMFS, "stat", "--json", str(tmem.path)], capture_output=True, check=True
            ).stdout
        )
        table = subprocess.run(
            [*TMEMFS, "stat", str(tmem.path)], capture_output=True, text=True, check=True
        ).stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    fs0, cc = as_json["frontswap/0"], as_json["cleancache/c"]
    assert (fs0["max_size"], fs0["user_max_size"], fs0["weight"]) == (1 << 20, None, 100)
    assert (cc["max_size"], cc["user_max_size"], cc["weight"]) == (None, 4 << 20, 250)
    assert fs0["charged_size"] > 4096
    # The pool table ends at the first blank line (the CODEC table follows it).
    header, *rows = table.split("\n\n")[0].splitlines()
    assert header.split()[-2:] == ["MAX", "WEIGHT"]
    cells = {row.split()[0]: row.split()[-2:] for row in rows}
    assert cells["frontswap/0"] == ["1.0M", "100"]
    assert cells["cleancache/c"] == ["4.0M", "250"]  # its owner's limit binds
    assert 'tmemfs_pool_max_size_bytes{pool="frontswap/0"} 1.048576e+06' in metrics
    assert 'tmemfs_pool_max_size_bytes{pool="cleancache/c"} +Inf' in metrics
    assert 'tmemfs_pool_weight{pool="cleancache/c"} 250.0' in metrics
    assert "tmemfs_max_pool_per_user_bytes 4.194304e+06" in metrics


def test_max_pool_per_user_bad_values_are_one_line(tmp_path: Path) -> None:
    for bad in ("lots", "-5M", "150%"):
        result = subprocess.run(
            [*TMEMFS, "mount", "--max-pool-per-user", bad, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "--max-pool-per-user" in result.stderr
