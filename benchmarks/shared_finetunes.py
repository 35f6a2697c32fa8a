"""What does sharing fine-tunes save, and how close is the scheduler to the best the stage
times allow? (run on demand, not in tests)

    python benchmarks/shared_finetunes.py [--workers 2] [--repeats 5] [--steps 20]
        [--samples 20]

Builds the capitalization example on the tiny random model with 8 treatments that share 2
unique fine-tunes (LoRA rank 1 or 2 × four eval sample limits; no control trial), then runs
it
  (a) as one script per trial: each trial's generated .slurm commands, fine-tune then eval,
      `--workers` trials at a time (what hand-written sbatch scripts do: no sharing);
  (b) with `cruijff run --workers N` (Prefect, Dask, shared fine-tunes run once);
in one run, the order alternated, `--repeats` times. Prints both, their ratio (goal: the best
the stage times allow), and that bound: from (b)'s own stage records, the longer of the total
stage time over the workers and the longest fine-tune → eval chain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from timing import MIN_REPEATS, alternate, describe, run_site

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cruijff.slurm import shown_stage_command  # noqa: E402
from cruijff.state import read_record  # noqa: E402


def cruijff(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "cruijff", *args], env=env, check=True,
                   capture_output=True)


def one_script_per_trial(trial: Path, env: dict) -> None:
    """The trial's own generated commands, in its pipeline's order, sharing nothing."""
    for stage in ("finetune", "eval"):
        script = trial / f"{stage}.slurm"
        if not script.exists():
            continue
        subprocess.run(shown_stage_command(script.read_text()), cwd=trial, env=env,
                       check=True, capture_output=True)
        if stage == "finetune":
            (trial / "checkpoints" / "final").symlink_to("epoch_0")


def best_allowed(experiment: Path, workers: int) -> float:
    """A lower bound on any schedule of this run's own stages (reused ones cost nothing):
    the larger of their total over the workers and the longest fine-tune → eval chain."""
    total = 0.0
    chains = []
    for trial in sorted(experiment.glob("trial-*")):
        chain = 0.0
        for stage in ("finetune", "eval"):
            record = read_record(trial, stage)
            if record is None or record.duration_s is None:
                continue
            chain += record.duration_s
            if record.reused_from is None:
                total += record.duration_s
        chains.append(chain)
    return max(total / workers, max(chains, default=0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps")
    parser.add_argument("--samples", type=int, default=20, help="eval samples (smallest)")
    args = parser.parse_args()

    with run_site(args.workers, "run_control_trials: false\n") as (site, env):
        grid = json.dumps({"torchtune.model.lora_rank": [1, 2],
                           "eval.limit": [args.samples + i for i in range(4)]})
        common = ["--config-path", str(site / "config.yaml"), "--task", "capitalization",
                  "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                  "--control", "torchtune.epochs=1", "--control",
                  f"torchtune.max_steps_per_epoch={args.steps}", "--control",
                  f"eval.limit={args.samples}", "--treatments", grid, "--root", str(site)]
        built: dict[str, list[Path]] = {"one script per trial": [], "cruijff run": []}
        for repeat in range(args.repeats):  # built before any timing
            for number, names in enumerate(built.values()):
                cruijff("build", *common, "--name", f"side{number}-{repeat}", env=env)
                names.append(site / f"side{number}-{repeat}")
        ran: list[Path] = []

        def scripts() -> None:
            trials = sorted(built["one script per trial"].pop(0).glob("trial-*"))
            with ThreadPoolExecutor(args.workers) as pool:
                list(pool.map(lambda t: one_script_per_trial(t, env), trials))

        def orchestrated() -> None:
            experiment = built["cruijff run"].pop(0)
            cruijff("run", "-q", "--workers", str(args.workers), str(experiment), env=env)
            ran.append(experiment)

        times = alternate({"one script per trial": scripts, "cruijff run": orchestrated},
                          args.repeats)
        bounds = [best_allowed(experiment, args.workers) for experiment in ran]
        trials = len(list(ran[0].glob("trial-*")))

    ratios = [c / s for c, s in zip(times["cruijff run"], times["one script per trial"],
                                    strict=True)]
    to_best = [c / b for c, b in zip(times["cruijff run"], bounds, strict=True)]
    best_ratios = [b / s for b, s in zip(bounds, times["one script per trial"], strict=True)]
    print(f"{trials} trials sharing 2 fine-tunes ({args.steps} steps; evals of "
          f"{args.samples}-{args.samples + 3} samples), workers {args.workers}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for side, seconds in times.items():
        print(f"{side + ':':<24}{describe(seconds)}")
    print(f"{'best the stages allow:':<24}median {statistics.median(bounds):.1f} s (from "
          "cruijff's own stage records)")
    print(f"cruijff / one script per trial: median {statistics.median(ratios):.2f} (range "
          f"{min(ratios):.2f}-{max(ratios):.2f}); the best the stage times allow: "
          f"{statistics.median(best_ratios):.2f}")
    print(f"cruijff / best allowed:         median {statistics.median(to_best):.2f} (range "
          f"{min(to_best):.2f}-{max(to_best):.2f}); 1.00 is a perfect schedule")


if __name__ == "__main__":
    main()
