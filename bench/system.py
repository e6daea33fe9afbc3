"""What the bench needs from the machine, and what it says about it.

The checks come first, before anything is touched: the bench refuses in one line
(exit 77, as the examples do) rather than half-run where it lacks root, an idle
zram device or the tools it compares against.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
SKIP = 77
ZRAM_SYS = Path("/sys/block/zram0")
TOOLS = (
    "fio",
    "redis-server",
    "redis-benchmark",
    "redis-cli",
    "losetup",
    "mkswap",
    "swapon",
    "swapoff",
    "fusermount3",
    "truncate",
)


class CannotRun(Exception):
    """This machine cannot run the bench; the message says why, in one line."""


def check_can_run() -> None:
    """Raise CannotRun unless we are root with an idle zram0 and every tool we drive."""
    if os.geteuid() != 0:
        raise CannotRun("must run as root (zram, swap, loop devices, cgroups and mounts need it)")
    if not ZRAM_SYS.is_dir():
        raise CannotRun("no zram device (/sys/block/zram0 missing; try: modprobe zram)")
    # zram0 may belong to someone else (a swap device, a file system): never touch it then.
    disksize = int((ZRAM_SYS / "disksize").read_text())
    if disksize != 0 or "/dev/zram0" in Path("/proc/swaps").read_text():
        raise CannotRun(f"zram0 is in use (disksize {disksize}); the bench only uses an idle one")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise CannotRun(f"command not found: {', '.join(missing)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CannotRun("matplotlib is missing: pip install -e '.[bench]'") from None


def run(cmd: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command that must succeed, capturing its output; its stderr in the error."""
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(
            f"{' '.join(cmd)}: exit {result.returncode}" + (f": {detail[-1]}" if detail else "")
        )
    return result


def try_run(cmd: Sequence[str], timeout: float = 60) -> bool:
    """Run one cleanup step: never raise, say on stderr what failed and how to undo it."""
    try:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        warn(f"cleanup: {' '.join(cmd)} failed ({exc}); undo by hand")
        return False
    if result.returncode != 0:
        warn(f"cleanup: {' '.join(cmd)} failed: {result.stderr.strip()}; undo by hand")
        return False
    return True


def warn(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so every `finally` undoes its part.

    After the first, further signals are ignored: a second Ctrl-C must not cut a
    swapoff or an unmount short (each cleanup step has its own timeout instead). A
    signal that was ignored when we started (a background job's SIGINT) stays ignored.
    """
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {sig: signal.getsignal(sig) for sig in signals}
    for sig, handler in old.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def communicate(proc: subprocess.Popen[str], timeout: float, grace: float = 600) -> str:
    """Its output once it exits; if we are interrupted or it overruns, stop it gently.

    Children like swap-on-loop.sh undo their own swap and mounts on SIGTERM, which may
    take minutes (swapoff), so they get `grace` seconds for that before a kill.
    """
    try:
        output, _ = proc.communicate(timeout=timeout)
        return str(output)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        raise


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(field)


def vm_rss(pid: int) -> int:
    """Resident memory of a process in bytes (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: state first (proc(5)
    field 3), then ppid, and so on."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used, all its threads (utime and stime)."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    """The machine a report was measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "RAM": f"{meminfo('MemTotal') / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
    }


def versions() -> dict[str, str]:
    """Versions of everything whose speed the figures depend on."""
    found = {"python": platform.python_version()}
    for package in ("tmemfs", "pyfuse3", "trio", "lz4", "coredis"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["tmemfs"] += f" ({git_revision()})"
    found["redis-server"] = tool_version(["redis-server", "--version"], "v=")
    found["fio"] = tool_version(["fio", "--version"], "fio-")
    return found


def tool_version(cmd: list[str], marker: str) -> str:
    try:
        out = run(cmd, timeout=10).stdout
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "unknown"
    for word in out.split():
        if word.startswith(marker):
            return word[len(marker) :]
    return out.strip() or "unknown"


def git_revision() -> str:
    """The commit measured, marked dirty when the work tree differs from it."""
    try:
        rev = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], timeout=10)
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "tmemfs"], timeout=10)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return "no git"
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A scratch directory on a disk file system (a swap file cannot live on tmpfs).

    Removed at the end only if nothing is still mounted under it: a recursive delete
    must never walk into a mount that failed to go away.
    """
    path = Path(tempfile.mkdtemp(prefix="tmemfs-bench.", dir="/var/tmp"))
    try:
        yield path
    finally:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        if any(m == str(path) or m.startswith(f"{path}/") for m in mounts):
            warn(f"cleanup: something is still mounted under {path}; left in place")
        else:
            shutil.rmtree(path, ignore_errors=True)
