"""`tmemfs swap`: swap on a tmemfs image in one command, as zramctl gives zram users.

`swap on` makes the next free frontswap/N.img, attaches it with a direct-I/O loop
device, runs mkswap and `swapon --discard`; `swap off` undoes that in reverse order
(swapoff, losetup -d, unlink the image, rmdir the pool, which frees its memory).
Which loop device serves which image is read back from the kernel
(/sys/block/loopN/loop/backing_file) and /proc/swaps, so no state is kept here.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tmemfs.engine import stats as statsfmt
from tmemfs.mount import FSTYPE, MountError, mount_entry
from tmemfs.sizes import format_size

_IMAGE = re.compile(r"^(0|[1-9][0-9]*)\.img$")
# Long enough for swapoff of a full image to read every page back in.
_TIMEOUT = 600


@dataclass(frozen=True)
class SwapImage:
    """A loop device whose backing file is a tmemfs image, and what swap does with it."""

    device: str
    image: Path
    swap_used: int | None  # bytes; None when the device is not swap
    priority: int | None

    @property
    def mount(self) -> Path:
        return self.image.parent.parent

    @property
    def pool(self) -> Path:
        return self.image.with_suffix("")


def default_size() -> int:
    """The size of RAM: the budget (20% of RAM by default) holds about half of RAM of
    compressed swap, and an image twice the swap in use keeps slot churn low."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise MountError("cannot read MemTotal from /proc/meminfo")


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)
    except FileNotFoundError:
        raise MountError(f"{cmd[0]} not found (util-linux)") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"{' '.join(cmd)} did not finish in {_TIMEOUT}s") from None
    if done.returncode != 0:
        raise MountError(f"{' '.join(cmd)}: {done.stderr.strip() or 'failed'}")
    return done.stdout.strip()


def _tmemfs_mount(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    entry = mount_entry(path)
    if entry is None or entry[0] != FSTYPE:
        raise MountError(f"{path} is not a tmemfs mount")
    return path


def _swaps() -> dict[str, tuple[int, int]]:
    """/proc/swaps: device -> (bytes used, priority)."""
    result = {}
    with open("/proc/swaps") as f:
        for line in list(f)[1:]:
            fields = line.split()
            if len(fields) >= 5:
                result[fields[0]] = (int(fields[3]) * 1024, int(fields[4]))
    return result


def swap_images() -> list[SwapImage]:
    """Every loop device backed by a tmemfs image (frontswap/N.img of a tmemfs mount)."""
    swaps = _swaps()
    found = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        with contextlib.suppress(OSError):
            image = Path(backing.read_text().strip().removesuffix(" (deleted)"))
            if not (_IMAGE.match(image.name) and image.parent.name == "frontswap"):
                continue
            entry = mount_entry(image.parent.parent)
            if entry is None or entry[0] != FSTYPE:
                continue
            device = f"/dev/{backing.parent.parent.name}"
            used, priority = swaps.get(device, (None, None))
            found.append(SwapImage(device, image, used, priority))
    return found


def _next_image(mount: Path) -> Path:
    """frontswap/N.img for the smallest N with neither an image nor a pool yet."""
    frontswap = mount / "frontswap"
    taken = {
        int(m.group(1))
        for name in os.listdir(frontswap)
        if (m := re.match(r"^(0|[1-9][0-9]*)(\.img)?$", name))
    }
    n = next(i for i in range(len(taken) + 1) if i not in taken)
    return frontswap / f"{n}.img"


def swap_on(
    mount: Path, size: int | None = None, priority: int | None = None, *, discard: bool = True
) -> str:
    """Make, attach, mkswap and swapon the next image of `mount`; return the device."""
    mount = _tmemfs_mount(mount)
    size = size if size is not None else default_size()
    page = os.sysconf("SC_PAGE_SIZE")
    size -= size % page
    if size < 16 * page:
        raise MountError(f"swap size {size} is too small for mkswap")
    image = _next_image(mount)
    undo: list[tuple[str, ...]] = []
    try:
        # The pool is made with the image: rmdir of it is the last undo step.
        with open(image, "xb") as f:
            undo.append(("rmdir", str(image.with_suffix(""))))
            undo.append(("rm", "-f", "--", str(image)))
            f.truncate(size)
        device = _run("losetup", "--direct-io=on", "--find", "--show", str(image))
        undo.append(("losetup", "-d", device))
        _run("mkswap", "-L", f"tmemfs-{image.stem}", device)
        args = ["swapon", "--discard"] if discard else ["swapon"]
        if priority is not None:
            args += ["-p", str(priority)]
        _run(*args, device)
    except BaseException as exc:
        for cmd in reversed(undo):
            subprocess.run(cmd, capture_output=True, timeout=_TIMEOUT, check=False)
        if isinstance(exc, OSError):
            raise MountError(f"cannot make {image}: {exc.strerror}") from None
        raise
    return device


def swap_off(target: Path) -> list[str]:
    """Undo swap_on for a device, or for every tmemfs image swap of a mount."""
    real = os.path.realpath(target)
    if real.startswith("/dev/"):
        chosen = [s for s in swap_images() if s.device == real]
        if not chosen:
            raise MountError(f"{target} is not a loop device on a tmemfs image")
    else:
        mount = _tmemfs_mount(target)
        chosen = [s for s in swap_images() if s.mount == mount]
    for s in chosen:
        if s.swap_used is not None:
            _run("swapoff", s.device)
        _run("losetup", "-d", s.device)
        with contextlib.suppress(FileNotFoundError):
            s.image.unlink()
        # rmdir flushes the pool: its memory goes back to the system.
        with contextlib.suppress(FileNotFoundError):
            s.pool.rmdir()
    return [s.device for s in chosen]


def swap_list() -> str:
    """A table of tmemfs swap: device, image, size, swap in use, pool pages and memory."""
    rows = [["DEVICE", "IMAGE", "SIZE", "USED", "PRIO", "STORED", "HELD"]]
    for s in swap_images():
        stored = held = "-"
        with contextlib.suppress(OSError):
            values = statsfmt.parse((s.pool / ".stats").read_text())
            stored = values.get("stored_pages", "-")
            held = format_size(int(values.get("pool_total_size", 0)))
        try:
            size = format_size(s.image.stat().st_size)
        except OSError:
            size = "-"
        rows.append(
            [
                s.device,
                str(s.image),
                size,
                format_size(s.swap_used) if s.swap_used is not None else "not swap",
                str(s.priority) if s.priority is not None else "-",
                stored,
                held,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )
