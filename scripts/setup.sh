#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# torch 2.13.0 (CPU build) goes in first and constraints.txt keeps every later package from
# replacing it; re-running is cheap when pyproject.toml and constraints.txt have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${POPSCALE_VENV:-.venv}
EXTRAS=${POPSCALE_EXTRAS:-dev}
stamp="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$VENV/.setup-stamp" ] && [ "$(cat "$VENV/.setup-stamp")" = "$stamp" ]; then
  exit 0
fi
echo "setting up $VENV (torch 2.13.0 CPU first, then popscale[$EXTRAS]) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
"$VENV/bin/python" - <<'PYEOF'
import torch, sys
if torch.__version__.split("+")[0] != "2.13.0":
    sys.exit(f"torch {torch.__version__} was installed; popscale needs the pinned 2.13.0")
PYEOF
echo "$stamp" > "$VENV/.setup-stamp"
echo "environment ready: $VENV"
