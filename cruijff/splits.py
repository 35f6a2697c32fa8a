"""Which split of a dataset each stage reads, checked at build: every split a trial reads
exists, and a prompt search never scores (or draws demonstrations from) the split its
trial's eval scores, unless `prompt_opt.allow_same_split` says so, which the prompt_opt
config then records as `same_split`.

Split names in stage configs are cruijff's roles (`train`, `validation`, `test`) or the
dataset's own names; a role is read from the split `splits:` in config.yaml maps it to.
The eval's split is the task's `split` argument; a task that takes none picks its split
itself, which cruijff cannot know and says so instead of guessing.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cruijff.errors import CruijffError
from cruijff.tasks import REQUIRED

if TYPE_CHECKING:
    from cruijff.stages import TrialContext

UNKNOWN = "chosen by the task (its @task takes no `split` argument)"
"""How outputs show a split cruijff cannot know."""


FIXES = {("prompt_opt", "scoring"): ("prompt_opt.split", "validation"),
         ("prompt_opt", "demonstrations"): ("prompt_opt.fewshot.split", "train"),
         ("eval", "scoring"): ("eval.split", "test")}
"""(stage, what it reads) -> the design key that sets its split, and its role."""


def settle_eval_split(config: dict[str, Any], ctx: TrialContext) -> None:
    """Give the eval's `task_args.split` as the dataset names it (the mapped role), also when
    only the @task's own default names it, and record it as `reads_split` (None when the
    task takes no `split` argument, or its default cannot be read)."""
    task = ctx.task
    split: Any = None
    if "split" in task.parameters:
        split = config["task_args"].get("split", task.parameters["split"])
        if split is REQUIRED:
            split = "test"  # the eval's role
    if isinstance(split, str):
        split = ctx.config.splits.dataset_split(split)
        config["task_args"]["split"] = split
    config["reads_split"] = split if isinstance(split, str) else None


def stage_reads(stage: str, config: dict[str, Any]) -> dict[str, str | None] | None:
    """What a stage config reads from the dataset: use -> split (None: the task chooses)."""
    if stage == "finetune" and isinstance(config.get("dataset"), dict):
        field = config["dataset"].get("field")
        return {"training": field} if isinstance(field, str) else None
    if stage == "prompt_opt":
        reads: dict[str, str | None] = {"scoring": config["split"]}
        if int(config["fewshot"]["k"]) > 0:
            reads["demonstrations"] = config["fewshot"]["split"]
        return reads
    if stage == "eval":
        return {"scoring": config.get("reads_split")}
    return None


def dataset_splits(path: Path) -> list[str] | None:
    """The split names of a JSON dataset file ({split: [records]}); None when there is no
    such file (a dry run before data.py made it) or it is no JSON object."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _splits_of(path, (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _splits_of(path: Path, stamp: tuple[int, int]) -> list[str] | None:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return list(data) if isinstance(data, dict) else None


def check_trial(trial: str, dataset: str, data_path: Path, configs: dict[str, dict[str, Any]],
                notes: list[str]) -> dict[str, dict[str, str | None]]:
    """Check one trial's resolved stage configs (stage -> config) against its dataset: each
    split a stage reads must exist, and prompt_opt must not score the eval's split (or draw
    demonstrations from it) unless allowed; marks prompt_opt's `same_split`. Returns what
    each stage reads; adds a line to `notes` where cruijff cannot tell."""
    reads = {stage: found for stage, config in configs.items()
             if (found := stage_reads(stage, config)) is not None}
    have = dataset_splits(data_path)
    if "prompt_opt" in configs and have is None and data_path.exists():
        raise CruijffError(
            f"dataset {data_path}: not a JSON object of splits ({{\"train\": [...], ...}}), "
            f"which trial {trial}'s prompt_opt reads itself (demonstrations, scoring split)")
    for stage, uses in reads.items():
        for use, split in uses.items():
            if have is not None and split is not None and split not in have:
                key, role = FIXES.get((stage, use), (f"{stage}'s split", "train"))
                raise CruijffError(
                    f"dataset {dataset} has no split {split!r} (it has "
                    f"{', '.join(map(repr, have)) or 'none'}), which trial {trial}'s {stage} "
                    f"reads ({use}): set {key} to one it has, or map the role in config.yaml "
                    f"(splits: {{{role}: <split>}})")
    search, evaluation = configs.get("prompt_opt"), configs.get("eval")
    if search is None or evaluation is None:
        return reads
    scored = evaluation.get("reads_split")
    if scored is None:
        notes.append(f"trial {trial}: the eval reads the split {UNKNOWN}, so cruijff cannot "
                     f"check that it differs from {search['split']!r}, which prompt_opt "
                     "scores candidates on")
        return reads
    same = [use for use, split in reads["prompt_opt"].items() if split == scored]
    if same and not search.get("allow_same_split"):
        raise CruijffError(
            f"trial {trial}: prompt_opt's {' and '.join(same)} and the eval's scoring read "
            f"the same split {scored!r} of {dataset} (the chosen prompt would be measured on "
            "the samples it was chosen with): give the eval another split, map the roles to "
            "different splits (splits: in config.yaml), or set "
            "prompt_opt.allow_same_split=true to allow it (the report marks it)")
    search["same_split"] = scored if same else None
    return reads
