"""The compiled modules are the ones their sources describe (tmemfs/build.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tmemfs
from tmemfs import _pagestore, _pagetable
from tmemfs.build import source_digest, stale_message, stale_modules

PACKAGE = Path(tmemfs.__file__).parent


def test_the_compiled_modules_are_built_from_the_sources_beside_them() -> None:
    for module in (_pagestore, _pagetable):
        source = PACKAGE / f"{Path(module.__file__).name.split('.')[0]}.pyx"
        assert source_digest(source) == module.SOURCE_DIGEST, stale_message([source.stem])
    assert stale_modules() == []


def test_a_stale_module_stops_mount_with_one_line(tmp_path: Path) -> None:
    """Pretend _pagetable.pyx changed since the build: `tmemfs mount` refuses, in one
    line, before it forks or touches the mount point."""
    script = (
        "import sys, tmemfs._pagetable as t; t.SOURCE_DIGEST = '0' * 16\n"
        "from tmemfs.cli import main\n"
        f"sys.exit(main(['mount', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tmemfs: ") and "older than tmemfs/_pagetable.pyx" in line
    assert "pip install -e ." in line
    assert not any(tmp_path.iterdir())
