"""How cruijff runs torchtune's recipes: with its metric capture (cruijff/metric_capture.py)
installed, so any metric logger works, and in place of a stock recipe that has a bug.

``python -m cruijff.recipes.run <recipe> --config <file> [key=value ...]`` runs torchtune's own
recipe ``<recipe>`` (under ``torchrun ... -m cruijff.recipes.run`` for a distributed one). A
module named after a recipe (``lora_finetune_single_device``) is a thin subclass of that
recipe, run as ``python -m cruijff.recipes.<name> --config <file> [key=value ...]``. Both take
the same arguments as ``tune run <recipe>``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

RECIPE_NAME = re.compile(r"^[a-z0-9_]+$")


def torchtune_recipe_path(name: str) -> Path:
    """torchtune's recipe file ``recipes/<name>.py`` next to the installed ``torchtune``
    package (its ``recipes`` directory is no importable package: its ``__init__`` raises)."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("torchtune is not installed")
    folder = Path(spec.origin).resolve().parent.parent / "recipes"
    path = folder / f"{name}.py"
    if not RECIPE_NAME.fullmatch(name) or not path.is_file():
        raise FileNotFoundError(f"torchtune has no recipe {name!r} (not in {folder}; "
                                "`tune ls` lists them)")
    return path
