"""Mounting and unmounting: the daemon's life from fork to exit.

The parent process checks everything it can before forking, so a bad option or a
busy mount point is one line on stderr. The child mounts, then tells the parent
through a pipe that the mount is there (or why it is not), and only then detaches.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import setproctitle
import trio

from tmemfs import __version__
from tmemfs.backends import mask_url, open_backend, open_tier
from tmemfs.backends.lz4 import DEFAULT_RECOMPRESS_AFTER, DEFAULT_RECOMPRESS_LEVEL
from tmemfs.backends.store import StoreUnavailable
from tmemfs.engine import Engine
from tmemfs.engine import stats as statsfmt
from tmemfs.fs import TmemOperations, discard_supported, fast_path_supported
from tmemfs.metrics import open_metrics_listeners, serve_metrics
from tmemfs.sizes import format_limit
from tmemfs.systemd import Notifier, status_line

log = logging.getLogger(__name__)

FSTYPE = "fuse.tmemfs"
WORKER_STACK = 512 * 1024
# How often systemd's STATUS= line is refreshed (when it changed).
STATUS_INTERVAL = 2.0


class MountError(Exception):
    """A mount or unmount that cannot go ahead; its message is the one line users see."""


@dataclass(slots=True)
class MountOptions:
    """Everything `tmemfs mount` was asked for, already validated."""

    mountpoint: Path
    backend: str = "lz4"
    max_pool: int = 0
    max_pool_per_user: int | None = None
    page_size: int = 4096
    reject_ratio: float = 0.875
    reject_poor: bool = False
    recompress_after: float | None = DEFAULT_RECOMPRESS_AFTER  # None: never
    recompress_level: int = DEFAULT_RECOMPRESS_LEVEL
    recompress_dict: bool = False  # zstd with a dictionary trained on the store's pages
    exclusive_gets: bool = False
    allow_other: bool = False
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    writeback: str | None = None
    namespace: str = ""
    remote_timeout: float = 2.0
    metrics: tuple[str, int] | None = None

    def describe(self) -> dict[str, str]:
        return {
            "pid": str(os.getpid()),
            "version": __version__,
            "mountpoint": str(self.mountpoint),
            "backend": mask_url(self.backend),
            "writeback": mask_url(self.writeback) if self.writeback else "none",
            "namespace": self.namespace,
            "metrics": f"{self.metrics[0]}:{self.metrics[1]}" if self.metrics else "none",
            "max_pool": str(self.max_pool),
            "max_pool_per_user": format_limit(self.max_pool_per_user),
            "page_size": str(self.page_size),
            "reject_ratio": str(self.reject_ratio),
            "reject_poor": str(int(self.reject_poor)),
            "recompress": (
                "none"
                if self.recompress_after is None
                else f"zstd:{self.recompress_level}"
                f"{'+dict' if self.recompress_dict else ''} "
                f"after {self.recompress_after:g}s"
            ),
            "exclusive_gets": str(int(self.exclusive_gets)),
            "allow_other": str(int(self.allow_other)),
            "discard": "on" if discard_supported() else "off",
            "fastpath": "on" if fast_path_supported() else "off",
        }


# -- the mount table ---------------------------------------------------------------------


def mount_entry(path: Path) -> tuple[str, str] | None:
    """(fstype, source) of the mount at `path`, or None if nothing is mounted there."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4].replace("\\040", " ")
            if mount_point == target:
                sep = fields.index("-")
                return fields[sep + 1], fields[sep + 2]
    return None


