#!/usr/bin/env bash
# Install (if needed), then build and run the quickstart experiment from
# examples/capitalization end to end on this machine, and print each trial's accuracy.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/install.sh"
example="$repo/examples/capitalization"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cruijff run \
  --config-path "$example/config.yaml" \
  --root "$example/experiments" \
  --name quickstart --force \
  --task capitalization \
  --dataset words_5L_80_1000.json \
  --model cruijff/tiny-llama \
  --treatment use_fine_tune=false \
  --treatment torchtune.epochs=1 \
  --treatments '{"torchtune.epochs": 1, "torchtune.max_steps_per_epoch": 30}'
