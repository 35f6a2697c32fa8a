"""How long do `cruijff summary --json` and `cruijff analyze` take on 1,000 trials?
(run on demand, not in tests)

    python benchmarks/summary_scale.py [--trials 1000] [--samples 50]

Builds a real 1,000-trial experiment (`cruijff build`, tiny random model, one fine-tune and
one eval per trial), then writes what a finished run leaves — stage records carrying the
stages' real keys, an Inspect log per trial with `--samples` scores — and times both
commands as a user runs them (new processes).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def timed(args: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cruijff", *args], env=env,
                          capture_output=True, text=True)
    return time.perf_counter() - start, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    from results_support import write_eval_log_file

    from cruijff.runner import load_experiment, stage_key
    from cruijff.state import StageRecord, write_record
    from cruijff.tiny_model import materialize

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        env = dict(os.environ, CRUIJFF_HOME=str(site / "home"), HF_HUB_OFFLINE="1",
                   PREFECT_API_URL="http://127.0.0.1:9/api")  # no server: disk (+ Slurm)
        materialize("cruijff/tiny-llama-random", site / "models" / "cruijff__tiny-llama-random")
        (site / "config.yaml").write_text(
            f"tasks_dir: {REPO / 'examples' / 'capitalization' / 'tasks'}\n"
            "run_control_trials: false\n")
        ranks = json.dumps({"finetune.model.lora_rank": list(range(1, args.trials + 1))})
        subprocess.run([sys.executable, "-m", "cruijff", "build", "--config-path",
                        str(site / "config.yaml"), "--root", str(site), "--name", "big",
                        "--task", "capitalization", "--dataset", "words_5L_80_1000.json",
                        "--model", "cruijff/tiny-llama-random", "--treatments", ranks],
                       env=env, check=True, capture_output=True)
        rng = random.Random(0)
        setup = time.perf_counter()
        for trial in load_experiment(site / "big").trials:
            write_record(trial.dir, StageRecord("finetune", stage_key(trial, "finetune"),
                                                "done", duration_s=20.0, where="slurm:1"))
            log = "logs/eval/run.eval"
            scores = [rng.random() < 0.7 for _ in range(args.samples)]
            write_eval_log_file(trial.dir / log, [int(s) for s in scores])
            write_record(trial.dir, StageRecord("eval", stage_key(trial, "eval"), "done",
                                                duration_s=5.0, outputs=[log]))
        setup = time.perf_counter() - setup

        summary_s, summary = timed(["summary", "--json", str(site / "big")], env)
        report = json.loads(summary.stdout)
        assert report["complete"], "every stage should read as done"
        analyze_s, analyzed = timed(["analyze", "--json", str(site / "big")], env)
        assert analyzed.returncode == 0, analyzed.stderr

    print(f"trials: {args.trials} (2 stages each, {args.samples} samples per eval; "
          f"setup {setup:.0f} s, not timed)")
    print(f"cruijff summary --json: {summary_s:6.2f} s   (target < 2 s)")
    print(f"cruijff analyze:        {analyze_s:6.2f} s   (target < 10 s)")


if __name__ == "__main__":
    main()
