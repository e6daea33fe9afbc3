"""python -m bench: every comparison, side by side, in one process; a report and plots.

    python -m bench [--quick] [--out DIR] [--only image,memory,swap,pagefiles,redis,growth,ceiling]

Needs root and an idle /dev/zram0 (exit 77 otherwise). Writes
bench/results/DATE.md, its PNG plots and BENCHMARKS.md (or, with --out, the report
and plots into DIR and nothing else). Exit status: 0 when every comparison ran
(goals are reported, never asserted), 1 when one failed, 77 when the bench cannot
run here, 130 when interrupted. Whatever it set up is undone in every case.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

from bench import report
from bench.config import FULL, QUICK, Context
from bench.model import Section
from bench.system import (
    ROOT,
    SKIP,
    CannotRun,
    check_can_run,
    machine,
    scratch,
    terminate_as_interrupt,
    versions,
)
from tmemfs.build import stale_message, stale_modules

RESULTS = ROOT / "bench" / "results"
# In report order; each is bench/compare/NAME.py, imported only once the checks pass
# (matplotlib comes with them, and a refusal should be one quiet line).
COMPARISONS = ("image", "memory", "swap", "pagefiles", "redis", "growth", "ceiling")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="everything small, one run each: a smoke test (about a minute)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the report and plots here (default bench/results, which "
        "also rewrites BENCHMARKS.md)",
    )
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=list(COMPARISONS),
        help="comma-separated comparisons to run (default: all)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(COMPARISONS)
    if unknown:
        parser.error(
            f"unknown comparison {', '.join(sorted(unknown))}; choose from {', '.join(COMPARISONS)}"
        )
    return args


def run_comparison(ctx: Context, module: ModuleType) -> Section:
    """One comparison; a failure becomes its section's error, and the others still run."""
    try:
        section: Section = module.run(ctx)
        return section
    # SystemExit too: bench.redis and bench.pagefiles exit when a check fails.
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        message = str(exc.code if isinstance(exc, SystemExit) else exc) or type(exc).__name__
        return Section(module.NUMBER, module.TITLE, "", error=message)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stale = stale_modules()
    if stale:
        # A broken setup, not a machine that cannot run the bench: an error, not SKIP.
        print(f"bench: {stale_message(stale)}", file=sys.stderr)
        return 1
    try:
        check_can_run()
    except CannotRun as exc:
        print(f"bench: cannot run here: {exc}", file=sys.stderr)
        return SKIP
    # Imported after the checks: they bring matplotlib, and a refusal is one quiet line.
    modules = [importlib.import_module(f"bench.compare.{name}") for name in args.only]
    out = (args.out or RESULTS).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = datetime.date.today().isoformat()
    started = time.monotonic()
    try:
        with terminate_as_interrupt(), scratch() as tmp:
            ctx = Context(QUICK if args.quick else FULL, tmp, out, stem)
            sections = [run_comparison(ctx, module) for module in modules]
            run = report.Run(
                ctx, sections, time.monotonic() - started, args.quick, machine(), versions()
            )
            text = report.report(run)  # profiles the corpora, which live until scratch ends
    except KeyboardInterrupt:
        print("bench: interrupted; what it had set up has been undone", file=sys.stderr)
        return 130
    (out / f"{stem}.md").write_text(text)
    # BENCHMARKS.md shows only complete full runs; a quick or partial one would mislead.
    if out == RESULTS.resolve() and not args.quick and tuple(args.only) == COMPARISONS:
        (ROOT / "BENCHMARKS.md").write_text(report.benchmarks_page(run, "bench/results"))
    print(report.terminal_summary(sections))
    print(f"bench: report {out / f'{stem}.md'} ({run.seconds:.0f} s)")
    return 1 if any(section.error for section in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
