#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/install.sh" dev
cd "$repo"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m pytest "$@"
