"""What does orchestration cost, on Slurm and off it? (run on demand, with the dev Slurm up:
bash scripts/slurm/start.sh)

    python benchmarks/slurm_overhead.py [--trials 2] [--repeats 5]

Evaluates the base model in N+1 trials (no fine-tune; the control on the whole test split,
the others on 20, 21, ... samples), 2 at a time, four ways, like with like:
  on Slurm:  the generated eval.slurm scripts submitted with plain `sbatch`, against
             `cruijff run --executor slurm` (a SLURMCluster of 2 worker jobs);
  off Slurm: the stage commands those scripts show, run here 2 at a time, against
             `cruijff run --executor local` (a local Dask cluster of 2 workers).
The four sides alternate in order from one repeat to the next (`--repeats` ≥ 5); it prints
each side's wall time and the time from the command to the first stage's start (median and
range), and each cruijff side's ratio to its raw side.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from timing import MIN_REPEATS, alternate, describe, run_site

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cruijff.slurm import shown_stage_command  # noqa: E402
from cruijff.state import read_record  # noqa: E402

PAIRS = {"on Slurm": ("raw sbatch", "cruijff slurm"),
         "off Slurm": ("raw commands", "cruijff local")}


def first_record(experiment: Path) -> float:
    """When the first stage of a cruijff run started: its record's `started` (to the ms)."""
    starts = [read_record(trial, "eval") for trial in experiment.glob("trial-*")]
    return min(datetime.fromisoformat(r.started).timestamp() for r in starts if r is not None)


def sbatch_all(experiment: Path) -> float:
    """Submit every trial's eval.slurm as it is, wait until Slurm has finished them; when the
    first job's log appeared (its stage starting)."""
    jobs = [subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", str(script)],
                           capture_output=True, text=True, check=True).stdout.strip()
            .split(";")[0] for script in sorted(experiment.glob("trial-*/eval.slurm"))]
    first = float("nan")
    while subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True,
                         text=True).stdout.strip():
        if math.isnan(first) and any(experiment.glob("trial-*/logs/eval-*.out")):
            first = time.time()
        time.sleep(0.05)
    return first


def commands_here(experiment: Path, env: dict) -> float:
    """The stage commands the eval.slurm scripts show, 2 at a time on this machine; when the
    first started."""
    started: list[float] = []

    def one(trial: Path) -> None:
        command = shown_stage_command((trial / "eval.slurm").read_text())
        started.append(time.time())
        subprocess.run(command, cwd=trial, env=env, check=True, capture_output=True)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, sorted(experiment.glob("trial-*"))))
    return min(started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    args = parser.parse_args()
    config = "resources: {default: {time: '00:10:00', mem: 2}}\n"
    with run_site(2, config, under=Path.home()) as (site, env):
        env["OMP_NUM_THREADS"] = "1"
        limits = ",".join(str(n) for n in range(20, 20 + args.trials))
        sides = [side for pair in PAIRS.values() for side in pair]
        built: dict[str, list[Path]] = {side: [] for side in sides}
        for repeat in range(args.repeats):  # built before any timing
            for number, side in enumerate(sides):
                name = f"side{number}-{repeat}"
                subprocess.run([sys.executable, "-m", "cruijff", "build", "--config-path",
                                str(site / "config.yaml"), "--root", str(site), "--name", name,
                                "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                                "--model", "cruijff/tiny-llama-random", "--control",
                                "use_fine_tune=false", "--treatments",
                                f'{{"eval.limit": [{limits}]}}'], env=env, check=True,
                               capture_output=True)
                built[side].append(site / name)
        to_first: dict[str, list[float]] = {side: [] for side in sides}

        def timed(side: str, run: Callable[[Path], float]) -> Callable[[], None]:
            """`run` returns when its first stage started."""
            def go() -> None:
                experiment = built[side].pop(0)
                start = time.time()
                to_first[side].append(run(experiment) - start)
            return go

        def cruijff_run(executor: str) -> Callable[[Path], float]:
            def go(experiment: Path) -> float:
                subprocess.run([sys.executable, "-m", "cruijff", "run", "-q", "--local",
                                "--executor", executor, str(experiment)], env=env, check=True,
                               capture_output=True)
                return first_record(experiment)
            return go

        times = alternate({
            "raw sbatch": timed("raw sbatch", sbatch_all),
            "cruijff slurm": timed("cruijff slurm", cruijff_run("slurm")),
            "raw commands": timed("raw commands", lambda e: commands_here(e, env)),
            "cruijff local": timed("cruijff local", cruijff_run("local")),
        }, args.repeats)

    print(f"{args.trials + 1} eval stages of the tiny model (the control's whole test split, "
          f"then 20-{19 + args.trials} samples), 2 at a time, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for where, (raw, orchestrated) in PAIRS.items():
        ratios = [c / r for c, r in zip(times[orchestrated], times[raw], strict=True)]
        print(f"{where}:")
        for side in (raw, orchestrated):
            print(f"  {side + ':':<15}wall {describe(times[side])}; to first stage median "
                  f"{statistics.median(to_first[side]):.2f} s")
        print(f"  {orchestrated} / {raw}, pairwise: median {statistics.median(ratios):.2f}× "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
