"""The command line: `tmemfs mount`, `tmemfs umount`, `tmemfs stat`.

Every failure a user can cause is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from tmemfs import __version__
from tmemfs.backends import BackendError, check_backend
from tmemfs.backends.lz4 import DEFAULT_RECOMPRESS_AFTER, DEFAULT_RECOMPRESS_LEVEL
from tmemfs.backends.redis import is_redis_url
from tmemfs.build import stale_message, stale_modules
from tmemfs.engine import stats as statsfmt
from tmemfs.fs import discard_supported, fast_path_supported
from tmemfs.mount import MountError, MountOptions, mount, umount
from tmemfs.sizes import format_size, parse_limit, parse_size
from tmemfs.swap import swap_list, swap_off, swap_on

DEFAULT_MAX_POOL = "20%"
# With --allow-other, what one user's pools may hold together unless told otherwise: no
# user can take the whole budget, so no user can starve everyone else.
DEFAULT_MAX_POOL_PER_USER = "50%"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 1."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message}\n")
        raise SystemExit(1)


def build_parser() -> Parser:
    parser = Parser(prog="tmemfs", description="Transcendent memory as a FUSE filesystem.")
    discard = "on" if discard_supported() else "off"
    fastpath = "on" if fast_path_supported() else "off"
    parser.add_argument(
        "--version",
        action="version",
        version=f"tmemfs {__version__} (discard: {discard}, fastpath: {fastpath})",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    m = sub.add_parser("mount", help="mount a tmemfs")
    m.add_argument("mountpoint", type=Path)
    m.add_argument(
        "--backend",
        default="lz4",
        help="lz4 (default), raw, or redis://HOST:PORT/DB, rediss://…, redis+cluster://HOST:PORT,…",
    )
    m.add_argument(
        "--writeback",
        metavar="TARGET",
        help="a file path or redis URL under the local pool: when the budget is "
        "full, the coldest frontswap pages move there instead of being refused",
    )
    m.add_argument(
        "--namespace",
        help="prefix of this mount's keys in Redis (default HOST:MOUNTPOINT), so a "
        "remount finds its frontswap pools",
    )
    m.add_argument(
        "--remote-timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="deadline of each Redis call (default 2)",
    )
    m.add_argument(
        "--max-pool",
        default=DEFAULT_MAX_POOL,
        help="memory budget: bytes with K/M/G, or N%% of RAM (default 20%%)",
    )
    m.add_argument(
        "--max-pool-per-user",
        metavar="SIZE|N%|max",
        help="what the pools of one user (root excepted) may hold together: bytes "
        "with K/M/G, N%% of --max-pool, or max (default: "
        f"{DEFAULT_MAX_POOL_PER_USER.replace('%', '%%')} with --allow-other, "
        "else max)",
    )
    m.add_argument(
        "--page-size",
        type=int,
        default=4096,
        help="page size in bytes, a power of two from 512 to 32768 (default 4096)",
    )
    m.add_argument(
        "--reject-ratio",
        type=float,
        default=0.875,
        help="pages compressing worse than this are stored raw (default 0.875)",
    )
    m.add_argument(
        "--reject-poor",
        action="store_true",
        help="refuse poorly compressing pages instead of storing them raw",
    )
    m.add_argument(
        "--recompress-after",
        type=float,
        default=DEFAULT_RECOMPRESS_AFTER,
        metavar="SECONDS",
        help="lz4: recompress pages unused for this long in the background "
        f"(default {DEFAULT_RECOMPRESS_AFTER:g})",
    )
    m.add_argument(
        "--recompress-codec",
        default=f"zstd:{DEFAULT_RECOMPRESS_LEVEL}",
        metavar="zstd[:LEVEL]",
        help=f"the codec of recompressed pages (default zstd:{DEFAULT_RECOMPRESS_LEVEL})",
    )
    m.add_argument(
        "--recompress-dict",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="lz4: recompress with a zstd dictionary trained on the mount's own "
        "idle pages, once it holds 32 MiB of pages (default: off)",
    )
    m.add_argument(
        "--no-recompress",
        action="store_true",
        help="keep every page in lz4 (no background recompression)",
    )
    m.add_argument(
        "--exclusive-gets",
        action="store_true",
        help="a read of a frontswap or private cleancache page invalidates it",
    )
    m.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users in (permissions are then checked by mode bits)",
    )
    m.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    m.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    m.add_argument("--debug", action="store_true", help="log every request")
    m.add_argument(
        "--log",
        dest="log_file",
        metavar="FILE",
        help="log to FILE (default: stderr in the foreground, syslog as a daemon)",
    )

    u = sub.add_parser("umount", help="unmount a tmemfs and wait for its daemon to exit")
    u.add_argument("mountpoint", type=Path)

    s = sub.add_parser("stat", help="show the counters of a mounted tmemfs")
    s.add_argument("mountpoint", type=Path)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--watch", type=float, metavar="N", help="redraw every N seconds, with stores/s and loads/s"
    )

    w = sub.add_parser("swap", help="swap on a tmemfs image (without a subcommand: list it)")
    ws = w.add_subparsers(dest="swap_command", parser_class=Parser)
    on = ws.add_parser(
        "on",
        help="make the next frontswap/N.img, attach, mkswap, swapon --discard; print the device",
    )
    on.add_argument("mountpoint", type=Path)
    on.add_argument("--size", help="image size with K/M/G (default: the size of RAM)")
    on.add_argument("--priority", type=int, help="swap priority (swapon -p)")
    on.add_argument(
        "--no-discard",
        action="store_true",
        help="swapon without --discard: freed slots stay stored (to compare)",
    )
    off = ws.add_parser("off", help="swapoff, detach, remove the image and its pool")
    off.add_argument("target", type=Path, metavar="MOUNT|DEVICE")
    return parser


def mount_options(args: argparse.Namespace, parser: Parser) -> MountOptions:
    stale = stale_modules()
    if stale:
        parser.error(stale_message(stale))
    try:
        check_backend(args.backend)
        if args.writeback and is_redis_url(args.writeback):
            check_backend(args.writeback)
    except BackendError as exc:
        parser.error(str(exc))
    if args.writeback and args.backend not in ("lz4", "raw"):
        parser.error("--writeback goes under a local backend (lz4 or raw)")
    if args.remote_timeout <= 0:
        parser.error("--remote-timeout must be positive")
    metrics = None
    if args.metrics:
        host, _, port = args.metrics.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--metrics takes HOST:PORT, not {args.metrics!r}")
        metrics = (host.strip("[]"), int(port))
    try:
        max_pool = parse_size(args.max_pool)
    except ValueError as exc:
        parser.error(f"--max-pool: {exc}")
    size = args.page_size
    if size < 512 or size > 32768 or size & (size - 1):
        parser.error("--page-size must be a power of two from 512 to 32768")
    if max_pool < size:
        parser.error("--max-pool must hold at least one page")
    if not 0 < args.reject_ratio <= 1:
        parser.error("--reject-ratio must be in (0, 1]")
    per_user_text = args.max_pool_per_user or (
        DEFAULT_MAX_POOL_PER_USER if args.allow_other else "max"
    )
    try:
        max_pool_per_user = parse_limit(per_user_text, max_pool)
    except ValueError as exc:
        parser.error(f"--max-pool-per-user: {exc}")
    if not args.recompress_after > 0:
        parser.error("--recompress-after must be a positive number of seconds")
    codec, _, level = args.recompress_codec.partition(":")
    if codec != "zstd" or (level and not (level.isdigit() and 1 <= int(level) <= 19)):
        parser.error(
            f"--recompress-codec takes zstd or zstd:LEVEL (1-19), not {args.recompress_codec!r}"
        )
    return MountOptions(
        mountpoint=args.mountpoint.absolute(),
        backend=args.backend,
        max_pool=max_pool,
        max_pool_per_user=max_pool_per_user,
        page_size=size,
        reject_ratio=args.reject_ratio,
        reject_poor=args.reject_poor,
        recompress_after=None if args.no_recompress else args.recompress_after,
        recompress_level=int(level) if level else DEFAULT_RECOMPRESS_LEVEL,
        recompress_dict=args.recompress_dict,
        exclusive_gets=args.exclusive_gets,
        allow_other=args.allow_other,
        foreground=args.foreground,
        debug=args.debug,
        log_file=args.log_file,
        writeback=str(Path(args.writeback).absolute())
        if args.writeback and not is_redis_url(args.writeback)
        else args.writeback,
        namespace=args.namespace or f"{socket.gethostname()}:{args.mountpoint.absolute()}",
        remote_timeout=args.remote_timeout,
        metrics=metrics,
    )


# -- stat --------------------------------------------------------------------------------

_COLUMNS = (
    ("POOL", None),
    ("PAGES", "stored_pages"),
    ("ORIG", "orig_data_size"),
    ("COMPR", "compr_data_size"),
    ("TOTAL", "pool_total_size"),
    ("RATIO", None),
    ("SAME", "same_filled_pages"),
    ("DEDUP", "dedup_pages"),
    ("WRITTENBACK", "written_back_pages"),
    ("EVICTED", "evicted_pages"),
    ("REJECTED", None),
    ("LOADS", "loads"),
    ("MISSES", "load_misses"),
    ("MAX", None),
    ("WEIGHT", None),
)
_SIZES = {"orig_data_size", "compr_data_size", "pool_total_size"}
# Limits in a pool's .stats: bytes, or `max` for none.
_LIMITS = ("max_size", "user_max_size")


def read_stats(mountpoint: Path) -> dict[str, dict[str, int | None]]:
    """Every stats file of a mount: {"total": {...}, "frontswap/0": {...}, ...}.

    A limit that is `max` (none) in a pool's .stats is None here (null in --json)."""

    def load(path: Path) -> dict[str, int | None]:
        text = path.read_text()
        values: dict[str, int | None] = dict(statsfmt.counters(text))
        for name, value in statsfmt.parse(text).items():
            if name in _LIMITS and value == "max":
                values[name] = None
        return values

    result = {"total": load(mountpoint / "stats")}
    for kind in ("frontswap", "cleancache"):
        for pool in sorted((mountpoint / kind).iterdir()):
            if pool.is_dir():
                try:
                    result[f"{kind}/{pool.name}"] = load(pool / ".stats")
                except FileNotFoundError:
                    continue  # flushed while we looked
    return result


