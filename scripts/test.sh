#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: bash scripts/test.sh [pytest args]
# Two pytest-xdist workers by default (CRUIJFF_TEST_WORKERS=N for more, 0 for none): most
# tests wait on processes, Slurm or a server; the Slurm tests still run one at a time.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/install.sh" dev
cd "$repo"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m pytest -n "${CRUIJFF_TEST_WORKERS:-2}" --dist loadgroup "$@"