def is_stale(path: Path) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _becomes_stale(path: Path, wait: float = 1.0) -> bool:
    """Whether a tmemfs mount is dead. Just after a kill -9 the kernel takes a moment
    to notice that its daemon is gone, so a live-looking one is asked again briefly."""
    deadline = time.monotonic() + wait
    while not is_stale(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def detach(path: Path) -> None:
    """Lazily unmount a dead tmemfs mount point."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        if mount_entry(path) is None:
            return
    raise MountError(f"cannot clean up the stale mount at {path}")


def check_mountpoint(path: Path) -> None:
    """Fail with one clear line unless `path` can be mounted on; clean a dead tmemfs."""
    entry = mount_entry(path)
    if entry is not None:
        if entry[0] == FSTYPE and _becomes_stale(path):
            log.warning("cleaning up the stale tmemfs mount at %s", path)
            detach(path)
        else:
            raise MountError(f"{path} is already a mount point ({entry[0]}); it is in use")
    if not path.exists():
        raise MountError(f"mount point {path} does not exist")
    if not path.is_dir():
        raise MountError(f"mount point {path} is not a directory")


def check_fuse_device() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist (is the fuse module loaded?)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not readable and writable by this user")


# -- mount -------------------------------------------------------------------------------


def mount(opts: MountOptions) -> int:
    """`tmemfs mount`: returns the exit status."""
    check_fuse_device()
    check_mountpoint(opts.mountpoint)
    if opts.foreground:
        setup_logging(opts, to_stderr=True)
        return serve(opts, ready=None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            message = ready.read().decode(errors="replace").strip()
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        raise MountError(message or "the daemon exited before mounting")
    os.close(read_fd)
    os.setsid()
    setup_logging(opts, to_stderr=False)
    status = 1
    try:
        status = serve(opts, ready=write_fd)
    except MountError as exc:
        _tell(write_fd, str(exc))
    except BaseException as exc:
        log.exception("daemon failed")
        _tell(write_fd, f"daemon failed: {exc}")
    finally:
        os._exit(status)


def _tell(fd: int | None, message: str) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, message.encode() + b"\n")
        os.close(fd)


def serve(opts: MountOptions, ready: int | None) -> int:
    """Mount, serve until unmounted or signalled, unmount. Runs in the daemon."""
    limiter_size = os.cpu_count() or 1
    info = opts.describe()
    # The worker threads compress pages and need little stack; with mlockall (once an
    # image exists) each default 8 MiB stack would be held in RAM, unaccounted for.
    threading.stack_size(WORKER_STACK)
    _hide_secrets_from_ps()
    fuse_options = {"fsname=tmemfs", f"subtype={FSTYPE.split('.')[1]}", "default_permissions"}
    if opts.allow_other:
        fuse_options.add("allow_other")
    if opts.debug:
        fuse_options.add("debug")

    async def run() -> None:
        limiter = trio.CapacityLimiter(limiter_size)
        backend = open_backend(
            opts.backend,
            page_size=opts.page_size,
            limiter=limiter,
            reject_ratio=opts.reject_ratio,
            recompress_after=opts.recompress_after,
            recompress_level=opts.recompress_level,
            recompress_dict=opts.recompress_dict,
            namespace=opts.namespace,
            timeout=opts.remote_timeout,
        )
        tier = None
        if opts.writeback:
            tier = open_tier(
                opts.writeback,
                page_size=opts.page_size,
                limiter=limiter,
                namespace=opts.namespace,
                timeout=opts.remote_timeout,
            )
        engine = Engine(
            backend,
            max_pool=opts.max_pool,
            exclusive_gets=opts.exclusive_gets,
            reject_poor=opts.reject_poor,
            writeback=tier,
            max_pool_per_user=opts.max_pool_per_user,
        )
        try:
            await engine.open()
        except StoreUnavailable as exc:
            await engine.close()
            raise MountError(f"cannot reach {exc}") from None
        try:
            await _serve_mounted(opts, engine, info, fuse_options, ready)
        finally:
            await engine.close()

    trio.run(run)
    return 0


async def _serve_mounted(
    opts: MountOptions,
    engine: Engine,
    info: dict[str, str],
    fuse_options: set[str],
    ready: int | None,
) -> None:
    """Mount, tell the parent, serve until unmounted or signalled, unmount."""
    operations = TmemOperations(
        engine,
        daemon_info=info,
        on_first_image=lock_memory,
        invalidate_entry=_invalidate_entry,
        invalidate_entry_now=_invalidate_entry_now,
    )
    listeners = []
    if opts.metrics:
        host, port = opts.metrics
        try:
            listeners = await open_metrics_listeners(host, port)
        except OSError as exc:
            raise MountError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    try:
        pyfuse3.init(operations, str(opts.mountpoint), fuse_options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount {opts.mountpoint}: {exc}") from None
    log.info(
        "mounted %s: %s",
        opts.mountpoint,
        ", ".join(f"{k} {v}" for k, v in info.items() if k != "mountpoint"),
    )
    if discard_supported():
        log.info("discard: on (fallocate on an image invalidates the pages in its range)")
    else:
        log.warning(
            "discard: off: this pyfuse3 (%s) passes no fallocate on, so a swap image "
            "keeps every slot swap has used; examples/setup.sh builds it with "
            "patches/pyfuse3-3.5.0-fallocate.patch",
            pyfuse3.__version__,
        )
    if not fast_path_supported():
        log.info(
            "fastpath: off: this pyfuse3 (%s) answers every request with a coroutine; "
            "examples/setup.sh builds it with patches/pyfuse3-3.5.0-fastpath.patch",
            pyfuse3.__version__,
        )
    _tell(ready, "ok")
    if ready is not None:
        _detach_stdio()
    clean = False
    notifier = Notifier()  # systemd's Type=notify; does nothing elsewhere
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_unmount_on_signal, opts.mountpoint)
            nursery.start_soon(engine.run_writeback)
            nursery.start_soon(engine.run_recompress)
            if listeners:
                nursery.start_soon(serve_metrics, engine, listeners)
            if notifier.enabled:
                nursery.start_soon(_notify_systemd, notifier, engine, opts.mountpoint)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
        clean = True
    finally:
        notifier.stopping()
        # After an unmount the mount is gone already; after a crash it is still there
        # and close() takes it down (lazily: nothing is left to serve it).
        pyfuse3.close(unmount=mount_entry(opts.mountpoint) is not None)
        log.info("unmounted %s (%s)", opts.mountpoint, "clean" if clean else "after an error")
        notifier.close()


async def _notify_systemd(notifier: Notifier, engine: Engine, mountpoint: Path) -> None:
    """READY=1 once the mount answers, then a STATUS= line whenever it changes.

    Mounted is not yet ready: until pyfuse3.main() reads requests, anything that
    touches the mount waits. So a worker thread asks the mount itself (this thread
    must be free to answer), and only its answer makes the service ready.
    """
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint / ".daemon", abandon_on_cancel=True)
    except OSError as exc:
        log.warning("the mount did not answer (%s); not telling systemd it is ready", exc)
        return
    status = status_line(engine.stats())
    notifier.ready(status)
    while True:
        await trio.sleep(STATUS_INTERVAL)
        now = status_line(engine.stats())
        if now != status:
            notifier.status(now)
            status = now


def _invalidate_entry(parent_inode: int, name: bytes) -> None:
    """Drop a cached name in the kernel; from a handler, so never waiting for it."""
    pyfuse3.invalidate_entry_async(parent_inode, name, ignore_enoent=True)


def _invalidate_entry_now(parent_inode: int, name: bytes) -> None:
    """Drop a cached name in the kernel and wait for it; in a worker thread."""
    try:
        pyfuse3.invalidate_entry(parent_inode, name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the kernel had already let it go
            log.debug("could not drop %r from the kernel's cache: %s", name, exc)


async def _unmount_on_signal(mountpoint: Path) -> None:
    """SIGTERM, SIGINT, SIGHUP: unmount if nothing holds the mount, else keep serving.

    Never a lazy detach: with a loop device on an image, the kernel would go on
    swapping into a filesystem whose daemon is gone. The plain unmount runs in a worker
    thread, because the kernel may need this thread to answer requests meanwhile; once
    it succeeds, the session ends and pyfuse3.main() returns.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            refusal = await trio.to_thread.run_sync(_plain_unmount, mountpoint)
            if refusal is None:
                log.info("%s: unmounted %s", name, mountpoint)
                return
            log.warning("%s: not unmounting %s: %s", name, mountpoint, refusal)


def _hide_secrets_from_ps() -> None:
    """ps shows our command line, which may hold a Redis password: show it masked."""
    if any("://" in arg for arg in sys.argv):
        setproctitle.setproctitle(" ".join(mask_url(a) if "://" in a else a for a in sys.argv))


BUSY = "it is busy (open files, a cwd or a loop device)"


def _plain_unmount(mountpoint: Path) -> str | None:
    """`fusermount3 -u`, never lazily: None on success, else why not (BUSY when busy).

    For `tmemfs umount` and for the daemon's own signal handler alike.
    """
    result = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode == 0:
        return None
    reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
    return BUSY if "busy" in reason.lower() else reason


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.chdir("/")


def setup_logging(opts: MountOptions, *, to_stderr: bool) -> None:
    """stderr in the foreground; syslog (or --log FILE) for a daemon.

    Where there is no syslog (many containers), a daemon logs to a file rather than
    nowhere: /var/log/tmemfs.log for root, ~/.local/state/tmemfs.log for others.
    """
    handler: logging.Handler
    if opts.log_file:
        handler = logging.FileHandler(opts.log_file)
    elif to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.ident = f"tmemfs[{os.getpid()}]: "
    else:
        handler = _fallback_log_file()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if opts.debug else logging.INFO)
    # coredis reports each retry; our own lines say what failed, once.
    logging.getLogger("coredis").setLevel(logging.DEBUG if opts.debug else logging.WARNING)


