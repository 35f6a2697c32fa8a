"""How do `cruijff build`, `summary --json` and `analyze` grow with the trials? (run on demand,
not in tests)

    python benchmarks/cli_scale.py [--sizes 10,100,1000] [--repeats 5] [--samples 50]

For each size, builds an experiment of N trials (tiny random model, fine-tune + eval), then
writes what a finished run leaves (stage records with the stages' real keys, an Inspect log of
`--samples` scores per trial), and times the commands as a user runs them: new processes, with
cruijff's Prefect server up (as after a run; `--no-server`: without it), the three commands
alternating in order from one repeat to the next. `build` writes a new experiment each time;
`analyze` is timed on a filled store (its first, fresh load is printed apart). Prints median
and range, the growth from size to size, and at 1,000 trials each figure against its goal
(issue 17). The server is stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

from timing import MIN_REPEATS, alternate, describe, growth, prefect_server, verdict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
GOALS_AT_1000 = {"build": 2.0, "summary --json": 1.0, "analyze": 5.0}
"""Seconds, for 1,000 trials (analyze: × 50 samples)."""


def command(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cruijff", *args], env=env,
                          capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--no-server", action="store_true")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]

    from results_support import write_eval_log_file

    from cruijff.runner import load_experiment, stage_key
    from cruijff.state import StageRecord, write_record
    from cruijff.tasks import load_task
    from cruijff.tiny_model import materialize

    results: dict[str, dict[int, list[float]]] = {name: {} for name in GOALS_AT_1000}
    fresh: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        home = site / "home"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(CRUIJFF_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        materialize("cruijff/tiny-llama-random", site / "models" / "cruijff__tiny-llama-random")
        tasks = REPO / "examples" / "capitalization" / "tasks"
        (site / "config.yaml").write_text(f"tasks_dir: {tasks}\nrun_control_trials: false\n")
        load_task(tasks, "capitalization").build_dataset("words_5L_80_1000.json", site / "data")
        server = nullcontext() if args.no_server else prefect_server(home)
        with server:
            for n in sizes:
                ranks = json.dumps({"finetune.model.lora_rank": list(range(1, n + 1))})
                build_args = ["build", "--config-path", str(site / "config.yaml"), "--root",
                              str(site), "--task", "capitalization", "--dataset",
                              "words_5L_80_1000.json", "--model", "cruijff/tiny-llama-random",
                              "--treatments", ranks]
                done = command([*build_args, "--name", f"exp-{n}"], env)
                assert done.returncode == 0, done.stderr
                experiment = site / f"exp-{n}"
                rng = random.Random(n)
                for trial in load_experiment(experiment).trials:  # what a run leaves
                    write_record(trial.dir, StageRecord(
                        "finetune", stage_key(trial, "finetune"), "done", duration_s=20.0,
                        where="local:host:1"))
                    log = "logs/eval/run.eval"
                    write_eval_log_file(trial.dir / log,
                                        [int(rng.random() < 0.7) for _ in range(args.samples)])
                    write_record(trial.dir, StageRecord("eval", stage_key(trial, "eval"), "done",
                                                        duration_s=5.0, outputs=[log]))
                started = time.perf_counter()
                first = command(["analyze", "--json", str(experiment)], env)
                fresh[n] = time.perf_counter() - started
                assert first.returncode == 0, first.stderr
                builds = iter(range(args.repeats))

                def build(n: int = n, args_: list[str] = build_args,
                          numbers: Iterator[int] = builds) -> None:
                    made = command([*args_, "--name", f"build-{n}-{next(numbers)}"], env)
                    assert made.returncode == 0, made.stderr

                def summary(experiment: Path = experiment) -> None:
                    shown = command(["summary", "--json", str(experiment)], env)
                    assert json.loads(shown.stdout)["complete"], shown.stderr

                def analyze(experiment: Path = experiment) -> None:
                    assert command(["analyze", "--json", str(experiment)], env).returncode == 0

                times = alternate({"build": build, "summary --json": summary,
                                   "analyze": analyze}, args.repeats)
                for name, seconds in times.items():
                    results[name][n] = seconds

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; Prefect server "
          f"{'down' if args.no_server else 'up'}; {args.samples} samples per trial")
    for name, by_size in results.items():
        for n, seconds in by_size.items():
            goal = f"; {verdict(seconds, GOALS_AT_1000[name])}" if n == 1000 else ""
            print(f"{name:15} {n:5} trials: {describe(seconds)}{goal}")
        print(f"{name:15} growth: {growth(by_size)}")
    for n, seconds in fresh.items():
        print(f"analyze (fresh store) {n:5} trials: {seconds:.3f} s (once)")


if __name__ == "__main__":
    main()
