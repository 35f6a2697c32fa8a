#!/usr/bin/env bash
# Build the sdist and wheel into dist/ and check them as PyPI would (twine check); uploading
# stays a deliberate step: `twine upload dist/*` once the checks pass.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3.11 -m venv "$tools"
"$tools/bin/pip" install -q build twine
rm -rf dist
"$tools/bin/python" -m build
"$tools/bin/twine" check --strict dist/*
echo "release ready: $(ls dist)"
