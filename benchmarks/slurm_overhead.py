"""What does orchestration cost on Slurm? (run on demand, with the dev Slurm up:
bash scripts/slurm/start.sh)

    python benchmarks/slurm_overhead.py [--trials 4]

Runs one experiment of N base-model evaluations three ways at the same parallelism (2 at a
time): the generated eval.slurm scripts submitted with plain `sbatch`; `cruijff run` on a
local Dask cluster; `cruijff run` on Slurm (a SLURMCluster of worker jobs). For each it prints
the time from the command to the first stage executing, the wall time, the mean stage time,
and the orchestration overhead per stage, with ratios to raw sbatch.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cruijff(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cruijff", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def first_start(pattern: str, folder: Path, start: float,
                proc_done: Callable[[], bool]) -> float:
    """Seconds from `start` until a file matching `pattern` exists under `folder`."""
    while not proc_done():
        if any(folder.glob(pattern)):
            return time.perf_counter() - start
        time.sleep(0.05)
    return float("nan")


def raw_sbatch(experiment: Path) -> tuple[float, float, list[float]]:
    start = time.perf_counter()
    jobs = []
    for script in sorted(experiment.glob("trial-*/eval.slurm")):
        out = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", str(script)],
                             capture_output=True, text=True, check=True)
        jobs.append(out.stdout.strip().split(";")[0])

    def running() -> bool:
        queue = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True,
                               text=True).stdout
        return not queue.strip()

    first = first_start("trial-*/logs/eval-*.out", experiment, start, running)
    while not running():
        time.sleep(0.2)
    wall = time.perf_counter() - start
    elapsed = subprocess.run(["sacct", "-c", "-n", "-X", "-j", ",".join(jobs), "-o",
                              "Elapsed"], capture_output=True, text=True).stdout.split()
    seconds = [sum(int(p) * 60 ** i for i, p in enumerate(reversed(e.split(":"))))
               for e in elapsed if re.match(r"^[\d:]+$", e)]
    return first, wall, seconds


def cruijff_run(experiment: Path, executor: str, env: dict) -> tuple[float, float, list[float]]:
    from cruijff.state import read_record

    start = time.perf_counter()
    proc = cruijff("run", "-q", "--local", "--executor", executor, str(experiment), env=env)
    first = first_start("trial-*/.cruijff/eval.json", experiment, start,
                        lambda: proc.poll() is not None)
    proc.wait()
    wall = time.perf_counter() - start
    durations = [read_record(t, "eval").duration_s for t in sorted(experiment.glob("trial-*"))]
    return first, wall, [d for d in durations if d is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    from timing import prefect_server

    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp, \
            prefect_server(Path(tmp) / "home") as info:
        site = Path(tmp)
        env = dict(os.environ, CRUIJFF_HOME=str(site / "home"), PREFECT_API_URL=info.url,
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                   HF_DATASETS_CACHE=str(site / "hf"))
        (site / "config.yaml").write_text(
            f"tasks_dir: {REPO / 'examples' / 'capitalization' / 'tasks'}\n"
            "orchestration: {workers: 2, max_jobs: 2, retries: 0}\n"
            "resources: {default: {time: '00:10:00', mem: 2}}\n")
        limits = ",".join(str(n) for n in range(20, 20 + args.trials))
        for name in ("raw", "local", "slurm"):
            subprocess.run([sys.executable, "-m", "cruijff", "build", "--config-path",
                            str(site / "config.yaml"), "--root", str(site), "--name", name,
                            "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                            "--model", "cruijff/tiny-llama-random", "--control",
                            "use_fine_tune=false", "--treatments",
                            f'{{"eval.limit": [{limits}]}}'], env=env, check=True,
                           capture_output=True)
        results = {"raw sbatch": raw_sbatch(site / "raw"),
                   "cruijff local": cruijff_run(site / "local", "local", env),
                   "cruijff slurm": cruijff_run(site / "slurm", "slurm", env)}

    stages = args.trials + 1
    base_wall = results["raw sbatch"][1]
    print(f"{stages} eval stages (tiny model, 20-{19 + args.trials} samples), 2 at a time")
    print(f"{'':16}{'to 1st stage':>14}{'wall':>9}{'mean stage':>12}{'overhead/stage':>16}"
          f"{'wall ratio':>12}")
    for name, (first, wall, durations) in results.items():
        mean = sum(durations) / len(durations) if durations else float("nan")
        overhead = wall * 2 / stages - mean
        print(f"{name:16}{first:13.1f}s{wall:8.1f}s{mean:11.1f}s{overhead:15.1f}s"
              f"{wall / base_wall:12.2f}")


if __name__ == "__main__":
    main()