def format_table(
    stats: dict[str, dict[str, int | None]],
    rates: dict[str, tuple[float, float]] | None = None,
) -> str:
    columns = [title for title, _ in _COLUMNS]
    if rates is not None:
        columns += ["STORES/s", "LOADS/s"]
    rows = [columns]
    for name, values in [
        *((k, v) for k, v in stats.items() if k != "total"),
        ("total", stats["total"]),
    ]:
        row = []
        for title, key in _COLUMNS:
            if title == "POOL":
                row.append(name)
            elif title == "RATIO":
                compr = values.get("compr_data_size", 0)
                orig = values.get("orig_data_size", 0)
                row.append(f"{orig / compr:.2f}" if compr else "-")
            elif title == "REJECTED":
                row.append(
                    str(
                        (values.get("reject_compress_poor") or 0)
                        + (values.get("pool_limit_hit") or 0)
                        + (values.get("reject_alloc_fail") or 0)
                    )
                )
            elif title == "MAX":
                row.append(_limit_cell(values))
            elif title == "WEIGHT":
                row.append(str(values["weight"]) if "weight" in values else "-")
            else:
                assert key is not None
                value = values.get(key) or 0
                row.append(format_size(value) if key in _SIZES else str(value))
        if rates is not None:
            stores, loads = rates.get(name, (0.0, 0.0))
            row += [f"{stores:.0f}", f"{loads:.0f}"]
        rows.append(row)
    table = _align(rows)
    codecs = format_codecs(stats["total"])
    return f"{table}\n\n{codecs}" if codecs else table


