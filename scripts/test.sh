#!/usr/bin/env bash
# Sets up .venv (torch 2.13.0 CPU first, pinned) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
