"""What does cruijff's orchestration cost? (run on demand, not in tests)

    python benchmarks/overhead.py [--trials 4] [--workers 2] [--repeats 5]

Builds one tiny experiment per side and repeat, and runs it
  (a) as the raw stage commands taken from the generated .slurm scripts, with the same
      parallelism cruijff uses (one trial pipeline per worker, same OMP threads);
  (b) with `cruijff run` (Prefect flow, subflow per trial, tasks on a Dask LocalCluster),
the two alternating in order from one repeat to the next, and prints median and range of
each, the ratio of (b) to (a), and the import of the run's Prefect/Dask side, each against
its goal (issue 17), and where cruijff's extra time goes: from each run's stage records (to the
millisecond), launch → first stage, the idle gap between a stage's end and the next stage's
start (hand-off), and last stage → exit (tail). The Prefect server is started before timing,
in the benchmark's own home, and stopped at the end (also on Ctrl-C, SIGTERM or an error).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

from timing import MIN_REPEATS, alternate, describe, run_site

RATIO_GOAL = 1.05
IMPORT_GOAL_S = 1.0
"""Launch to first stage ≤ 1 s: importing the flow's side alone must fit in it."""
FIRST_STAGE_GOAL_S = 1.0
HAND_OFF_GOAL_S = 0.2
TAIL_GOAL_S = 0.5


def cruijff(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "cruijff", *args], env=env, check=True,
                   capture_output=True)


def script_command(script: Path) -> list[str]:
    """The stage's own command, as its generated batch script shows it (the script runs it
    through `cruijff stage`, which records it: not raw)."""
    from cruijff.slurm import shown_stage_command

    return shown_stage_command(script.read_text())


def raw_pipeline(trial: Path, env: dict) -> None:
    """What a hand-written sbatch chain would do: fine-tune, point at the result, evaluate."""
    for stage in ("finetune", "eval"):
        subprocess.run(script_command(trial / f"{stage}.slurm"), cwd=trial, env=env, check=True,
                       capture_output=True)
        final = trial / "checkpoints" / "final"
        if stage == "finetune" and not final.exists():
            final.symlink_to("epoch_0")


def phases(experiment: Path, launched: float, exited: float, workers: int
           ) -> tuple[float, list[float], float]:
    """(launch → first stage, every hand-off gap, last stage → exit) of one run, in seconds,
    from its stage records. A hand-off gap: a stage's start minus the latest stage end before
    it, for every start after the first `workers` (each of those waited for a free worker)."""
    from cruijff.state import read_record

    spans = []
    for trial in experiment.glob("trial-*"):
        for stage in ("finetune", "eval"):
            record = read_record(trial, stage)
            if record is not None and record.finished and record.status == "done":
                spans.append((datetime.fromisoformat(record.started).timestamp(),
                              datetime.fromisoformat(record.finished).timestamp()))
    starts = sorted(start for start, _ in spans)
    ends = sorted(end for _, end in spans)
    gaps = [start - max(end for end in ends if end <= start) for start in starts[workers:]
            if any(end <= start for end in ends)]
    return starts[0] - launched, gaps, exited - ends[-1]


def import_seconds(module: str, env: dict, repeats: int) -> list[float]:
    """Wall seconds of importing `module` in a new interpreter (its start-up not counted)."""
    def once(code: str) -> float:
        out = subprocess.run([sys.executable, "-c", "import time; t = time.perf_counter(); "
                              f"{code}; print(time.perf_counter() - t)"], env=env, check=True,
                             capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])

    return [once(f"import {module}") for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps per trial")
    parser.add_argument("--samples", type=int, default=40, help="eval samples per trial")
    args = parser.parse_args()

    with run_site(args.workers) as (site, env):
        ranks = json.dumps({"torchtune.model.lora_rank": list(range(1, args.trials + 1))})
        common = ["--config-path", str(site / "config.yaml"), "--task", "capitalization",
                  "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                  "--control", "torchtune.epochs=1", "--control",
                  f"torchtune.max_steps_per_epoch={args.steps}", "--control",
                  f"eval.limit={args.samples}", "--treatments", ranks, "--root", str(site)]
        built = {side: [] for side in ("raw", "cruijff")}
        for repeat in range(args.repeats):  # built before any timing
            for side, names in built.items():
                cruijff("build", *common, "--name", f"{side}-{repeat}", env=env)
                names.append(site / f"{side}-{repeat}")

        def raw() -> None:
            trials = sorted(built["raw"].pop(0).glob("trial-*"))
            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(lambda t: raw_pipeline(t, env), trials))

        breakdown: list[tuple[float, list[float], float]] = []

        def orchestrated() -> None:
            experiment = built["cruijff"].pop(0)
            launched = time.time()
            cruijff("run", "-q", "--workers", str(args.workers), str(experiment), env=env)
            breakdown.append(phases(experiment, launched, time.time(), args.workers))

        times = alternate({"raw": raw, "cruijff": orchestrated}, args.repeats)
        imports = import_seconds("cruijff.flows.experiment", env, args.repeats)

    ratios = [c / r for c, r in zip(times["cruijff"], times["raw"], strict=True)]
    ratio = statistics.median(ratios)
    load = os.getloadavg()[0]
    print(f"trials: {args.trials + 1} (fine-tune {args.steps} steps + eval {args.samples} "
          f"samples each), workers: {args.workers}, {os.cpu_count()} cores, "
          f"load average {load:.1f}")
    print(f"raw commands, {args.workers} at a time: {describe(times['raw'])}")
    print(f"cruijff run (Prefect + Dask):  {describe(times['cruijff'])}")
    print(f"cruijff / raw, pairwise:       median {ratio:.2f}× (range {min(ratios):.2f}-"
          f"{max(ratios):.2f}); goal ≤ {RATIO_GOAL}×: "
          f"{'met' if ratio <= RATIO_GOAL else 'MISSED'}")
    first, gaps, tails = zip(*breakdown, strict=True)
    hand_offs = [gap for run in gaps for gap in run]
    for name, seconds, goal in (("launch → first stage", list(first), FIRST_STAGE_GOAL_S),
                                (f"hand-off ({len(hand_offs)} gaps)", hand_offs,
                                 HAND_OFF_GOAL_S),
                                ("last stage → exit", list(tails), TAIL_GOAL_S)):
        met = statistics.median(seconds) <= goal
        print(f"  {name + ':':<24}median {statistics.median(seconds):.2f} s (range "
              f"{min(seconds):.2f}-{max(seconds):.2f} s); goal ≤ {goal:g} s: "
              f"{'met' if met else 'MISSED'}")
    fits = statistics.median(imports) < IMPORT_GOAL_S
    print(f"import cruijff.flows.experiment: {describe(imports)}; part of launch → first "
          f"stage, goal ≤ {IMPORT_GOAL_S:g} s: {'fits' if fits else 'MISSED'}")


if __name__ == "__main__":
    main()
