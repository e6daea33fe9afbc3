"""Builds the compiled page store (tmemfs/_pagestore.pyx) and page index
(tmemfs/_pagetable.pyx); everything else is in pyproject.toml.

It links the system liblz4 and libzstd (Debian: liblz4-dev, libzstd-dev) and uses
OpenMP so that a large batch of pages is compressed on every core.
"""

import hashlib
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup


def digest(source: str) -> list[tuple[str, str]]:
    """The module's SOURCE_DIGEST: the .pyx it is built from (tmemfs/build.py checks it)."""
    value = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    return [("TMEMFS_SOURCE_DIGEST", f'"{value}"')]


setup(
    ext_modules=cythonize(
        [
            Extension(
                "tmemfs._pagestore",
                ["tmemfs/_pagestore.pyx"],
                libraries=["lz4", "zstd"],
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
                define_macros=digest("tmemfs/_pagestore.pyx"),
            ),
            Extension(
                "tmemfs._pagetable",
                ["tmemfs/_pagetable.pyx"],
                extra_compile_args=["-O3"],
                define_macros=digest("tmemfs/_pagetable.pyx"),
            ),
        ],
        compiler_directives={"language_level": "3"},
    )
)
