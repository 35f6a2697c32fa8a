"""Evaluating a fine-tune saved as its LoRA adapter alone, without peft.

Why: with `save_adapter_weights_only: true` torchtune writes each epoch's adapter (plus the
base's config and tokenizer files) instead of a whole merged model: megabytes instead of the
model's size, per epoch. Inspect's hf provider loads whole models only, and peft, which could
apply an adapter, must not be installed beside torchtune 0.6.1 (DESIGN.md). So cruijff merges
base + adapter itself, into a folder that lives only while the model is evaluated.

The merge is the one torchtune's full save does, so both shapes of a checkpoint give the same
model: torchtune's own adapter file (`adapter_model.pt`, torchtune's key names) added onto the
base as the fine-tune's HF checkpointer reads it, W + (alpha/rank)·B·A per adapted weight
(`get_merged_lora_ckpt`), written back in HF format by that checkpointer. Not from the PEFT
copy (`adapter_model.safetensors`): torchtune 0.6.1 permutes its q/k rows into Llama's rotary
layout for every model type, Qwen2 included, whose HF weights it never permutes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cruijff.errors import CruijffError

ADAPTER_WEIGHTS = "adapter_model.pt"
"""torchtune's adapter in its own key names: what the merge reads."""
PEFT_WEIGHTS = "adapter_model.safetensors"
"""torchtune's PEFT-format copy of the adapter: not model weights."""
HF_CHECKPOINTER = "FullModelHFCheckpointer"

Shape = Literal["model", "adapter"]


def checkpoint_shape(folder: Path) -> Shape | None:
    """What an epoch folder holds: 'model' (HF weights and their config.json), 'adapter'
    (torchtune's adapter alone, as `save_adapter_weights_only` leaves it), or None."""
    weights = [p for p in folder.glob("*.safetensors") if p.name != PEFT_WEIGHTS]
    if weights and (folder / "config.json").is_file():
        return "model"
    if (folder / ADAPTER_WEIGHTS).is_file():
        return "adapter"
    return None


@dataclass(frozen=True)
class LoraBase:
    """What a merge needs from the fine-tune config that trained the adapter."""

    checkpoint_dir: Path
    checkpoint_files: Any
    """As the config gives them to the checkpointer (a list, or torchtune's filename format)."""
    model_type: str
    rank: int
    alpha: float

    @classmethod
    def from_config(cls, config: dict[str, Any], source: Path) -> LoraBase:
        """Read off a torchtune LoRA config (`source` names it in errors)."""
        checkpointer = config.get("checkpointer") or {}
        model = config.get("model") or {}
        component = str(checkpointer.get("_component_", ""))
        if component.rsplit(".", 1)[-1] != HF_CHECKPOINTER:
            raise CruijffError(
                f"{source}: an adapter-only checkpoint is merged through torchtune's "
                f"{HF_CHECKPOINTER}, not {component or 'no checkpointer'}: use it, or set "
                "save_adapter_weights_only: false")
        missing = [k for k in ("checkpoint_dir", "checkpoint_files", "model_type")
                   if k not in checkpointer] + [k for k in ("lora_rank", "lora_alpha")
                                                if k not in model]
        if missing:
            raise CruijffError(f"{source}: no {missing[0]} to merge the adapter with its base "
                               "model: rebuild the experiment with `cruijff build --force`")
        return cls(Path(checkpointer["checkpoint_dir"]), checkpointer["checkpoint_files"],
                   str(checkpointer["model_type"]), int(model["lora_rank"]),
                   float(model["lora_alpha"]))


def merge_adapter(adapter_dir: Path, base: LoraBase, dest: Path) -> Path:
    """Write base + the adapter in adapter_dir as an HF model folder under dest (with the
    base's config and tokenizer files); the folder."""
    import torch
    from torchtune import training
    from torchtune.modules.peft import get_merged_lora_ckpt

    adapter = torch.load(adapter_dir / ADAPTER_WEIGHTS, map_location="cpu", weights_only=True)
    checkpointer = training.FullModelHFCheckpointer(
        checkpoint_dir=str(base.checkpoint_dir), checkpoint_files=base.checkpoint_files,
        model_type=base.model_type, output_dir=str(dest))
    weights = checkpointer.load_checkpoint()[training.MODEL_KEY]
    for key, lora_a in adapter.items():
        if not key.endswith(".lora_a.weight"):
            continue
        module = key.removesuffix(".lora_a.weight")
        lora_b = adapter.get(f"{module}.lora_b.weight")
        weight = weights.get(f"{module}.weight")
        if lora_b is None or weight is None or weight.shape != (lora_b.shape[0],
                                                                lora_a.shape[1]):
            raise CruijffError(
                f"the adapter in {adapter_dir} does not fit the base model in "
                f"{base.checkpoint_dir} ({module}): fine-tune again (`cruijff run --force "
                "--stage finetune`)")
    weights.update(adapter)
    merged = get_merged_lora_ckpt(weights, rank=base.rank, alpha=base.alpha)
    checkpointer.save_checkpoint({training.MODEL_KEY: merged}, epoch=0)
    return dest / "epoch_0"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


@contextmanager
def merged_model(adapter_dir: Path, base: LoraBase, dest: Path) -> Iterator[Path]:
    """merge_adapter's folder while the block runs; dest is removed after it (also when it
    fails), and before it, should a killed run have left one."""
    _remove(dest)
    try:
        yield merge_adapter(adapter_dir, base, dest)
    finally:
        _remove(dest)
