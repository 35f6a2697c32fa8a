"""How long does `cruijff build` take for a large experiment? (run on demand, not in tests)

    python benchmarks/build_scale.py [--trials 1000]

Builds the example capitalization task with one treatment of N values on the tiny random
model, in a temporary folder, and prints the wall time of the in-process build and of the
whole `cruijff build` command, with the cost per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from cruijff.design import Design
    from cruijff.experiment import BuildRequest, build_experiment
    from cruijff.tasks import load_task
    from cruijff.tiny_model import materialize

    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        shutil.copytree(REPO / "examples" / "capitalization" / "tasks", site / "tasks")
        materialize("cruijff/tiny-llama-random", site / "models" / "cruijff__tiny-llama-random")
        config = site / "config.yaml"
        config.write_text("run_control_trials: false\n")
        values = list(range(1, args.trials + 1))
        treatments = json.dumps({"finetune.model.lora_rank": values})
        common = ["--config-path", str(config), "--task", "capitalization",
                  "--model", "cruijff/tiny-llama-random", "--dataset", "words_5L_80_1000.json"]
        # the dataset is built once, outside the timings
        load_task(site / "tasks", "capitalization").build_dataset("words_5L_80_1000.json",
                                                                   site / "data")

        design = Design.from_options(models=["cruijff/tiny-llama-random"],
                                     datasets=["words_5L_80_1000.json"], treatments=[treatments])
        start = time.perf_counter()
        built = build_experiment(BuildRequest(config, "capitalization", design, site / "exps",
                                              "inproc"))
        inproc = time.perf_counter() - start
        assert len(built.plan.trials) == args.trials

        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cruijff", "build", *common, "--treatments",
                        treatments, "--root", str(site / "exps"), "--name", "cli"],
                       check=True, capture_output=True)
        command = time.perf_counter() - start

    n = args.trials
    print(f"trials: {n}")
    print(f"in-process build:  {inproc:6.2f} s  ({1000 * inproc / n:.2f} ms per trial)")
    print(f"cruijff build CLI: {command:6.2f} s  ({1000 * command / n:.2f} ms per trial, "
          "with interpreter start-up)")
    print(f"target: under 5 s for 1,000 trials -> {'met' if command < 5 * n / 1000 else 'missed'}")


if __name__ == "__main__":
    main()
