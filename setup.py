"""Builds the compiled page store (tmemfs/_pagestore.pyx) and page index
(tmemfs/_pagetable.pyx); everything else is in pyproject.toml.

It links the system liblz4 and libzstd (Debian: liblz4-dev, libzstd-dev) and uses
OpenMP so that a large batch of pages is compressed on every core.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "tmemfs._pagestore",
                ["tmemfs/_pagestore.pyx"],
                libraries=["lz4", "zstd"],
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
            ),
            Extension("tmemfs._pagetable", ["tmemfs/_pagetable.pyx"],
                      extra_compile_args=["-O3"]),
        ],
        compiler_directives={"language_level": "3"},
    )
)
