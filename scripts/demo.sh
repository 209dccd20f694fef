#!/usr/bin/env bash
# The main job on the embedded defaults: set up .venv, then `popscale pretrain` on
# configs/demo.yaml - a synthetic corpus made on first use, an embedded local Ray, DeepSpeed on
# CPU, a local sqlite MLflow store (runs/mlflow.db) - ending with a registered model version,
# which @pretrained is moved to (other runs register versions and move no alias unless asked).
# Extra arguments go to `popscale pretrain` (e.g. --set train.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/popscale pretrain --config configs/demo.yaml --alias pretrained "$@"
