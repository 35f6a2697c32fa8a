"""Models: Hugging Face id <-> folder in model_dir, the family table, and getting the weights.

A model `org/name` lives in `<model_dir>/org__name` (the same key names its resources profile).
The family table maps an id to torchtune's built-in config for it and to the files inside the
folder that the config must point at, so a researcher names a model and gets a runnable config.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cruijff.errors import CruijffError
from cruijff.settings import CruijffSettings

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
PACKAGE_CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Family:
    """How to fine-tune and evaluate one family of models."""

    pattern: str
    lora: tuple[str, str]
    """(torchtune recipe, config): a built-in config name, or a file in cruijff/configs/."""
    files: dict[str, str]
    """Config keys that point into the model folder -> path relative to it."""
    eval_model_args: dict[str, Any] = field(default_factory=dict)
    eval_generate: dict[str, Any] = field(default_factory=dict)


_LLAMA3_TOKENIZER = {"tokenizer.path": "original/tokenizer.model"}
_QWEN_TOKENIZER = {"tokenizer.path": "vocab.json", "tokenizer.merges_file": "merges.txt"}

FAMILIES: tuple[Family, ...] = (
    Family(
        r"^cruijff/tiny-llama(-random)?$",
        ("lora_finetune_single_device", "tiny_llama_lora.yaml"),
        {"tokenizer.path": "tokenizer.model"},
        eval_model_args={"device": "cpu", "dtype": "float32"},
        eval_generate={"max_tokens": 12},
    ),
    Family(
        r"^meta-llama/Llama-3\.2-1B(-Instruct)?$",
        ("lora_finetune_single_device", "llama3_2/1B_lora_single_device"),
        _LLAMA3_TOKENIZER,
    ),
    Family(
        r"^meta-llama/Llama-3\.2-3B(-Instruct)?$",
        ("lora_finetune_single_device", "llama3_2/3B_lora_single_device"),
        _LLAMA3_TOKENIZER,
    ),
    Family(
        r"^meta-llama/(Meta-)?Llama-3\.1-8B(-Instruct)?$",
        ("lora_finetune_single_device", "llama3_1/8B_lora_single_device"),
        _LLAMA3_TOKENIZER,
    ),
    Family(
        r"^meta-llama/(Meta-)?Llama-3\.\d-70B(-Instruct)?$",
        ("lora_finetune_distributed", "llama3_3/70B_lora"),
        _LLAMA3_TOKENIZER,
    ),
    *(
        Family(
            rf"^Qwen/Qwen2\.5-{re.escape(size)}B(-Instruct)?$",
            ("lora_finetune_single_device", f"qwen2_5/{size}B_lora_single_device"),
            _QWEN_TOKENIZER,
        )
        for size in ("0.5", "1.5", "3", "7")
    ),
)


def validate_model_id(model_id: object) -> str:
    if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id) or ".." in model_id:
        raise CruijffError(
            f"model {model_id!r} is not a Hugging Face id of the form 'org/name' "
            "(letters, digits, _ . -)"
        )
    return model_id


def model_key(model_id: str) -> str:
    """'meta-llama/Llama-3.2-1B-Instruct' -> 'meta-llama__Llama-3.2-1B-Instruct'."""
    return validate_model_id(model_id).replace("/", "__", 1)


def family_of(model_id: str) -> Family | None:
    for family in FAMILIES:
        if re.match(family.pattern, model_id):
            return family
    return None


def torchtune_config_path(name: str) -> Path:
    """Where a config named in the family table lives (cruijff's own or torchtune's built-in)."""
    own = PACKAGE_CONFIGS / name
    if own.is_file():
        return own
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.origin is None:
        raise CruijffError("torchtune is not installed: pip install torchtune")
    path = Path(spec.origin).parent.parent / "recipes" / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise CruijffError(f"torchtune has no built-in config {name!r} (looked in {path.parent})")
    return path


def ensure_model(model_id: str, model_dir: Path, settings: CruijffSettings) -> Path:
    """The model's folder, materializing the tiny model or downloading from the hub if missing."""
    dest = model_dir / model_key(model_id)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    from cruijff import tiny_model

    if model_id in tiny_model.TINY_MODEL_IDS:
        tiny_model.materialize(model_id, dest)
        return dest
    if settings.is_offline:
        raise CruijffError(
            f"model {model_id} is not in {dest} and cruijff is offline: put the Hugging Face "
            f"files there (e.g. `hf download {model_id} --local-dir {dest}`)"
        )
    return _download(model_id, dest)


def _download(model_id: str, dest: Path) -> Path:
    """Download with huggingface_hub; the token comes from the environment and is never saved."""
    from huggingface_hub import snapshot_download

    partial = dest.with_name(dest.name + ".partial")
    try:
        snapshot_download(repo_id=model_id, local_dir=partial)
    except Exception as exc:  # the hub raises many types; all mean "could not download"
        raise CruijffError(
            f"could not download model {model_id}: {str(exc).splitlines()[0]} "
            f"(or put its files in {dest})"
        ) from None
    partial.rename(dest)
    return dest


def checkpoint_files(model_path: Path) -> list[str]:
    files = sorted(p.name for p in model_path.glob("*.safetensors"))
    if not files:
        raise CruijffError(f"no *.safetensors weights in {model_path}")
    return files