def _fallback_log_file() -> logging.Handler:
    if os.geteuid() == 0:
        path = Path("/var/log/tmemfs.log")
    else:
        path = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "tmemfs.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.FileHandler(path)
    except OSError:
        return logging.NullHandler()


# -- umount ------------------------------------------------------------------------------


def daemon_pid(path: Path) -> int | None:
    """The daemon's pid, from the mount's own `.daemon` file."""
    try:
        pid = statsfmt.parse((path / ".daemon").read_text()).get("pid", "")
    except OSError:
        return None
    return int(pid) if pid.isdigit() else None


def umount(path: Path, timeout: float = 30.0) -> int:
    """`tmemfs umount`: unmount, then wait for the daemon to exit."""
    entry = mount_entry(path)
    if entry is None:
        raise MountError(f"{path} is not mounted")
    if entry[0] != FSTYPE:
        raise MountError(f"{path} is not a tmemfs mount ({entry[0]})")
    if is_stale(path):
        detach(path)
        return 0
    pid = daemon_pid(path)
    refusal = _plain_unmount(path)
    if refusal == BUSY:
        raise MountError(f"{path} is not unmounted: {BUSY}")
    if refusal is not None:
        raise MountError(f"cannot unmount {path}: {refusal}")
    if pid is not None:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MountError(f"unmounted {path}, but the daemon (pid {pid}) has not exited")
            time.sleep(0.05)
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4
_M_MMAP_THRESHOLD = -3
# Blocks at least this big get a mapping of their own from malloc, whatever was freed.
_MMAP_THRESHOLD = 256 << 10


def lock_memory() -> bool:
    """mlockall, so that serving swap never needs swap.

    MCL_ONFAULT locks pages as they are first touched rather than at mapping time: the
    page store reserves its slab arenas ahead and fills them chunk by chunk, and only
    what is filled should be resident.

    Locked memory cannot be given back with MADV_DONTNEED, so malloc_trim can only
    shrink the top of the heap. glibc's dynamic mmap threshold would otherwise move
    up to 1 MiB once a request buffer of that size is freed, after which such buffers
    come from the heap and stay there: with the threshold fixed, they are mappings of
    their own and go back when freed. Measured: RSS 5 s after rmdir of a 128 MiB pool
    stood 8.1 MiB above the start, now 5.7 MiB; writing it took 0.81 s, now 0.74 s.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
        log.warning(
            "mlockall failed (%s); pages held by tmemfs may be swapped",
            os.strerror(ctypes.get_errno()),
        )
        return False
    return True
