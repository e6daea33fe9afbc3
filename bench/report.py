"""The Markdown report (bench/results/DATE.md) and the top-level BENCHMARKS.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench import corpora
from bench.config import Context
from bench.model import Row, Section, Table

RERUN = """\
Rerun, as root, from the repository (the bench mounts tmemfs and tmpfs, resets
`/dev/zram0`, turns swap on and off, makes memory cgroups and starts a redis-server,
and undoes all of it when it ends, Ctrl-C included):

```sh
.venv/bin/pip install -e '.[bench]'      # matplotlib, for the plots
.venv/bin/python -m bench                 # the full run, 9-12 minutes on 2 cores
.venv/bin/python -m bench --quick --out /tmp/bench   # a smoke test, about a minute
```

The full run writes `bench/results/<date>.md` and its PNG plots and rewrites this
page. `--out DIR` writes the report and plots to DIR instead (and leaves this page
alone); `--only image,memory,...` runs some of the comparisons. Where the bench
lacks root, an idle zram0 or one of its tools (fio, redis-server, redis-benchmark)
it says so in one line and exits 77.
"""


@dataclass
class Run:
    """Everything one `python -m bench` measured, for the report."""

    ctx: Context
    sections: list[Section]
    seconds: float
    quick: bool
    machine: dict[str, str]
    versions: dict[str, str]


def report(run: Run) -> str:
    """The full report: summary table, plots, machine, versions, corpora, each comparison."""
    parts = [
        f"# tmemfs benchmarks, {run.ctx.stem}",
        "",
        _preamble(run),
        "",
        "## Results",
        "",
        summary_table(run.sections),
        "",
        _goals_note(),
        "",
        "## Plots",
        "",
        *plot_links(run.sections, ""),
        "",
        "## Machine",
        "",
        key_values(run.machine),
        "",
        "## Versions",
        "",
        key_values(run.versions),
        "",
        "## Corpora",
        "",
        corpus_table(run.ctx),
        "",
    ]
    for section in run.sections:
        parts += section_text(section)
    return "\n".join(parts).rstrip() + "\n"


def benchmarks_page(run: Run, results_dir: str) -> str:
    """BENCHMARKS.md: how to rerun, then the latest table and plots."""
    link = f"{results_dir}/{run.ctx.stem}.md"
    machine = ", ".join(f"{k} {v}" for k, v in run.machine.items())
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
    return (
        "\n".join(
            [
                "# Benchmarks",
                "",
                "`python -m bench` measures tmemfs side by side with what it competes with on the "
                "same machine, in one process: the block image against zram, the memory both hold "
                "for the same pages, the kernel swapping through tmemfs against zram swap and a "
                "swap file, page files against tmpfs, the Redis backend against redis-benchmark, "
                "and how store rate and memory per page hold up to 10^6 pages.",
                "",
                RERUN,
                f"## Latest run: {run.ctx.stem} ([full report]({link}))",
                "",
                _preamble(run),
                "",
                f"Machine: {machine}.",
                "",
                f"Versions: {versions}.",
                "",
                summary_table(run.sections),
                "",
                _goals_note(),
                "",
                *plot_links(run.sections, f"{results_dir}/"),
                "",
            ]
        ).rstrip()
        + "\n"
    )


def _preamble(run: Run) -> str:
    minutes, seconds = divmod(round(run.seconds), 60)
    mode = (
        "`python -m bench --quick` (a smoke test: small sizes, one run each)"
        if run.quick
        else "`python -m bench`"
    )
    runs = run.ctx.config.runs
    return (
        f"Measured by {mode} in {minutes} min {seconds} s. Each figure is the median of "
        f"{runs} run{'s' if runs > 1 else ''} (the growth comparison: "
        f"{run.ctx.config.growth_runs}); each ratio is tmemfs / reference, the median of "
        f"the per-run ratios, the two sides measured in turn in the same process."
    )


def _goals_note() -> str:
    return (
        'Goals are printed next to the figures, not asserted: "met" says whether '
        "the ratio is on the right side of its goal."
    )


def summary_table(sections: Sequence[Section]) -> str:
    lines = [
        "| # | comparison | measure | unit | tmemfs | reference | ratio | goal | met |",
        "|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for section in sections:
        if section.error:
            lines.append(
                f"| {section.number} | {section.title} | **failed**: "
                f"{_cell(section.error.splitlines()[0])} | | | | | | |"
            )
            continue
        for row in section.rows:
            lines.append(
                f"| {section.number} | {section.title} | "
                f"{row.measure} | {row.unit} | {number(row.tmemfs)} | "
                f"{number(row.reference)} | {ratio(row.ratio)} | "
                f"{row.goal.text if row.goal else ''} | {_met(row)} |"
            )
    return "\n".join(lines)


def _met(row: Row) -> str:
    if row.goal is None:
        return ""
    met = row.goal.met(row.ratio)
    return "n/a" if met is None else ("yes" if met else "**no**")


def plot_links(sections: Sequence[Section], prefix: str) -> list[str]:
    return [f"![{section.title}]({prefix}{plot})" for section in sections for plot in section.plots]


def key_values(values: dict[str, str]) -> str:
    return table(Table(["", ""], [[k, v] for k, v in values.items()]))


def corpus_table(ctx: Context) -> str:
    rows = []
    for corpus in ctx.built_corpora():
        p = corpora.profile(corpus)
        rows.append(
            [
                corpus.name,
                str(p.pages),
                f"{corpus.size / (1 << 20):.1f}",
                f"{p.lz4_ratio:.2f}",
                str(p.same_filled),
                str(p.duplicates),
                corpus.description,
            ]
        )
    return table(
        Table(
            [
                "corpus",
                "pages",
                "MiB",
                "lz4 ratio (page by page)",
                "same-filled pages",
                "duplicate pages",
                "built from",
            ],
            rows,
        )
    )


def section_text(section: Section) -> list[str]:
    parts = [f"## {section.number}. {section.title}", ""]
    if section.reference:
        parts += [f"Reference: {section.reference}.", ""]
    if section.method:
        parts += [section.method, ""]
    if section.error:
        parts += ["**This comparison failed:**", "", "```", section.error, "```", ""]
    for detail in section.details:
        parts += [table(detail), ""]
    parts += [f"- {note}" for note in section.notes]
    if section.notes:
        parts.append("")
    parts += [f"![{section.title}]({plot})" for plot in section.plots]
    return [*parts, ""]


def table(t: Table) -> str:
    lines = ["| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def terminal_summary(sections: Sequence[Section]) -> str:
    """The results as plain text for the terminal."""
    lines = []
    for section in sections:
        lines.append(f"{section.number}. {section.title} vs {section.reference}")
        if section.error:
            lines.append(f"   FAILED: {section.error.splitlines()[0]}")
        for row in section.rows:
            goal = f"  goal {row.goal.text}: {_met(row).strip('*')}" if row.goal else ""
            lines.append(
                f"   {row.measure:<58} {number(row.tmemfs):>10} vs "
                f"{number(row.reference):>10} {row.unit:<8} {ratio(row.ratio):>7}{goal}"
            )
    return "\n".join(lines)
