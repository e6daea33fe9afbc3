"""The block image frontswap/N.img (SPEC section 4), through a real mount.

Byte range [k*P, (k+1)*P) of the image is page k of pool N, the same page as the
file frontswap/N/k, both ways at once; never-stored pages read as zeros.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Mount
from tmemfs_testlib import PAGE, pread, random_page, text_page

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount tests run as root"),
]

MiB = 1 << 20


def pages(pool: Path) -> list[int]:
    """The page indexes `ls` shows (dot-files are control files)."""
    return sorted(int(n) for n in os.listdir(pool) if not n.startswith("."))


def image(tmem: Mount, n: int = 0, size: int = 16 * MiB) -> Path:
    path = tmem.path / "frontswap" / f"{n}.img"
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    return path


def pwrite(path: Path, off: int, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def test_truncate_creates_image_and_pool(tmem: Mount) -> None:
    img = image(tmem, 3, 8 * MiB)
    assert img.stat().st_size == 8 * MiB
    assert (tmem.path / "frontswap" / "3").is_dir()
    assert sorted(os.listdir(tmem.path / "frontswap")) == ["3", "3.img"]
    assert pages(tmem.path / "frontswap" / "3") == []


def test_never_stored_pages_read_as_zeros(tmem: Mount) -> None:
    img = image(tmem)
    assert pread(img, 5 * PAGE + 100, 3 * PAGE) == bytes(3 * PAGE)
    # Reads past the end are short, as for any file.
    assert pread(img, 16 * MiB - 10, 100) == bytes(10)
    assert pread(img, 16 * MiB, 100) == b""


def test_image_writes_appear_as_page_files(tmem: Mount) -> None:
    img = image(tmem)
    data = b"".join(text_page(i) for i in range(8))
    pwrite(img, 10 * PAGE, data)
    pool = tmem.path / "frontswap" / "0"
    assert pages(pool) == list(range(10, 18))
    for i in range(8):
        assert (pool / str(10 + i)).read_bytes() == text_page(i)


def test_page_files_appear_in_the_image(tmem: Mount) -> None:
    img = image(tmem)
    pool = tmem.path / "frontswap" / "0"
    (pool / "7").write_bytes(random_page(7))
    assert pread(img, 7 * PAGE, PAGE) == random_page(7)
    (pool / "7").write_bytes(random_page(8))
    assert pread(img, 7 * PAGE, PAGE) == random_page(8)
    (pool / "7").unlink()
    assert pread(img, 7 * PAGE, PAGE) == bytes(PAGE)


def test_partial_writes_are_read_modify_write(tmem: Mount) -> None:
    img = image(tmem)
    pool = tmem.path / "frontswap" / "0"
    pwrite(img, 0, text_page(1) + text_page(2))
    pwrite(img, PAGE - 3, b"abcdef")  # straddles pages 0 and 1
    expected = bytearray(text_page(1) + text_page(2))
    expected[PAGE - 3 : PAGE + 3] = b"abcdef"
    assert pread(img, 0, 2 * PAGE) == bytes(expected)
    assert (pool / "0").read_bytes() == bytes(expected[:PAGE])
    # A partial write to a never-stored page fills the rest with zeros.
    pwrite(img, 9 * PAGE + 10, b"xyz")
    assert (pool / "9").read_bytes() == bytes(10) + b"xyz" + bytes(PAGE - 13)


def test_one_mib_direct_write_counts_pages(tmem: Mount) -> None:
    img = image(tmem)
    before = tmem.stats()
    source = img.parent.parent.parent / "one-mib"
    source.write_bytes(b"".join(text_page(i) for i in range(256)))
    # dd's O_DIRECT buffer is page-aligned, as a loop device's are: one request, 256 pages.
    subprocess.run(
        ["dd", f"if={source}", f"of={img}", "bs=1M", "oflag=direct", "conv=notrunc", "status=none"],
        check=True,
    )
    after = tmem.stats()
    assert after["stores"] - before["stores"] == 256
    assert after["stored_pages"] == 256
    subprocess.run(
        ["dd", f"if={img}", "of=/dev/null", "bs=1M", "count=1", "iflag=direct", "status=none"],
        check=True,
    )
    assert tmem.stats()["loads"] - after["loads"] == 256


def test_truncate_smaller_invalidates_past_the_end(tmem: Mount) -> None:
    img = image(tmem)
    pwrite(img, 0, b"".join(text_page(i) for i in range(8)))
    os.truncate(img, 4 * PAGE + 100)
    assert img.stat().st_size == 4 * PAGE + 100
    assert pages(tmem.path / "frontswap" / "0") == [0, 1, 2, 3, 4]
    os.truncate(img, 8 * PAGE)
    # The cut page keeps its first 100 bytes; what was past the end reads as zeros.
    assert pread(img, 4 * PAGE, PAGE) == text_page(4)[:100] + bytes(PAGE - 100)
    assert pread(img, 5 * PAGE, 3 * PAGE) == bytes(3 * PAGE)


def test_unlink_removes_only_the_view(tmem: Mount) -> None:
    img = image(tmem)
    pwrite(img, 0, text_page(1))
    img.unlink()
    assert not img.exists()
    assert (tmem.path / "frontswap" / "0" / "0").read_bytes() == text_page(1)
    # A new image of the same pool shows the same pages.
    img = image(tmem)
    assert pread(img, 0, PAGE) == text_page(1)


def test_rmdir_of_the_pool_takes_the_image(tmem: Mount) -> None:
    img = image(tmem)
    pwrite(img, 0, text_page(1))
    (tmem.path / "frontswap" / "0").rmdir()
    assert not img.exists()
    assert tmem.stats()["stored_pages"] == 0


def test_image_names_are_checked(tmem: Mount) -> None:
    for name in ("01.img", "x.img", ".img"):
        with pytest.raises(OSError) as exc:
            (tmem.path / "frontswap" / name).touch()
        assert exc.value.errno == errno.EINVAL, name
    with pytest.raises(OSError) as exc:
        (tmem.path / "frontswap" / "0.img").mkdir()
    assert exc.value.errno == errno.EINVAL


@pytest.fixture
def loop_devices(tmp_path: Path) -> None:
    """Skip, before anything is mounted, when this machine cannot make loop devices:
    after that, a losetup that fails on a tmemfs image is a tmemfs failure."""
    if shutil.which("losetup") is None or not Path("/dev/loop-control").exists():
        pytest.skip("no loop devices on this machine")
    probe = tmp_path / "probe.img"
    probe.write_bytes(bytes(MiB))
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(probe)], capture_output=True, text=True, timeout=30
    )
    if dev.returncode != 0:
        pytest.skip(f"cannot make a loop device here: {dev.stderr.strip()}")
    subprocess.run(["losetup", "-d", dev.stdout.strip()], timeout=30, check=False)


def test_loop_device_round_trip(loop_devices: None, tmem: Mount) -> None:
    """The kernel's own block layer, through losetup --direct-io=on."""
    img = image(tmem, size=8 * MiB)
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "-f", "--show", str(img)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dev.returncode == 0, f"losetup of a tmemfs image failed: {dev.stderr.strip()}"
    device = dev.stdout.strip()
    try:
        assert Path(f"/sys/block/{Path(device).name}/loop/dio").read_text().strip() == "1", (
            "the loop device does not do direct I/O on the image"
        )
        data = b"".join(text_page(i) for i in range(512))
        with open(device, "r+b", buffering=0) as f:
            f.write(data)
            os.fsync(f.fileno())
        assert pread(img, 0, len(data)) == data
        assert (tmem.path / "frontswap" / "0" / "511").read_bytes() == text_page(511)
    finally:
        subprocess.run(["losetup", "-d", device], timeout=30, check=False)


def test_fio_verify(tmem: Mount, tmp_path: Path) -> None:
    """Random direct-I/O writes of 4 KiB to 1 MiB with crc32c verification: zero errors."""
    if shutil.which("fio") is None:
        pytest.skip("fio is not installed (examples/setup.sh installs it)")
    img = image(tmem, size=64 * MiB)
    result = subprocess.run(
        [
            "fio",
            "--name=tmemfs-verify",
            f"--filename={img}",
            "--direct=1",
            "--ioengine=psync",
            "--rw=randwrite",
            "--bsrange=4k-1m",
            "--size=64M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--iodepth=1",
            "--numjobs=1",
            "--randseed=42",
            "--verify_state_save=0",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 64 * MiB
    assert job["read"]["io_bytes"] >= 64 * MiB  # the verify pass read everything back
    assert tmem.stats()["stored_pages"] > 0
