"""Repeated timings for the benchmarks: every side of a comparison in one run, their order
alternated from one repeat to the next, reported as median and range."""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIN_REPEATS = 5


def alternate(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each side, `repeats` times; odd repeats run the sides in reverse order,
    so neither always runs first (warm caches, a neighbour's load)."""
    if repeats < MIN_REPEATS:
        raise SystemExit(f"--repeats must be at least {MIN_REPEATS}, got {repeats}")
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            started = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - started)
            print(f"  repeat {repeat + 1}/{repeats}, {name}: {times[name][-1]:.2f} s",
                  file=sys.stderr, flush=True)  # a long benchmark shows it is alive
    return times


def describe(seconds: list[float]) -> str:
    """'median 0.123 s (range 0.101-0.150 s, 5 repeats)'."""
    return (f"median {statistics.median(seconds):.3f} s (range {min(seconds):.3f}-"
            f"{max(seconds):.3f} s, {len(seconds)} repeats)")


def verdict(seconds: list[float], goal_s: float) -> str:
    """Whether the median meets a goal of `goal_s` seconds."""
    median = statistics.median(seconds)
    return f"goal < {goal_s:g} s: {'met' if median < goal_s else 'MISSED'}"


def growth(seconds: dict[int, list[float]]) -> str:
    """'×8.1 from 10 to 100, ×9.7 from 100 to 1000' of the medians."""
    sizes = sorted(seconds)
    medians = {n: statistics.median(seconds[n]) for n in sizes}
    return ", ".join(f"×{medians[b] / medians[a]:.1f} from {a} to {b}"
                     for a, b in itertools.pairwise(sizes)) or "one size"


@contextmanager
def prefect_server(home: Path) -> Iterator[Any]:
    """cruijff's managed Prefect server in `home`, stopped on the way out (a benchmark that
    leaves it running leaves ~270 MB serving a deleted temp folder), also on Ctrl-C and on
    SIGTERM (a `timeout` or a job's end), which then unwinds like Ctrl-C."""
    from cruijff.flows.server import ensure_api, stop_server

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield ensure_api(home)
    finally:
        stop_server(home)
        signal.signal(signal.SIGTERM, before)


@contextmanager
def run_site(workers: int, config: str = "", under: Path | None = None
             ) -> Iterator[tuple[Path, dict[str, str]]]:
    """A temporary site (in `under`, else the temp folder) for timing `cruijff run`: its
    Prefect server, a config.yaml for the example task with `workers` (and as many Slurm
    worker jobs), plus `config`; and the environment both sides run in: each stage's torch
    gets its share of the cores, nothing reaches the Hugging Face hub."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(dir=under) as tmp, \
            prefect_server(Path(tmp) / "home") as info:
        site = Path(tmp)
        threads = max(1, (os.cpu_count() or 1) // workers)
        env = dict(os.environ, CRUIJFF_HOME=str(site / "home"), PREFECT_API_URL=info.url,
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
                   HF_DATASETS_CACHE=str(site / "hf"))
        (site / "config.yaml").write_text(
            f"tasks_dir: {repo / 'examples' / 'capitalization' / 'tasks'}\n"
            f"orchestration: {{workers: {workers}, max_jobs: {workers}, retries: 0}}\n{config}")
        yield site, env
