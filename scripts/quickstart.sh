#!/usr/bin/env bash
# Install (if needed) and build the quickstart experiment from examples/capitalization.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/install.sh"
example="$repo/examples/capitalization"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cruijff build \
  --config-path "$example/config.yaml" \
  --root "$example/experiments" \
  --name quickstart --force \
  --task capitalization \
  --dataset words_5L_80_1000.json \
  --model cruijff/tiny-llama \
  --control torchtune.epochs=3 \
  --treatment use_fine_tune=false \
  --treatment torchtune.epochs=1 \
  --treatment torchtune.model.lora_rank=4