def format_codecs(total: dict[str, int]) -> str:
    """Pages and compressed bytes per codec (lz4 backend), and what recompression saved."""
    names = sorted(
        {
            k[len("codec_") :].rsplit("_", 1)[0]
            for k in total
            if k.startswith("codec_") and k.endswith("_pages")
        }
    )
    if not names:
        return ""
    rows = [["CODEC", "PAGES", "COMPR"]]
    for name in names:
        rows.append(
            [
                name,
                str(total.get(f"codec_{name}_pages", 0)),
                format_size(total.get(f"codec_{name}_data_size", 0)),
            ]
        )
    saved = format_size(total.get("recompress_saved_bytes", 0))
    dictionaries = total.get("codec_zstd_dict_dictionary_size", 0)
    return (
        f"{_align(rows)}\nrecompressed {total.get('recompressed_pages', 0)} pages, "
        f"saving {saved}"
        + (f" (zstd dictionaries: {format_size(dictionaries)})" if dictionaries else "")
        + f"; {total.get('recompressed_loads', 0)} loads met a recompressed page"
    )


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def _limit_cell(values: dict[str, int | None]) -> str:
    """A pool's limit: the tighter of its .max and its owner's (`max`: none); the total
    row shows --max-pool."""
    if "max_size" not in values:
        budget = values.get("max_pool_size")
        return format_size(budget) if budget is not None else "-"
    limits = [v for v in (values.get("max_size"), values.get("user_max_size")) if v is not None]
    return format_size(min(limits)) if limits else "max"


