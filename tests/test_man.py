"""man/tmemfs.8 and man/tmemfs.5: they document every option, errno and counter,
render cleanly, and install where man finds them.

tmemfs(8) is the commands: the option list comes from tmemfs.cli.build_parser()
itself, subcommand by subcommand, so a new option without a line in the page fails
here. tmemfs(5) is the filesystem: every counter of tmemfs.engine.stats and every
errno the adapter (tmemfs/fs.py) answers must have an entry.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tmemfs.cli import build_parser
from tmemfs.engine.stats import ALL_COUNTERS

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "man" / "tmemfs.8"
FS_PAGE = REPO / "man" / "tmemfs.5"
PAGES = (PAGE, FS_PAGE)
WIDTH = 80
# What the synopsis calls each positional argument.
POSITIONALS = {"mountpoint": "MOUNT"}
# Counters a stats file shows besides stats.ALL_COUNTERS.
MORE_COUNTERS = ("lost_pages", "max_pool_size", "page_size", "pools")


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install man-db groff-base)")


def render(*man_args: str, page: Path = PAGE) -> subprocess.CompletedProcess[str]:
    """`man -l` as a user runs it, at 80 columns, into a pipe (so plain text)."""
    need("man", "groff")
    env = {k: v for k, v in os.environ.items() if k not in ("MANPAGER", "PAGER", "MANOPT")}
    env |= {"MANWIDTH": str(WIDTH), "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    return subprocess.run(
        ["man", *man_args, "-l", str(page)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def rendered_text(page: Path = PAGE) -> str:
    result = render(page=page)
    assert result.returncode == 0, result.stderr
    # Undo what a UTF-8 terminal gets instead of ASCII hyphens and quotes.
    return result.stdout.translate(str.maketrans("\u2010\u2212\u2018\u2019", "--''"))


def sections(text: str) -> dict[str, list[str]]:
    """Rendered lines by section heading (NAME, SYNOPSIS, ...)."""
    result: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if re.fullmatch(r"[A-Z][A-Z ]+", line):
            current = line
            result[current] = []
        elif current:
            result[current].append(line)
    return result


def entries(lines: list[str]) -> list[tuple[str, str]]:
    """The tagged paragraphs (.TP) of a section: (tag, the whole paragraph)."""
    found: list[tuple[str, list[str]]] = []
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent < 14:
            found.append((line, [line]))
        elif found and line.strip():
            found[-1][1].append(line)
    result = []
    for first, paragraph in found:
        # A tag shorter than the body's indent (column 14) shares its line with the
        # body ("--json Print ..."); a longer one has the line to itself. Lines of
        # plain paragraphs (and subsection headings) are neither.
        inline = len(first) > 15 and first[13] == " " and first[14] != " "
        if not first.startswith(" " * 7) or first[7] == " " or (not inline and len(paragraph) == 1):
            continue
        tag = first[:14].strip() if inline else first.strip()
        result.append((tag, " ".join(" ".join(paragraph).split())))
    return result


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("tmemfs has no subcommands")


def has_token(text: str, token: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def default_spellings(default: object) -> list[str]:
    if isinstance(default, float):
        return [f"{default:g}", str(default)]
    return [str(default)]


def synopsis_of(synopsis: str, command: str) -> str:
    """The synopsis paragraph of `tmemfs COMMAND`."""
    blocks = re.split(r"\n\s*\n", synopsis)
    for block in blocks:
        if block.split()[:2] == ["tmemfs", command]:
            return " ".join(block.split())
    raise AssertionError(f"SYNOPSIS has no 'tmemfs {command}'")


def test_every_option_of_every_command_is_documented() -> None:
    page = sections(rendered_text())
    synopsis = "\n".join(page["SYNOPSIS"])
    options = entries(page["OPTIONS"])
    parser = build_parser()
    commands = {"": parser} | subparsers(parser)
    missing = []
    for command, sub in commands.items():
        block = synopsis_of(synopsis, command) if command else ""
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.option_strings:
                name = POSITIONALS.get(action.dest)
                assert name, f"new positional {action.dest!r}: add it to the man page and here"
                if not has_token(block, name):
                    missing.append(f"tmemfs {command}: {name} in SYNOPSIS")
                continue
            paragraphs = [
                body
                for tag, body in options
                if any(has_token(tag, opt) for opt in action.option_strings)
            ]
            for opt in action.option_strings:
                if not any(has_token(tag, opt) for tag, _ in options):
                    missing.append(f"tmemfs {command}: {opt} in OPTIONS")
            if action.default not in (None, False, argparse.SUPPRESS) and paragraphs:
                spellings = default_spellings(action.default)
                if not any(has_token(body, s) for body in paragraphs for s in spellings):
                    missing.append(
                        f"tmemfs {command}: default {spellings[0]} of {action.option_strings[-1]}"
                    )
            if (
                command
                and not isinstance(action, argparse._HelpAction)
                and not any(has_token(block, opt) for opt in action.option_strings)
            ):
                missing.append(f"tmemfs {command}: {action.option_strings[-1]} in SYNOPSIS")
    assert not missing, "man/tmemfs.8 does not document:\n" + "\n".join(missing)


def test_every_counter_is_documented() -> None:
    """tmemfs(5) has an entry for each counter; tmemfs(8) sends readers there."""
    statistics = sections(rendered_text(FS_PAGE))["STATISTICS"]
    documented = {tag for tag, _ in entries(statistics)}
    for counter in (*ALL_COUNTERS, "lost_pages"):
        assert counter in documented, f"tmemfs(5) STATISTICS has no entry for {counter}"
    for name in MORE_COUNTERS:
        assert has_token(" ".join(statistics), name), f"tmemfs(5) does not mention {name}"
    assert "tmemfs(5)" in " ".join(sections(rendered_text())["STATISTICS"])


def answered_errnos() -> set[str]:
    """Every errno name the FUSE adapter can answer with."""
    source = (REPO / "tmemfs" / "fs.py").read_text()
    return set(re.findall(r"errno\.(E[A-Z]+)", source))


def test_every_errno_is_documented() -> None:
    page = sections(rendered_text(FS_PAGE))
    documented = {name.strip() for tag, _ in entries(page["ERRORS"]) for name in tag.split(",")}
    answered = answered_errnos()
    assert {"ENOENT", "EINVAL", "ENOSPC", "EIO", "EPERM"} <= answered
    missing = answered - documented
    assert not missing, f"tmemfs(5) ERRORS has no entry for {sorted(missing)}"


def test_the_filesystem_page_is_for_users() -> None:
    """tmemfs(5) stands alone: the tree, the semantics, the image, discard, errors."""
    page = sections(rendered_text(FS_PAGE))
    for heading in ("NAME", "DESCRIPTION", "ERRORS", "STATISTICS", "FILES", "EXAMPLES", "SEE ALSO"):
        assert heading in page, f"tmemfs(5) has no {heading} section"
    description = " ".join(" ".join(page["DESCRIPTION"]).split())
    for words in (
        "frontswap/",
        "cleancache/",
        ".stats",
        "N.img",
        "FALLOC_FL_PUNCH_HOLE",
        "FALLOC_FL_ZERO_RANGE",
        "EOPNOTSUPP",
        "--exclusive-gets",
        "Remounts",
        "Permissions",
    ):
        assert words in description, f"tmemfs(5) DESCRIPTION does not cover {words}"
    assert "tmemfs(8)" in " ".join(page["SEE ALSO"])
    readme = (REPO / "README.md").read_text()
    assert "SPEC.md" not in readme, "README links a contract users do not have"
    assert "man/tmemfs.5" in readme


def test_the_page_has_the_sections_operators_look_for() -> None:
    page = sections(rendered_text())
    for heading in (
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "FILES",
        "STATISTICS",
        "EXIT STATUS",
        "EXAMPLES",
        "BUGS",
        "SEE ALSO",
    ):
        assert heading in page, f"no {heading} section"
    files = " ".join(" ".join(page["FILES"]).split())
    for path in (
        "MOUNT/stats",
        "MOUNT/frontswap/N/.stats",
        "MOUNT/.daemon",
        "MOUNT/frontswap/N.img",
    ):
        assert path in files
    assert "discard" not in " ".join(page["BUGS"])  # no longer a known limit
    assert "discard" in " ".join(page["DESCRIPTION"])
    see_also = " ".join(page["SEE ALSO"])
    for ref in (
        "tmemfs(5)",
        "zramctl(8)",
        "swapon(8)",
        "losetup(8)",
        "mount.fuse3(8)",
        "redis-server(1)",
    ):
        assert ref in see_also


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_renders_without_warnings(page: Path) -> None:
    need("groff")
    groff = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert groff.returncode == 0
    assert groff.stderr == ""
    man = render("--warnings=all", page=page)
    assert man.returncode == 0
    assert man.stderr == ""
    too_wide = [line for line in man.stdout.splitlines() if len(line) > WIDTH]
    assert not too_wide, f"lines wider than {WIDTH} columns: {too_wide}"


@pytest.mark.timeout(120)
def test_an_install_puts_the_page_where_man_finds_it(tmp_path: Path) -> None:
    """pip install (not -e: editable installs leave data files out) into a fresh venv.

    man-db adds VENV/share/man to its search path for each VENV/bin on PATH, so
    `man tmemfs` works as soon as the venv's bin is on PATH.
    """
    need("man")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("tmemfs", "man"):
        shutil.copytree(
            REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    # Our pip, pointed at the new venv (--python), so the test venv is never touched.
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-input",
            "--disable-pip-version-check",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    if pip.returncode != 0 and "satisfies the requirement setuptools" in pip.stderr:
        pytest.skip("no package index to fetch the build backend (setuptools) from")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT")}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    for page in PAGES:
        section = page.suffix[1:]
        installed = venv / "share" / "man" / f"man{section}" / page.name
        assert installed.read_bytes() == page.read_bytes()
        where = subprocess.run(
            ["man", "-w", section, "tmemfs"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert where.returncode == 0, where.stderr
        assert Path(where.stdout.strip()) == installed
