"""Whether the compiled modules were built from the sources beside them.

setup.py compiles each `.pyx` with the digest of its text (TMEMFS_SOURCE_DIGEST), and
the module exposes it as SOURCE_DIGEST. In a source tree (an editable install), a
`.pyx` edited or pulled without a rebuild would otherwise run the old code silently:
the bench once reported a whole run from a page store one commit old.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

COMPILED = ("_pagestore", "_pagetable")


def source_digest(path: Path) -> str:
    """The digest setup.py compiles in (it has its own copy of this line)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stale_modules() -> list[str]:
    """Compiled modules whose `.pyx` beside them is not the one they were built from.

    Modules that are missing, or built without a digest, and installs that carry no
    `.pyx`, are not judged here."""
    here = Path(__file__).parent
    stale = []
    for name in COMPILED:
        source = here / f"{name}.pyx"
        try:
            built = importlib.import_module(f"tmemfs.{name}").SOURCE_DIGEST
        except (ImportError, AttributeError):
            continue
        if built and source.exists() and source_digest(source) != built:
            stale.append(name)
    return stale


def stale_message(stale: list[str]) -> str:
    names = ", ".join(f"tmemfs/{name}.pyx" for name in stale)
    return (
        f"tmemfs's compiled modules are older than {names}: rebuild them with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`)"
    )


__all__ = ["COMPILED", "source_digest", "stale_message", "stale_modules"]
