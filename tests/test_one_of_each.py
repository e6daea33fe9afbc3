"""One of each: the helpers that were written more than once stay written once.

These read the source tree (no mount). Each names the one place a thing lives, so a
second copy fails here with where it is:
- the stats format (stats, .stats, .daemon) is parsed by tmemfs.engine.stats only;
- make_engine and make_backend (tests/engine_testlib.py), parse_size (tmemfs.sizes),
  direct_write and direct_read (bench/directio.py) are defined once;
- O_DIRECT is opened by bench/directio.py only, within the bench;
- `fusermount3 -u` (not lazy) is run at one place in tmemfs/mount.py;
- every engine error class is raised somewhere (one that never is, is dead).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TREES = ("tmemfs", "bench", "tests", "examples")
# Run by the system python3 inside a memory cgroup, where tmemfs may not be
# importable: standard library only, its own size parser included (see its docstring).
STDLIB_ONLY = {"examples/swap_workload.py"}


def sources() -> Iterator[tuple[str, str]]:
    for tree in TREES:
        for path in sorted((REPO / tree).rglob("*.py")):
            yield str(path.relative_to(REPO)), path.read_text()


def functions(text: str) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every function of a module and its source text."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node, ast.get_source_segment(text, node) or ""


def test_stats_files_are_parsed_by_tmemfs_engine_stats_only() -> None:
    """A function that reads a stats, .stats or .daemon file and splits its lines itself
    is a second parser of the format; tests that check the format itself are not."""
    parsers = []
    for name, text in sources():
        if name == "tmemfs/engine/stats.py":
            continue
        for node, body in functions(text):
            if node.name.startswith("test_"):
                continue
            if ".splitlines()" in body and re.search(r"""["'](\.?stats|\.daemon)["']""", body):
                parsers.append(f"{name}:{node.lineno} {node.name}")
    assert not parsers, "use tmemfs.engine.stats.parse/counters instead of:\n" + "\n".join(parsers)


def test_shared_helpers_are_defined_once() -> None:
    homes = {
        "make_engine": "tests/engine_testlib.py",
        "make_backend": "tests/engine_testlib.py",
        "parse_size": "tmemfs/sizes.py",
        "direct_write": "bench/directio.py",
        "direct_read": "bench/directio.py",
    }
    defined: dict[str, list[str]] = defaultdict(list)
    for name, text in sources():
        if name in STDLIB_ONLY:
            continue
        for node, _ in functions(text):
            if node.name in homes:
                defined[node.name].append(f"{name}:{node.lineno}")
    for helper, home in homes.items():
        places = defined[helper]
        assert len(places) == 1 and places[0].startswith(home + ":"), (
            f"{helper} belongs in {home} alone; defined at {places}"
        )


def test_the_bench_opens_o_direct_in_one_module() -> None:
    others = [
        name
        for name, text in sources()
        if name.startswith("bench/") and name != "bench/directio.py" and "os.O_DIRECT" in text
    ]
    assert not others, f"O_DIRECT loops belong in bench/directio.py, not {others}"


def test_one_plain_unmount_in_mount_py() -> None:
    text = (REPO / "tmemfs" / "mount.py").read_text()
    runs = re.findall(r'\["fusermount3", "-u", str\(', text)
    assert len(runs) == 1, f"`fusermount3 -u` is run {len(runs)} times in tmemfs/mount.py"
    assert text.count('"busy"') == 1, "the busy answer of fusermount3 is read more than once"


def test_every_engine_error_is_raised() -> None:
    errors = ast.parse((REPO / "tmemfs" / "engine" / "errors.py").read_text())
    classes = {node.name for node in errors.body if isinstance(node, ast.ClassDef)}
    raised: set[str] = set()
    for name, text in sources():
        if not name.startswith("tmemfs/"):
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Raise) and node.exc is not None:
                target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(target, ast.Name):
                    raised.add(target.id)
    never = sorted(classes - raised - {"TmemError"})
    assert not never, f"engine errors that nothing raises: {never}"
