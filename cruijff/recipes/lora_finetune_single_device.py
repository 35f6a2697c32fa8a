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
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config

RECIPE = "lora_finetune_single_device"


def _load_torchtune_recipe(name: str) -> ModuleType:
    """torchtune's recipe file ``recipes/<name>.py`` (next to the installed ``torchtune``
    package), loaded as a module without importing the ``recipes`` package."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("torchtune is not installed")
    path = Path(spec.origin).resolve().parent.parent / "recipes" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"torchtune's recipe {name!r} not found at {path}")
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


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``--config <file>`` plus ``key=value`` overrides, as for ``tune run``."""
    config.log_config(recipe_name="LoRAFinetuneRecipeSingleDevice", cfg=cfg)
    recipe = LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
