#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 CPU first, pinned), checks the import layers (.importlinter), runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q --durations=15 "$@"
