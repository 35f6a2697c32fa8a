"""Run one of torchtune's own recipes, as ``tune run`` does, with cruijff's metric capture
installed (cruijff/metric_capture.py): whatever metric logger the config chooses, the run's
losses also reach the file its ``cruijff_metrics_file`` names.

    python -m cruijff.recipes.run full_finetune_single_device --config finetune.yaml [key=value ...]
    torchrun --standalone --nproc_per_node 8 -m cruijff.recipes.run lora_finetune_distributed \\
        --config finetune.yaml

The recipe is named in the command (the first argument), so the command says what runs;
everything after it goes to the recipe as ``tune run`` passes it.
"""

from __future__ import annotations

import runpy
import sys

from cruijff.metric_capture import install
from cruijff.recipes import torchtune_recipe_path

USAGE = "usage: python -m cruijff.recipes.run <torchtune recipe> --config <file> [key=value ...]"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1].startswith("-"):
        raise SystemExit(USAGE)
    try:
        path = torchtune_recipe_path(argv[1])
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    install()
    sys.argv = [str(path), *argv[2:]]  # what the recipe's @config.parse reads
    runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)
