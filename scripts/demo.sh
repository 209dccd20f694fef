#!/usr/bin/env bash
# The main job on the embedded defaults: set up .venv, make a synthetic corpus, ingest the real
# recordings (../shared/data/real, when present), verify the corpus and print its inventory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
CORPUS=${POPSCALE_CORPUS:-runs/demo/corpus}
REAL=${POPSCALE_REAL_DATA:-../shared/data/real}

popscale synth --corpus "$CORPUS" --sessions 16 --subjects 4 --minutes 5
if [ -d "$REAL" ]; then
  popscale ingest "$REAL" --corpus "$CORPUS" --meta configs/real_recordings.yaml
else
  echo "no real recordings at $REAL (set POPSCALE_REAL_DATA): ingest skipped" >&2
fi
popscale verify "$CORPUS"
popscale inspect "$CORPUS" --plot runs/demo/session.png
