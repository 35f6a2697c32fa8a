"""How much disk does a LoRA fine-tune's checkpoints/ take per epoch, saving merged models
versus adapters only? (run on demand, not in tests)

    python benchmarks/adapter_checkpoints.py [--model cruijff/tiny-llama] [--epochs 2]
        [--repeats 5] [--model-dir DIR] [--threads 1]

`finetune.save_adapter_weights_only=true` makes every epoch write the adapter instead of a
whole merged model; the eval then merges base + adapter once, into a folder it removes
(cruijff/adapters.py). This builds the capitalization example with the model (a family with
a LoRA config: cruijff/tiny-llama, and the other tiny families once they exist), its control
saving merged models and one treatment saving adapters only, and runs each fine-tune
(`--epochs` epochs of 3 steps) `--repeats` times, in one run, the order alternated. Per side:
bytes of checkpoints/ per epoch and of one epoch folder, the fine-tune's wall time, and, for
adapters, the merge an eval pays. Bytes do not depend on the steps taken.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from timing import alternate, describe

REPO = Path(__file__).resolve().parent.parent
DATASET = "words_5L_80_1000.json"
SIDES = {"merged model per epoch (full)": "a", "adapter only": "b"}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def megabytes(values: list[int]) -> str:
    return (f"median {statistics.median(values) / 1e6:.3f} MB (range {min(values) / 1e6:.3f}-"
            f"{max(values) / 1e6:.3f} MB, {len(values)} repeats)")


def build(site: Path, model: str, epochs: int, env: dict[str, str]) -> Path:
    """The experiment: trial a saves merged models, trial b adapters only."""
    (site / "config.yaml").write_text(
        f"model_dir: {site / 'models'}\ntasks_dir: {REPO / 'examples' / 'capitalization' / 'tasks'}"
        f"\ndata_dir: {site / 'data'}\nrun_control_trials: true\n")
    result = subprocess.run(
        [sys.executable, "-m", "cruijff", "build", "--config-path", str(site / "config.yaml"),
         "--root", str(site), "--name", "bench", "--task", "capitalization", "--dataset",
         DATASET, "--model", model, "--control", f"torchtune.epochs={epochs}",
         "--control", "torchtune.max_steps_per_epoch=3",
         "--treatment", "finetune.save_adapter_weights_only=true"],
        env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cruijff build failed:\n{result.stdout}{result.stderr}")
    return site / "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cruijff/tiny-llama")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a model folder to reuse (default: made or downloaded afresh)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from cruijff.adapters import LoraBase, checkpoint_shape, merged_model
    from cruijff.fileio import load_yaml_mapping
    from cruijff.runner import load_experiment, stage_command

    with tempfile.TemporaryDirectory(prefix="cruijff-bench-") as tmp:
        site = Path(tmp)
        env = dict(os.environ, CRUIJFF_HOME=str(site / "home"), OMP_NUM_THREADS=str(args.threads),
                   HF_DATASETS_CACHE=str(site / "hf_datasets"))
        if args.model_dir is not None:
            (site / "models").mkdir()
            (site / "models" / args.model.replace("/", "__")).symlink_to(args.model_dir.resolve())
        experiment = load_experiment(build(site, args.model, args.epochs, env))
        trials = {name: next(t for t in experiment.trials if t.id == tid)
                  for name, tid in SIDES.items()}
        per_epoch: dict[str, list[int]] = {name: [] for name in SIDES}
        epoch_folder: dict[str, list[int]] = {name: [] for name in SIDES}
        merges: list[float] = []

        def fine_tune(name: str) -> Callable[[], None]:
            trial = trials[name]
            checkpoints = trial.dir / "checkpoints"

            def run() -> None:
                shutil.rmtree(checkpoints, ignore_errors=True)
                checkpoints.mkdir()
                done = subprocess.run(stage_command(trial, "finetune"), cwd=trial.dir, env=env,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{name}: the fine-tune failed:\n{done.stderr[-3000:]}")
                per_epoch[name].append(folder_bytes(checkpoints) // args.epochs)
                epoch_folder[name].append(folder_bytes(checkpoints / "epoch_0"))
            return run

        times = alternate({name: fine_tune(name) for name in SIDES}, args.repeats)

        adapter = trials["adapter only"]
        last = adapter.dir / "checkpoints" / f"epoch_{args.epochs - 1}"
        assert checkpoint_shape(last) == "adapter", f"{last} holds no adapter-only checkpoint"
        config_path = adapter.dir / "finetune.yaml"
        base = LoraBase.from_config(load_yaml_mapping(config_path, "fine-tune config"),
                                    config_path)
        importlib.import_module("torchtune.training")  # its import is not the merge's cost
        logging.getLogger("torchtune.utils._logging").setLevel(logging.WARNING)  # every save
        for _ in range(args.repeats):
            started = time.perf_counter()
            with merged_model(last, base, adapter.dir / ".eval-model"):
                merges.append(time.perf_counter() - started)

        model_bytes = folder_bytes(base.checkpoint_dir)
        print(f"{args.model}: {args.epochs} epochs, base model folder "
              f"{model_bytes / 1e6:.3f} MB")
        for name in SIDES:
            print(f"  {name}")
            print(f"    checkpoints/ per epoch  {megabytes(per_epoch[name])}")
            print(f"    one epoch folder        {megabytes(epoch_folder[name])}")
            print(f"    fine-tune wall time     {describe(times[name])}")
        print(f"  eval's merge of the adapter  {describe(merges)}")
        full, small = (statistics.median(per_epoch[name]) for name in SIDES)
        print(f"adapter only: {small / full:.1%} of the full save's bytes per epoch "
              f"({(full - small) / 1e6:.3f} MB less)")


if __name__ == "__main__":
    main()
