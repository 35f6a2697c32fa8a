"""torchtune's ``lora_finetune_single_device`` recipe, with a save that leaves the model alone.

Why: in torchtune 0.6.1 the recipe's end-of-epoch ``save_checkpoint`` builds the merged
checkpoint from ``{k: v.cpu() for k, v in model.state_dict().items()}`` and merges the LoRA
into it in place. On CPU ``v.cpu()`` returns the parameter itself, not a copy, so every save
adds ``(alpha/rank)·B·A`` to the *live* base weights: training after the first epoch goes on
from a corrupted model, and every later epoch's merged checkpoint counts the earlier
adapters again. Here the save works on copies of the state dict, so what it merges is never
what trains. With ``save_adapter_weights_only: true`` the save merges nothing and only reads
the adapter, so it runs as torchtune ships it (no copy of the whole model per epoch).

Run it exactly like ``tune run lora_finetune_single_device``::

    python -m cruijff.recipes.lora_finetune_single_device --config finetune.yaml [key=value ...]

torchtune's ``recipes`` directory is not an importable package (its ``__init__`` raises on
purpose) and ``tune run <path>.py`` refuses paths in 0.6.1, so the recipe file is loaded
from torchtune's installation by path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config

from cruijff.metric_capture import install as install_metric_capture
from cruijff.recipes import torchtune_recipe_path

RECIPE = "lora_finetune_single_device"


def _load_torchtune_recipe(name: str) -> ModuleType:
    """torchtune's recipe file ``recipes/<name>.py``, loaded as a module without importing
    the ``recipes`` package."""
    path = torchtune_recipe_path(name)
    module_name = f"_torchtune_recipe_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    recipe_spec = importlib.util.spec_from_file_location(module_name, path)
    assert recipe_spec is not None and recipe_spec.loader is not None
    module = importlib.util.module_from_spec(recipe_spec)
    sys.modules[module_name] = module
    try:
        recipe_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


_upstream = _load_torchtune_recipe(RECIPE)


def _copying(state_dict: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """``state_dict`` whose tensors are fresh CPU copies (copied straight to the CPU, so a GPU
    run does not hold a second copy of the model on the GPU)."""

    def copied(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {
            k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in state_dict(*args, **kwargs).items()
        }

    return copied


class LoRAFinetuneRecipeSingleDevice(_upstream.LoRAFinetuneRecipeSingleDevice):
    """torchtune's recipe; a checkpoint save that merges reads the model only through
    copies."""

    def save_checkpoint(self, epoch: int) -> None:
        if self._save_adapter_weights_only:
            super().save_checkpoint(epoch)
            return
        model = self._model
        shadowed = model.__dict__.get("state_dict")
        model.state_dict = _copying(model.state_dict)
        try:
            super().save_checkpoint(epoch)
        finally:
            if shadowed is None:
                del model.state_dict
            else:
                model.state_dict = shadowed


WORK_REPORT = "CRUIJFF_WORK_REPORT"
"""Where cruijff asks the recipe to say what its training loop got through (a JSON file)."""


def _counting_tokens(recipe: LoRAFinetuneRecipeSingleDevice) -> Callable[[], int]:
    """Count the tokens the loss is computed on (the recipe's own measure) as the loop goes,
    on the device, read once at the end: no extra host sync per step."""
    loss_step = recipe._loss_step
    total: list[Any] = [0]

    def counted(batch: dict[str, Any]) -> Any:
        total[0] = total[0] + (batch["labels"] != recipe._loss_fn.ignore_index).sum()
        return loss_step(batch)

    recipe._loss_step = counted  # type: ignore[method-assign]
    return lambda: int(total[0])


def _report_work(path: str, training_tokens: int, train_s: float) -> None:
    """What `cruijff.usage` cannot see from outside: the training loop's own time and tokens."""
    Path(path).write_text(json.dumps({
        "training_tokens": training_tokens, "train_s": round(train_s, 3),
        "tokens_per_s": round(training_tokens / train_s, 2) if train_s > 0 else 0.0,
    }), encoding="utf-8")


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``--config <file>`` plus ``key=value`` overrides, as for ``tune run``.
    The config's metric logger, whichever it is, also feeds cruijff's capture file."""
    install_metric_capture()
    config.log_config(recipe_name="LoRAFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    report = os.environ.get(WORK_REPORT)
    tokens = _counting_tokens(recipe) if report else None
    start = time.perf_counter()
    recipe.train()
    if report and tokens:
        _report_work(report, tokens(), time.perf_counter() - start)
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
