#!/usr/bin/env bash
# The main job on a small built-in example: a publisher makes a delta, a user rebuilds the model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e .
DEMO=${DEMO_DIR:-demo-out}
rm -rf "$DEMO"
mkdir -p "$DEMO"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "Building a small example: a LLaMA-shaped base (.bin shards) and a fine-tune (safetensors)."
python scripts/make_example.py "$DEMO"
step deltamerge make-delta "$DEMO/base" "$DEMO/target" "$DEMO/delta" --quiet
step deltamerge inspect "$DEMO/delta"
step deltamerge apply "$DEMO/base" "$DEMO/delta" "$DEMO/rebuilt"
step deltamerge verify "$DEMO/rebuilt" --manifest "$DEMO/delta/deltamerge.json"
step deltamerge diff "$DEMO/rebuilt" "$DEMO/target"
echo
echo "The rebuilt model is in $DEMO/rebuilt; the delta's fp16 rounding explains any differences above."
