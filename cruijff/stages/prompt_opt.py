"""Prompt optimization: score prompt candidates with the task's own Inspect @task on the
validation split, for the trial's model (its fine-tuned checkpoint if it fine-tunes), and
write the best into the eval stage's config, so eval measures exactly that prompt on test.

Any @task can be optimized. A candidate is a system prompt and a list of demonstration
records {id, input, output}, drawn seeded from the training split. A task that takes
`system_prompt` / `fewshot` gets them as arguments; for one that does not, cruijff applies
them around the task's own solver (cruijff/prompt_wrap.py), here and in the eval alike. A
task that takes `split` is given the validation split; for one that does not, its
`data_path` is a copy of the data file holding only the validation records under each split
name, so whatever split it reads, it scores validation samples and never sees test. A
record without an id is given `<split>-<index>`, as the eval's samples are (give_ids).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.fileio import atomic_write_text, dump_yaml, load_yaml_mapping
from cruijff.optimizers import Candidate, Scored, SearchSpace
from cruijff.plan import TrialSpec
from cruijff.prompt_wrap import applied_by_cruijff, apply_prompt, split_candidate
from cruijff.registry import OPTIMIZERS
from cruijff.stages import (
    Stage,
    StageConfig,
    StageFailed,
    TrialContext,
    Verified,
    set_existing,
)
from cruijff.stages.eval import (
    HeadlineMetric,
    error_logged,
    headline_metric,
    inspect_names,
    inspect_target,
    loadable,
    log_metrics,
    task_factory,
)
from cruijff.tasks import task_imports

CANDIDATES = "prompt_opt/candidates.csv"
CHOSEN = "prompt_opt/chosen.yaml"


class PromptOptStage(Stage):
    name = "prompt_opt"
    backend = "inspect-ai"

    def enabled(self, trial: TrialSpec) -> bool:
        return trial.use_prompt_opt

    def resolve(self, ctx: TrialContext) -> StageConfig:
        task = ctx.task
        takes_split = "split" in task.parameters
        if not takes_split and not task.has_parameter("data_path"):
            raise CruijffError(
                f"task '{task.name}' cannot be prompt-optimized: its @task {task.function}() "
                "takes neither `split` nor `data_path`, so cruijff cannot make the search "
                "score the validation split (and never test): let it take one of them (see "
                "README: prompt optimization)")
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
            "allow_same_split": False,
        }
        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, "prompt_opt config", self.namespace)
        names = ctx.config.splits  # roles -> the dataset's own split names
        config["split"] = names.dataset_split(config["split"])
        config["fewshot"]["split"] = names.dataset_split(config["fewshot"]["split"])
        config["wrap"] = applied_by_cruijff(task.parameters)
        config["split_via"] = "argument" if takes_split else "data_copy"
        config["same_split"] = None  # the build's split check sets it (cruijff/splits.py)
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
        names = inspect_names(config, trial_dir, self.name)  # as the eval's logs are named
        wrapped = list(config.get("wrap") or [])  # configs built before it: the task's args
        if config.get("split_via") == "data_copy":
            scoring = {"data_path": str(scoring_copy(data_file(config), config["split"],
                                                     trial_dir / "prompt_opt" / "data"))}
            make_task = task_factory({**config, "model": names.model,
                                      "reads_split": config["split"]})
        else:
            scoring = {"split": config["split"]}
            make_task = task_factory({**config, "model": names.model})
        space = SearchSpace(
            system_prompts=list(config["system_prompts"]),
            fewshot_sets=demonstrations(data_file(config),
                                        **config["fewshot"]),
            max_candidates=int(config["max_candidates"]),
        )

        headlines: dict[int, HeadlineMetric] = {}  # per candidate: what its score is

        def evaluate(model_args: dict[str, Any], candidate: Candidate) -> Scored:
            task_args, around = split_candidate(candidate.args, wrapped)
            log_dir = Path(config["log_dir"]) / f"c{candidate.number}"
            named = names.adding([f"candidate:{candidate.number}"],
                                 {"candidate": candidate.number,
                                  "candidate_label": candidate.label})
            # a candidate that fails before Inspect logs it still leaves an error log there
            with error_logged(log_dir, config, named, config["max_samples"]):
                task = apply_prompt(
                    make_task(**{**config["task_args"], **task_args, **scoring}), around)
                [log] = inspect_eval(task, model=named.model, model_args=model_args,
                                     limit=config["max_samples"], display="none",
                                     log_dir=str(log_dir), tags=named.tags,
                                     metadata=named.metadata, **config["generate"])
            if log.status != "success":
                error = log.error.message if log.error else log.status
                raise RuntimeError(f"candidate {candidate.number} failed: {error}")
            metrics = log_metrics(log)
            # the eval's headline (eval.metric, else the first scorer's first metric): a
            # candidate whose log lacks it fails the stage, never scores 0
            choice = load_yaml_mapping(Path(config["eval_config"]), "eval config").get("metric")
            try:
                headline = headline_metric(log, choice)
            except CruijffError as exc:
                raise CruijffError(f"prompt_opt candidate {candidate.number}: {exc}") from None
            if headline is None or headline.value is None or not math.isfinite(headline.value):
                raise CruijffError(
                    f"prompt_opt candidate {candidate.number}: the eval log has no metric to "
                    "score it by" + ("" if headline is None else
                                     f" ({headline.name} is {headline.value})"))
            headlines[candidate.number] = headline
            return Scored(candidate, headline.value, int(metrics["samples"]),
                          [str(s.id) for s in log.samples or []])

        with loadable(config, trial_dir, self.name) as model_args, \
                task_imports(Path(config["task_file"]).parent):  # as the eval stage does
            scored = OPTIMIZERS[config["optimizer"]].optimize(
                space, functools.partial(evaluate, model_args))
        if not scored:
            raise RuntimeError("no candidate was scored")
        best = max(scored, key=lambda s: (s.score, -s.candidate.number))
        _write_table(trial_dir / CANDIDATES, scored, best, headlines)
        task_args, around = split_candidate(best.candidate.args, wrapped)
        chosen = {"candidate": best.candidate.number, "score": best.score,
                  "task_args": task_args, "prompt": around}
        atomic_write_text(trial_dir / CHOSEN, dump_yaml(chosen))
        eval_path = Path(config["eval_config"])
        eval_config = load_yaml_mapping(eval_path, "eval config")
        eval_config["task_args"].update(task_args)
        if around:  # applied by the eval around the task, as here (cruijff/prompt_wrap.py)
            eval_config["prompt"] = around
        else:
            eval_config.pop("prompt", None)
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
        eval_config = load_yaml_mapping(Path(config["eval_config"]), "eval config")
        eval_args = eval_config["task_args"]
        if any(eval_args.get(k) != v for k, v in chosen["task_args"].items()) or \
                (eval_config.get("prompt") or {}) != (chosen.get("prompt") or {}):
            raise StageFailed("the eval config does not carry the chosen prompt")
        return Verified([CANDIDATES, CHOSEN],
                        {"best_score": chosen["score"], "candidates": len(rows),
                         "chosen": chosen["candidate"]})


def data_file(config: dict[str, Any]) -> Path:
    """The trial's data file: the config's own `data_path` (the task may not take one), or,
    in a config built before there was one, the task's argument."""
    return Path(config.get("data_path") or config["task_args"]["data_path"])


def scoring_copy(data_path: Path, split: str, folder: Path) -> Path:
    """A copy of the data file, under its own name in `folder`, in which every split holds
    the records of `split`: a task that picks its split itself reads only those."""
    splits = json.loads(data_path.read_text(encoding="utf-8"))
    if split not in splits:
        raise CruijffError(f"dataset {data_path} has no split {split!r} (it has "
                           f"{', '.join(map(repr, splits))})")
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / data_path.name
    atomic_write_text(copy, json.dumps({name: splits[split] for name in splits}))
    return copy


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


def _write_table(path: Path, scored: list[Scored], best: Scored,
                 headlines: dict[int, HeadlineMetric] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["candidate", "label", "score", "samples", "chosen",
                         "validation_sample_ids", "metric", "metric_default"])
        for s in scored:  # the score is the eval's headline metric, named in the last two
            headline = (headlines or {}).get(s.candidate.number)
            writer.writerow([s.candidate.number, s.candidate.label, f"{s.score:.6f}",
                             s.samples, "yes" if s is best else "",
                             " ".join(s.sample_ids), headline.name if headline else "",
                             "" if headline is None else str(headline.default).lower()])
