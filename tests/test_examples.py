"""examples/: the shell inspection script, block_cache.py and the systemd unit.

The scripts run against real mounts, as a user would run them, and their output is
checked against what they did. The unit cannot be started without systemd here, so
it is parsed, its command lines are run through tmemfs's own argument parser, and
`systemd-analyze verify` checks it where that exists.
"""

from __future__ import annotations

import configparser
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from tmemfs_testlib import page_names

from tmemfs.cli import build_parser, mount_options

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
UNIT = EXAMPLES / "tmemfs@.service"
TMEMFS_ENV = f"{sys.executable} -m tmemfs"


def mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def stats_after(output: str, command: str) -> dict[str, int]:
    """The "name value" lines that `command` printed in a session transcript."""
    lines = output.split(f"# {command}\n", 1)[1].splitlines()
    values: dict[str, int] = {}
    for line in lines:
        if line.startswith("#") or not re.fullmatch(r"[a-z][a-z0-9_]* -?\d+", line):
            break
        name, value = line.split()
        values[name] = int(value)
    return values


# -- inspect.sh --------------------------------------------------------------------------


def run_inspect(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("inspect.sh mounts tmemfs: needs root")
    env = {**os.environ, "TMEMFS": TMEMFS_ENV, "TMPDIR": str(tmp_path)}
    return subprocess.run(
        ["bash", str(EXAMPLES / "inspect.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def check_inspect_output(out: str) -> None:
    pool = stats_after(out, "cat frontswap/0/.stats")
    # Pages 0-3 (text, zero, random, duplicate of 0) and 10-13 (/usr/bin/bash).
    assert pool["stored_pages"] == 8
    assert pool["stores"] == 8
    assert pool["same_filled_pages"] == 1
    assert pool["dedup_pages"] == 2
    assert 0 < pool["compr_data_size"] < pool["orig_data_size"] == 8 * 4096
    total = stats_after(out, "cat stats")
    assert total["stored_pages"] == 9  # and the cleancache page
    assert total["pools"] == 2
    assert "page 0 reads back" in out
    assert "\nhello\n" in out
    assert "No such file or directory" in out  # the cleancache miss
    table = out.split("# tmemfs stat ", 1)[1].splitlines()
    assert table[1].split()[:6] == ["POOL", "PAGES", "ORIG", "COMPR", "TOTAL", "RATIO"]
    rows = {line.split()[0]: line.split() for line in table[2:5]}
    assert rows["frontswap/0"][1] == "8"
    assert rows["cleancache/inspect-demo"][1] == "1"
    assert rows["total"][1] == "9"
    lines = out.splitlines()
    counts = [
        lines[i + 1] for i, line in enumerate(lines) if line.startswith("# ls frontswap/0 | wc -l")
    ]
    assert counts == ["8", "7"]  # before and after `rm frontswap/0/2`
    assert out.rstrip().endswith("inspect.sh: done")


@pytest.mark.mount
def test_inspect_mounts_shows_and_cleans_up(tmp_path: Path) -> None:
    result = run_inspect(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    check_inspect_output(result.stdout)
    assert "# tmemfs umount " in result.stdout
    assert mounts_under(tmp_path) == []
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone too


@pytest.mark.mount
def test_inspect_on_an_existing_mount_leaves_it_as_it_was(tmem: Mount, tmp_path: Path) -> None:
    mount = tmem.path
    (mount / "frontswap" / "0").mkdir()  # the user's pool: the script must not touch it
    refused = run_inspect(tmp_path, "--mount", str(mount))
    assert refused.returncode == 1
    assert "frontswap/0 exists" in refused.stderr

    (mount / "frontswap" / "0").rmdir()
    result = run_inspect(tmp_path, "--mount", str(mount))
    assert result.returncode == 0, result.stdout + result.stderr
    check_inspect_output(result.stdout)
    assert "# tmemfs umount" not in result.stdout
    assert sorted(os.listdir(mount / "frontswap") + os.listdir(mount / "cleancache")) == []
    assert tmem.alive()


# -- block_cache.py ----------------------------------------------------------------------


def block_cache(mount: Path, *args: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "block_cache.py"), str(mount), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_gzip(path: Path, size: int) -> Path:
    """A gzip file of `size` bytes of numbered lines."""
    lines = b"".join(
        b"line %08d of a file to be read at random offsets\n" % i for i in range(size // 50 + 1)
    )[:size]
    path.write_bytes(gzip.compress(lines, compresslevel=6))
    return path


@pytest.mark.mount
def test_block_cache_on_the_sample(tmem: Mount) -> None:
    mount = tmem.path
    out = block_cache(mount, "--sample-size", "1M", "--reads", "600", "--verify")
    assert out["blocks"] == 256 and out["block_size"] == 4096
    assert out["reads"] == out["hits"] + out["misses"] == 600
    assert out["hits"] > 0 and out["verified"] == out["hits"]
    assert out["misses"] <= 256 and out["evicted"] == 0 and out["refused"] == 0
    assert out["hit_cost"] > 0 and out["miss_cost"] > 0
    stats = tmem.stats("cleancache/blockcache")
    assert stats["stores"] == out["misses"]  # one put per miss
    assert stats["loads"] == out["hits"]
    # A sample's object is dropped at the end (rmdir = invalidate_inode).
    assert page_names(mount / "cleancache" / "blockcache") == set()


@pytest.mark.mount
def test_block_cache_keeps_blocks_for_the_next_run(tmem: Mount, tmp_path: Path) -> None:
    mount = tmem.path
    source = make_gzip(tmp_path / "data.gz", 600 * 1024)
    first = block_cache(mount, str(source), "--reads", "400", "--pool", "gz")
    objects = sorted(page_names(mount / "cleancache" / "gz"))
    assert len(objects) == 1
    assert len(page_names(mount / "cleancache" / "gz" / objects[0])) == first["misses"]
    # The same reads again: every block is there (the budget is far from full).
    again = block_cache(mount, str(source), "--reads", "400", "--pool", "gz", "--verify")
    assert again["hits"] == again["verified"] == 400
    assert again["miss_estimate"] > 0 and again["saved_seconds"] >= 0  # timed, not counted
    # Other reads: fewer misses than on a cold cache.
    other = block_cache(
        mount, str(source), "--reads", "400", "--pool", "gz", "--seed", "2", "--drop"
    )
    assert other["hit_rate"] > first["hit_rate"]
    assert page_names(mount / "cleancache" / "gz") == set()


@pytest.mark.mount
def test_block_cache_under_a_small_budget_sees_evictions(
    mount_factory: Callable[..., Mount],
) -> None:
    mount = mount_factory("--max-pool", "96K").path
    out = block_cache(mount, "--sample-size", "1M", "--reads", "600", "--verify")
    assert out["evicted"] > 0
    assert out["verified"] == out["hits"]  # evicted or not, never a wrong block


def test_block_cache_says_so_when_it_is_not_a_tmemfs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "block_cache.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"block_cache: {tmp_path} is not a mounted tmemfs (No such file or directory)"
    ]


# -- the systemd unit ----------------------------------------------------------------------

# Settings that give a service its own mount namespace, where a FUSE mount would
# stay hidden from the rest of the system.
NAMESPACE_SETTINGS = (
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectSystem",
    "ProtectHome",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectHostname",
    "ProtectProc",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "RootDirectory",
    "MountAPIVFS",
)


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def expand(command: str, environment: dict[str, str], mountpoint: str) -> list[str]:
    """A systemd command line with %f, %% and $VAR expanded, split into words."""
    words = []
    for word in shlex.split(command.replace("%f", mountpoint).replace("%%", "%")):
        if word.startswith("$") and word[1:] in environment:
            words += environment[word[1:]].split()  # $VAR splits at whitespace
        else:
            words.append(word)
    return words


def test_unit_parses_with_the_expected_keys() -> None:
    service = unit()
    assert set(service.sections()) == {"Unit", "Service", "Install"}
    assert "%f" in service["Unit"]["Description"]
    assert service["Unit"]["Documentation"] == "man:tmemfs(8)"
    assert service["Unit"]["RequiresMountsFor"] == "%f"
    # systemd hears READY=1 once the mount answers (tests/test_systemd.py).
    assert service["Service"]["Type"] == "notify"
    assert service["Service"]["NotifyAccess"] == "main"
    assert service["Service"]["ExecStart"].split()[1:3] == ["mount", "--foreground"]
    assert service["Service"]["ExecStop"].split()[1:] == ["umount", "%f"]
    assert service["Service"]["ExecStart"].split()[0] == service["Service"]["ExecStop"].split()[0]
    assert service["Service"]["LimitMEMLOCK"] == "infinity"
    assert service["Service"]["SendSIGKILL"] == "no"  # it may hold swapped-out memory
    assert service["Service"]["DeviceAllow"] == "/dev/fuse rw"
    assert "CAP_SYS_ADMIN" in service["Service"]["CapabilityBoundingSet"].split()
    assert service["Install"]["WantedBy"] == "multi-user.target"
    for setting in NAMESPACE_SETTINGS:
        assert setting not in service["Service"], f"{setting}= would hide the mount"


def test_unit_command_lines_are_valid_tmemfs_command_lines() -> None:
    service = unit()["Service"]
    name, _, value = service["Environment"].strip('"').partition("=")
    environment = {name: value.replace("%%", "%")}
    start = expand(service["ExecStart"], environment, "/mnt/tmem")
    parser = build_parser()
    args = parser.parse_args(start[1:])
    assert args.command == "mount" and args.foreground
    assert str(args.mountpoint) == "/mnt/tmem"
    assert args.max_pool == "20%"
    opts = mount_options(args, parser)  # every value valid, as `tmemfs mount` checks them
    assert opts.foreground
    stop = parser.parse_args(expand(service["ExecStop"], environment, "/mnt/tmem")[1:])
    assert stop.command == "umount" and str(stop.mountpoint) == "/mnt/tmem"


def test_systemd_analyze_verifies_an_instance(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    tmemfs = Path(sys.executable).parent / "tmemfs"
    if not tmemfs.exists():
        pytest.fail(f"no tmemfs command next to {sys.executable}: run examples/setup.sh")
    # An instance for /mnt/tmem, running the tmemfs that exists here.
    instance = tmp_path / "tmemfs@mnt-tmem.service"
    instance.write_text(UNIT.read_text().replace("/usr/local/bin/tmemfs", str(tmemfs)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "tmemfs@" not in result.stderr, result.stderr


# -- the README's section for operators ------------------------------------------------------


def test_readme_points_at_files_that_exist() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Operating tmemfs\n", 1)[1]
    paths = set(re.findall(r"(?<![\w/])((?:examples|mount_helpers|man)/[\w@.\-]+)", section))
    assert {
        "man/tmemfs.8",
        "mount_helpers/install.sh",
        "examples/tmemfs@.service",
        "examples/inspect.sh",
        "examples/block_cache.py",
        "examples/swap-on-loop.sh",
    } <= paths
    for path in paths:
        assert (REPO / path).exists(), f"README names {path}, which does not exist"
