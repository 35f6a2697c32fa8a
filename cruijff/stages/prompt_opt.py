"""Prompt optimization: score prompt candidates with the task's own Inspect @task on the
validation split, for the trial's model (its fine-tuned checkpoint if it fine-tunes), and
write the best into the eval stage's config, so eval measures exactly that prompt on test.

An optimizable task takes `split`, `system_prompt` and `fewshot` (a list of demonstration
records {id, input, output}); demonstrations are drawn, seeded, from the training split. A
record without an id is given `<split>-<index>`, as the eval's samples are (give_ids).
"""

from __future__ import annotations

import csv
import functools
import json
import random
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.fileio import atomic_write_text, dump_yaml, load_yaml_mapping
from cruijff.optimizers import Candidate, Scored, SearchSpace
from cruijff.plan import TrialSpec
from cruijff.registry import OPTIMIZERS
from cruijff.stages import (
    Stage,
    StageConfig,
    StageFailed,
    TrialContext,
    Verified,
    set_existing,
)
from cruijff.stages.eval import inspect_target, loadable, log_metrics, task_factory
from cruijff.tasks import task_imports

PROMPT_ARGS = ("split", "system_prompt", "fewshot")
CANDIDATES = "prompt_opt/candidates.csv"
CHOSEN = "prompt_opt/chosen.yaml"


class PromptOptStage(Stage):
    name = "prompt_opt"
    backend = "inspect-ai"

    def enabled(self, trial: TrialSpec) -> bool:
        return trial.use_prompt_opt

    def resolve(self, ctx: TrialContext) -> StageConfig:
        missing = [a for a in PROMPT_ARGS if not ctx.task.has_parameter(a)]
        if missing:
            raise CruijffError(
                f"task '{ctx.task.name}' cannot be prompt-optimized: its @task "
                f"{ctx.task.function}() lacks {', '.join(missing)} (see README: prompt "
                "optimization)")
        default_prompt = ctx.task.defaults.get("system_prompt") or ""
        config: dict[str, Any] = {
            **inspect_target(ctx),
            "optimizer": "search",
            "split": "validation",
            "system_prompts": [default_prompt],
            "fewshot": {"k": 0, "draws": 1, "seed": 0, "split": "train"},
            "max_candidates": 8,
            "max_samples": 50,
            "log_dir": str(ctx.trial_dir / "logs" / "prompt_opt"),
            "eval_config": str(ctx.trial_dir / "eval.yaml"),
        }
        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, "prompt_opt config", self.namespace)
        try:
            OPTIMIZERS[config["optimizer"]]
        except CruijffError as exc:
            raise CruijffError(f"prompt_opt.optimizer: {exc}") from None
        return StageConfig(config, self.command(ctx.trial_dir, config, ctx.trial.model))

    def execute(self, config_path: Path) -> int:
        """`cruijff exec prompt_opt prompt_opt.yaml`: score every candidate, keep the best."""
        from inspect_ai import eval as inspect_eval

        config = load_yaml_mapping(config_path, "prompt_opt config")
        trial_dir = config_path.parent
        make_task = task_factory(config)
        space = SearchSpace(
            system_prompts=list(config["system_prompts"]),
            fewshot_sets=demonstrations(Path(config["task_args"]["data_path"]),
                                        **config["fewshot"]),
            max_candidates=int(config["max_candidates"]),
        )

        def evaluate(model_args: dict[str, Any], candidate: Candidate) -> Scored:
            task = make_task(**{**config["task_args"], **candidate.args,
                                "split": config["split"]})
            [log] = inspect_eval(task, model=config["model"], model_args=model_args,
                                 limit=config["max_samples"], display="none",
                                 log_dir=str(Path(config["log_dir"]) / f"c{candidate.number}"),
                                 **config["generate"])
            if log.status != "success":
                error = log.error.message if log.error else log.status
                raise RuntimeError(f"candidate {candidate.number} failed: {error}")
            metrics = log_metrics(log)
            score = metrics.get("accuracy", next((v for k, v in metrics.items()
                                                  if k != "samples"), 0.0))
            return Scored(candidate, float(score), int(metrics["samples"]),
                          [str(s.id) for s in log.samples or []])

        with loadable(config, trial_dir, self.name) as model_args, \
                task_imports(Path(config["task_file"]).parent):  # as the eval stage does
            scored = OPTIMIZERS[config["optimizer"]].optimize(
                space, functools.partial(evaluate, model_args))
        if not scored:
            raise RuntimeError("no candidate was scored")
        best = max(scored, key=lambda s: (s.score, -s.candidate.number))
        _write_table(trial_dir / CANDIDATES, scored, best)
        chosen = {"candidate": best.candidate.number, "score": best.score,
                  "task_args": best.candidate.args}
        atomic_write_text(trial_dir / CHOSEN, dump_yaml(chosen))
        eval_path = Path(config["eval_config"])
        eval_config = load_yaml_mapping(eval_path, "eval config")
        eval_config["task_args"].update(best.candidate.args)
        atomic_write_text(eval_path, dump_yaml(eval_config))
        return 0

    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        return [Path(config["log_dir"]), trial_dir / "prompt_opt"]

    def output_paths(self, trial_dir: Path, config: dict[str, Any]) -> dict[str, Path]:
        """Its Inspect logs, and the eval config it writes the chosen prompt into."""
        return {key: Path(config[key]) for key in ("log_dir", "eval_config")}

    def verify(self, trial_dir: Path, config: dict[str, Any]) -> Verified:
        """A candidate table and a choice exist, and the eval config carries the choice."""
        try:
            chosen = load_yaml_mapping(trial_dir / CHOSEN, "chosen prompt")
            rows = list(csv.DictReader((trial_dir / CANDIDATES).open(encoding="utf-8")))
        except (CruijffError, OSError) as exc:
            raise StageFailed(f"prompt optimization left no result: {exc}") from None
        eval_args = load_yaml_mapping(Path(config["eval_config"]), "eval config")["task_args"]
        if any(eval_args.get(k) != v for k, v in chosen["task_args"].items()):
            raise StageFailed("the eval config does not carry the chosen prompt")
        return Verified([CANDIDATES, CHOSEN],
                        {"best_score": chosen["score"], "candidates": len(rows),
                         "chosen": chosen["candidate"]})


def demonstrations(data_path: Path, *, k: int, draws: int, seed: int,
                   split: str) -> list[list[dict[str, Any]]]:
    """The zero-shot set, then `draws` seeded sets of k records from the training split."""
    sets: list[list[dict[str, Any]]] = [[]]
    if k <= 0:
        return sets
    records = [{"id": r.get("id", f"{split}-{index}"), "input": r["input"],
                "output": r["output"]}
               for index, r in enumerate(json.loads(data_path.read_text(encoding="utf-8"))[split])]
    rng = random.Random(seed)
    for _ in range(draws):
        sets.append(rng.sample(records, min(k, len(records))))
    return sets


def _write_table(path: Path, scored: list[Scored], best: Scored) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate", "label", "score", "samples", "chosen",
                         "validation_sample_ids"])
        for s in scored:
            writer.writerow([s.candidate.number, s.candidate.label, f"{s.score:.6f}",
                             s.samples, "yes" if s is best else "",
                             " ".join(s.sample_ids)])
