"""What does cruijff's orchestration cost? (run on demand, not in tests)

    python benchmarks/overhead.py [--trials 4] [--workers 2]

Builds one tiny experiment twice and runs it
  (a) as the raw stage commands taken from the generated .slurm scripts: serially, and with
      the same parallelism cruijff uses (one trial pipeline per worker, same OMP threads);
  (b) with `cruijff run` (Prefect flow, subflow per trial, tasks on a Dask LocalCluster),
and prints the wall times and the ratio of (b) to (a) at the same parallelism. The Prefect
server is started before timing (it is started once and reused, not per run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cruijff(*args: str, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "cruijff", *args], env=env, check=True,
                   capture_output=True)


def script_command(script: Path) -> list[str]:
    """The command a generated batch script runs (its `exec` line)."""
    line = next(ln for ln in script.read_text().splitlines() if ln.startswith("exec "))
    return shlex.split(line)[1:]


def raw_pipeline(trial: Path, env: dict) -> None:
    """What a hand-written sbatch chain would do: fine-tune, point at the result, evaluate."""
    for stage in ("finetune", "eval"):
        subprocess.run(script_command(trial / f"{stage}.slurm"), cwd=trial, env=env, check=True,
                       capture_output=True)
        if stage == "finetune":
            (trial / "checkpoints" / "final").symlink_to("epoch_0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from cruijff.flows.server import ensure_api

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        home = site / "home"
        info = ensure_api(home)
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        env = dict(os.environ, CRUIJFF_HOME=str(home), PREFECT_API_URL=info.url,
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads),
                   HF_DATASETS_CACHE=str(site / "hf"))
        (site / "config.yaml").write_text(
            f"tasks_dir: {REPO / 'examples' / 'capitalization' / 'tasks'}\n"
            f"orchestration: {{workers: {args.workers}, retries: 0}}\n")
        ranks = json.dumps({"torchtune.model.lora_rank": list(range(1, args.trials + 1))})
        common = ["--config-path", str(site / "config.yaml"), "--task", "capitalization",
                  "--dataset", "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                  "--control", "torchtune.epochs=1", "--control",
                  "torchtune.max_steps_per_epoch=20", "--control", "eval.limit=40",
                  "--treatments", ranks, "--root", str(site)]
        for name in ("raw-serial", "raw-parallel", "cruijff"):
            cruijff("build", *common, "--name", name, env=env)

        def trials(name: str) -> list[Path]:
            return sorted((site / name).glob("trial-*"))

        start = time.perf_counter()
        for trial in trials("raw-serial"):
            raw_pipeline(trial, dict(env, OMP_NUM_THREADS=str(os.cpu_count() or 1)))
        serial = time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda t: raw_pipeline(t, env), trials("raw-parallel")))
        parallel = time.perf_counter() - start

        start = time.perf_counter()
        cruijff("run", "-q", "--workers", str(args.workers), str(site / "cruijff"), env=env)
        orchestrated = time.perf_counter() - start

    print(f"trials: {args.trials + 1} (fine-tune 20 steps + eval 40 samples each), "
          f"workers: {args.workers}")
    print(f"raw commands, serial:              {serial:7.1f} s")
    print(f"raw commands, {args.workers} at a time:          {parallel:7.1f} s")
    print(f"cruijff run (Prefect + Dask):      {orchestrated:7.1f} s")
    print(f"ratio cruijff / raw at same parallelism: {orchestrated / parallel:.3f} "
          "(target <= 1.15)")


if __name__ == "__main__":
    main()
