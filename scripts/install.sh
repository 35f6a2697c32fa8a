#!/usr/bin/env bash
# Create .venv (Python 3.11 to 3.13) and install cruijff with the CPU-only pins; sourced by the
# quickstart and test scripts. Idempotent: a second run only checks.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CRUIJFF_VENV:-$repo/.venv}"
extras="${1:-}"
python="${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12), (3, 13)))'; then
  echo "cruijff needs Python 3.11, 3.12 or 3.13 (found $("$python" --version)); set PYTHON=/path/to/python3.12" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.cruijff-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ] || [ "$repo/constraints-cpu.txt" -nt "$stamp" ]; then
  echo "Installing cruijff${extras:+[$extras]} into $venv (first time: a few minutes)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$repo/constraints-cpu.txt" -e "$repo${extras:+[$extras]}"
  touch "$stamp"
fi
# An editable install leaves cruijff's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE
# is set (CI images often set it) every `cruijff` process compiled them again, ~0.1 s each:
# compiled here, as pip compiles a wheel's. Quick when nothing changed.
"$venv/bin/python" -m compileall -q "$repo/cruijff" "$repo/flows" "$repo/deployments" >/dev/null
export PATH="$venv/bin:$PATH"
