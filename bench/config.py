"""How big each comparison runs: the full run (9 to 12 minutes here) and --quick."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench import corpora

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions; every figure is the median of `runs` runs."""

    runs: int
    fio_size: int  # bytes each sequential fio job moves (and the image / zram size)
    fio_seconds: float  # length of each random 4 KiB fio job
    corpus_sizes: dict[str, int]  # comparison 2: bytes of each corpus
    swap_limit: int  # comparison 3: the cgroup's memory limit
    swap_working_set: int
    swap_timeout: int  # seconds a single swap run may take
    page_files: int  # comparison 4: pages per run
    redis_size: int  # comparison 5: bytes through the image per run
    redis_requests: int  # redis-benchmark -n
    growth_points: tuple[int, ...]  # comparison 6: pages at each checkpoint
    growth_runs: int
    growth_max_pool: str = "90%"  # 10^6 pages of data is 3.8 GiB: near the default budget


FULL = Config(
    runs=3,
    fio_size=256 * MiB,
    fio_seconds=2,
    corpus_sizes={"files": 128 * MiB, "anon": 64 * MiB, "random": 32 * MiB, "zero": 32 * MiB},
    swap_limit=256 * MiB,
    swap_working_set=512 * MiB,
    swap_timeout=240,
    page_files=4000,
    redis_size=64 * MiB,
    redis_requests=100_000,
    growth_points=(10**4, 10**5, 10**6),
    growth_runs=3,
)

QUICK = Config(
    runs=1,
    fio_size=16 * MiB,
    fio_seconds=0.5,
    corpus_sizes={"files": 8 * MiB, "anon": 4 * MiB, "random": 2 * MiB, "zero": 2 * MiB},
    swap_limit=32 * MiB,
    swap_working_set=64 * MiB,
    swap_timeout=60,
    page_files=300,
    redis_size=4 * MiB,
    redis_requests=5_000,
    growth_points=(10**3, 10**4),
    growth_runs=1,
)


@dataclass
class Context:
    """What every comparison gets: sizes, a scratch directory, where plots go."""

    config: Config
    tmp: Path  # scratch: mount points, swap files, redis' directory
    out: Path  # report and plots
    stem: str  # report date: plots are STEM-NAME.png
    _corpora: dict[str, corpora.Corpus] = field(default_factory=dict)

    def plot_path(self, name: str) -> Path:
        return self.out / f"{self.stem}-{name}.png"

    def built_corpora(self) -> list[corpora.Corpus]:
        return list(self._corpora.values())

    def corpus(self, name: str) -> corpora.Corpus:
        """Each corpus is built once per bench run, at its configured size."""
        if name not in self._corpora:
            self._corpora[name] = BUILDERS[name](self.config.corpus_sizes[name])
        return self._corpora[name]


BUILDERS = {
    "files": corpora.files,
    "anon": corpora.anon,
    "random": corpora.random_pages,
    "zero": corpora.zero_pages,
}
