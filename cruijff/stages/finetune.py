"""Fine-tuning with torchtune: `tune run <recipe> --config finetune.yaml`."""

from __future__ import annotations

import copy
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.fileio import load_yaml_mapping
from cruijff.models import checkpoint_files, torchtune_config_path
from cruijff.plan import TrialSpec
from cruijff.stages import (
    Headline,
    Stage,
    StageConfig,
    StageFailed,
    TrialContext,
    Verified,
    set_existing,
    set_path,
)

CHECKPOINTS = "checkpoints"
FINAL_CHECKPOINT = f"{CHECKPOINTS}/final"
"""Where a trial's fine-tuned model ends up (relative to the trial folder)."""
LOG_DIR = "logs/finetune"
"""Where torchtune's metric logger writes (relative to the trial folder)."""


def dataset_section(data_path: Path) -> dict[str, Any]:
    """The task's dataset as torchtune reads it: a JSON file whose 'train' list holds
    {input, output} records (the convention every cruijff task's data.py follows)."""
    return {
        "_component_": "torchtune.datasets.instruct_dataset",
        "source": "json",
        "data_files": str(data_path),
        "field": "train",
        "split": "train",
        "column_map": {"input": "input", "output": "output"},
        "train_on_input": False,
        "packed": False,
    }


@functools.lru_cache(maxsize=64)
def _load_default(path: Path) -> dict[str, Any]:
    return load_yaml_mapping(path, "torchtune config")


def tune_executable() -> str:
    """The `tune` next to this interpreter, so scripts work without an activated venv."""
    beside = Path(sys.executable).with_name("tune")
    return str(beside) if beside.exists() else "tune"


LOSS = re.compile(r"\bloss:([-+0-9.eE]+|nan|inf)")


def training_losses(log_dir: Path) -> list[float]:
    """Loss per step from the newest torchtune DiskLogger file in log_dir."""
    logs = sorted(log_dir.glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return []
    return [float(m.group(1)) for m in LOSS.finditer(logs[-1].read_text(encoding="utf-8"))]


def recipe_command(recipe: str, config_file: str) -> list[str]:
    """torchtune's LoRA recipe goes through cruijff's copy-before-merge subclass (see
    cruijff/recipes); every other recipe runs as torchtune ships it."""
    if recipe == "lora_finetune_single_device":
        return [sys.executable, "-m", "cruijff.recipes.lora_finetune_single_device",
                "--config", config_file]
    return [tune_executable(), "run", recipe, "--config", config_file]


def recipe_for(config: dict[str, Any], default: str | None) -> str:
    """The family's recipe for its own config; otherwise LoRA or full, read off the model."""
    component = str(config.get("model", {}).get("_component_", ""))
    lora = "lora" in component.rsplit(".", 1)[-1]
    if default and ("lora" in default) == lora:
        return default
    return "lora_finetune_single_device" if lora else "full_finetune_single_device"


class FinetuneStage(Stage):
    name = "finetune"
    backend = "torchtune"
    shared = True
    folders = (CHECKPOINTS,)
    headlines = (Headline("final loss", "loss_last", ".4f"),)

    def enabled(self, trial: TrialSpec) -> bool:
        return trial.use_fine_tune

    def resolve(self, ctx: TrialContext) -> StageConfig:
        if ctx.config.finetune_config is not None:
            source, default_recipe = ctx.config.finetune_config, None
        elif ctx.family is not None:
            default_recipe, name = ctx.family.lora
            source = torchtune_config_path(name)
        else:
            raise CruijffError(
                f"no torchtune config is known for model {ctx.trial.model}: set finetune_config "
                "in config.yaml to a torchtune YAML for it"
            )
        config = copy.deepcopy(_load_default(source))

        checkpoints = ctx.trial_dir / CHECKPOINTS
        config["output_dir"] = str(checkpoints)
        set_path(config, "checkpointer.checkpoint_dir", str(ctx.model_path))
        set_path(config, "checkpointer.checkpoint_files", checkpoint_files(ctx.model_path))
        set_path(config, "checkpointer.output_dir", str(checkpoints))
        for key, relative in (ctx.family.files if ctx.family else {}).items():
            set_path(config, key, str(ctx.model_path / relative))
        config["dataset"] = dataset_section(ctx.data_path)
        set_path(config, "metric_logger.log_dir", str(ctx.trial_dir / LOG_DIR))

        for key, value in self.overrides(ctx.trial).items():
            set_existing(config, key, value, f"fine-tune config ({source.name})",
                         self.namespace)
        recipe = recipe_for(config, default_recipe)
        return StageConfig(config, recipe_command(recipe, str(self.config_path(ctx.trial_dir))))

    def artifacts(self, trial_dir: Path, config: dict[str, Any]) -> list[Path]:
        log_dir = config.get("metric_logger", {}).get("log_dir")
        checkpoints = sorted(Path(config["output_dir"]).glob("*"))
        return [*checkpoints, *([Path(log_dir)] if log_dir else [])]

    def losses(self, trial_dir: Path, config: dict[str, Any]) -> list[float]:
        log_dir = config.get("metric_logger", {}).get("log_dir") or trial_dir / LOG_DIR
        return training_losses(Path(log_dir))

    def verify(self, trial_dir: Path, config: dict[str, Any]) -> Verified:
        """The final epoch's weights exist and the loss was logged; checkpoints/final points
        at that epoch, which is what the eval stage loads."""
        epochs = int(config.get("epochs") or 1)
        epoch_dir = Path(config["output_dir"]) / f"epoch_{epochs - 1}"
        if not any(epoch_dir.glob("*.safetensors")) or not (epoch_dir / "config.json").is_file():
            raise StageFailed(f"fine-tune finished without model weights in {epoch_dir}")
        losses = self.losses(trial_dir, config)
        if not losses:
            log_dir = config.get("metric_logger", {}).get("log_dir")
            raise StageFailed(f"fine-tune logged no training loss in {log_dir}")
        final = trial_dir / FINAL_CHECKPOINT
        link = final.with_name(f".{final.name}.tmp")
        link.unlink(missing_ok=True)
        link.symlink_to(epoch_dir.name)
        os.replace(link, final)
        return Verified(
            outputs=[str(p.relative_to(trial_dir)) for p in (epoch_dir, final)],
            metrics={"loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)},
        )
