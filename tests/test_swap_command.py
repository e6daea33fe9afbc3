"""`tmemfs swap on|off` and `tmemfs swap`: swap on a tmemfs image in one command.

Each test undoes what it made, whatever happens: swapoff, losetup -d, of devices
whose backing file is under its own mount only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

TMEMFS = [sys.executable, "-m", "tmemfs"]


def tmemfs(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*TMEMFS, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def swaps() -> dict[str, list[str]]:
    lines = Path("/proc/swaps").read_text().splitlines()[1:]
    return {line.split()[0]: line.split() for line in lines}


def backing_file(device: str) -> str | None:
    path = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return path.read_text().strip()
    except OSError:
        return None


def swapped_images(mount: Path) -> set[str]:
    """The images of this mount that are swap now (device names are reused by others)."""
    return {b for d in swaps() if (b := backing_file(d)) and b.startswith(f"{mount}/")}


def ours(mount: Path) -> list[str]:
    """Loop devices whose backing file is under this test's mount."""
    found = []
    for f in Path("/sys/block").glob("loop*/loop/backing_file"):
        if f.read_text().strip().startswith(f"{mount}/"):
            found.append(f"/dev/{f.parent.parent.name}")
    return found


@pytest.fixture
def swap_allowed() -> None:
    """Skip, before anything is mounted, where this machine cannot swap on a loop
    device: after that, a refused swapon on a tmemfs image is a tmemfs failure."""
    for cmd in ("losetup", "mkswap", "swapon", "swapoff"):
        if shutil.which(cmd) is None:
            pytest.skip(f"{cmd} is not installed")
    if not Path("/dev/loop-control").exists() or not Path("/proc/swaps").exists():
        pytest.skip("no loop devices or no swap on this machine")
    # swapon of /dev/null is EINVAL where swapon is allowed, EPERM where it is not.
    probe = subprocess.run(
        ["swapon", "/dev/null"], capture_output=True, text=True, timeout=30, check=False
    )
    if "not permitted" in probe.stderr:
        pytest.skip(f"swapon is not permitted here: {probe.stderr.strip()}")


@pytest.fixture
def swap_mount(swap_allowed: None, tmem: Mount) -> Iterator[Mount]:
    try:
        yield tmem
    finally:
        for device in ours(tmem.path):
            if device in swaps():
                subprocess.run(["swapoff", device], timeout=300, check=False)
            subprocess.run(["losetup", "-d", device], timeout=60, check=False)


def test_swap_on_list_and_off(swap_mount: Mount) -> None:
    mnt = swap_mount.path
    on = tmemfs("swap", "on", "--size", "64M", "--priority", "5", mnt, check=False)
    assert on.returncode == 0, on.stderr
    first = on.stdout.strip()
    assert first.startswith("/dev/loop")
    assert backing_file(first) == f"{mnt}/frontswap/0.img"
    assert (mnt / "frontswap" / "0.img").stat().st_size == 64 << 20
    assert first in swaps()
    assert swaps()[first][4] == "5"
    # Attached with direct I/O, and swap discards: the loop device passes discard on.
    queue = Path("/sys/block") / Path(first).name
    assert (queue / "loop" / "dio").read_text().strip() == "1"
    assert int((queue / "queue" / "discard_max_bytes").read_text()) > 0
    # mkswap wrote its header into pool 0.
    assert (mnt / "frontswap" / "0" / "0").exists()

    second = tmemfs("swap", "on", "--size", "32M", mnt).stdout.strip()
    assert backing_file(second) == f"{mnt}/frontswap/1.img"
    assert second in swaps()

    listing = tmemfs("swap").stdout.splitlines()
    assert listing[0].split() == ["DEVICE", "IMAGE", "SIZE", "USED", "PRIO", "STORED", "HELD"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows[first][1:3] == [f"{mnt}/frontswap/0.img", "64.0M"]
    assert rows[first][4] == "5"
    assert int(rows[first][5]) >= 1  # the swap header page, at least

    off = tmemfs("swap", "off", first)
    assert off.stdout.strip() == f"{first}: off"
    assert swapped_images(mnt) == {f"{mnt}/frontswap/1.img"}
    assert f"{mnt}/frontswap/0.img" not in {backing_file(d) for d in ours(mnt)}
    assert sorted(os.listdir(mnt / "frontswap")) == ["1", "1.img"]

    # The freed number is taken again; `swap off MOUNT` takes everything of the mount.
    third = tmemfs("swap", "on", "--size", "32M", mnt).stdout.strip()
    assert backing_file(third) == f"{mnt}/frontswap/0.img"
    assert sorted(tmemfs("swap", "off", mnt).stdout.split()) == sorted(
        [f"{second}:", f"{third}:", "off", "off"]
    )
    assert ours(mnt) == []
    assert swapped_images(mnt) == set()
    assert os.listdir(mnt / "frontswap") == []
    assert swap_mount.stats()["stored_pages"] == 0


def test_swap_on_refuses_what_is_not_a_tmemfs(tmp_path: Path) -> None:
    result = tmemfs("swap", "on", tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"tmemfs: {tmp_path} is not a tmemfs mount"
    result = tmemfs("swap", "off", "/dev/null", check=False)
    assert result.returncode == 1
    assert "not a loop device on a tmemfs image" in result.stderr
    result = tmemfs("swap", "on", "--size", "lots", tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("tmemfs: --size:")


# -- the systemd unit --------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SWAP_UNIT = REPO / "examples" / "tmemfs-swap@.service"


def test_swap_unit_runs_valid_tmemfs_commands_after_the_mount() -> None:
    import configparser

    from tmemfs.cli import build_parser

    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(SWAP_UNIT)
    assert unit["Unit"]["Requires"] == unit["Unit"]["After"] == "tmemfs@%i.service"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    service = unit["Service"]
    assert (service["Type"], service["RemainAfterExit"]) == ("oneshot", "yes")
    options = service["Environment"].strip('"').partition("=")[2].split()
    parser = build_parser()
    start = service["ExecStart"].replace("$TMEMFS_SWAP_OPTIONS", " ".join(options))
    args = parser.parse_args(start.replace("%f", "/mnt/tmem").split()[1:])
    assert (args.command, args.swap_command, args.priority) == ("swap", "on", 100)
    assert str(args.mountpoint) == "/mnt/tmem"
    stop = parser.parse_args(service["ExecStop"].replace("%f", "/mnt/tmem").split()[1:])
    assert (stop.command, stop.swap_command, str(stop.target)) == ("swap", "off", "/mnt/tmem")


def test_systemd_analyze_verifies_the_swap_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    tmemfs_cmd = Path(sys.executable).parent / "tmemfs"
    if not tmemfs_cmd.exists():
        pytest.fail(f"no tmemfs command next to {sys.executable}: run examples/setup.sh")
    for name, instance in (
        ("tmemfs@.service", "tmemfs@mnt-tmem.service"),
        ("tmemfs-swap@.service", "tmemfs-swap@mnt-tmem.service"),
    ):
        text = (REPO / "examples" / name).read_text()
        (tmp_path / instance).write_text(text.replace("/usr/local/bin/tmemfs", str(tmemfs_cmd)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "tmemfs-swap@mnt-tmem.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:"),
    )
    assert result.returncode == 0, result.stderr
    assert "tmemfs" not in result.stderr, result.stderr