def _read(mountpoint: Path) -> dict[str, dict[str, int]]:
    try:
        return read_stats(mountpoint)
    except OSError as exc:
        raise MountError(f"cannot read the stats of {mountpoint}: {exc.strerror}") from None


def stat(mountpoint: Path, as_json: bool, watch: float | None = None) -> int:
    if watch is None:
        stats = _read(mountpoint)
        print(json.dumps(stats, indent=2, sort_keys=True) if as_json else format_table(stats))
        return 0
    if watch <= 0:
        raise MountError("--watch takes a positive number of seconds")
    previous, then = _read(mountpoint), time.monotonic()
    while True:
        time.sleep(watch)
        stats, now = _read(mountpoint), time.monotonic()
        elapsed = max(now - then, 1e-9)
        rates = {
            name: tuple(
                (values.get(k, 0) - previous.get(name, {}).get(k, 0)) / elapsed
                for k in ("stores", "loads")
            )
            for name, values in stats.items()
        }
        if as_json:
            print(json.dumps({"stats": stats, "rates": rates}, sort_keys=True), flush=True)
        else:
            # Home and clear, as watch(1) redraws.
            sys.stdout.write(f"\x1b[H\x1b[J{mountpoint}, every {watch:g}s\n\n")
            print(format_table(stats, rates), flush=True)  # type: ignore[arg-type]
        previous, then = stats, now


def swap(args: argparse.Namespace, parser: Parser) -> int:
    if args.swap_command == "on":
        size = None
        if args.size is not None:
            try:
                size = parse_size(args.size)
            except ValueError as exc:
                parser.error(f"--size: {exc}")
        print(swap_on(args.mountpoint, size, args.priority, discard=not args.no_discard))
    elif args.swap_command == "off":
        for device in swap_off(args.target):
            print(f"{device}: off")
    else:
        print(swap_list())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            return mount(mount_options(args, parser))
        if args.command == "umount":
            return umount(args.mountpoint.absolute())
        if args.command == "swap":
            return swap(args, parser)
        return stat(args.mountpoint, args.json, args.watch)
    except MountError as exc:
        sys.stderr.write(f"tmemfs: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 0 if args.command == "stat" else 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
