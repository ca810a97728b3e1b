#!/usr/bin/env bash
# The main job on a small built-in example: a publisher makes a delta, a user rebuilds the model.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh ""
DEMO=${DEMO_DIR:-demo-out}
rm -rf "$DEMO"
mkdir -p "$DEMO"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "Building a small example: a LLaMA-shaped base (.bin shards) and a fine-tune (safetensors)."
python scripts/make_example.py "$DEMO"
echo
echo "A publisher makes an additive (Vicuna-style) delta with its checksum manifest:"
step deltamerge make-delta "$DEMO/base" "$DEMO/target" "$DEMO/delta"
step deltamerge inspect --no-digest "$DEMO/delta"
echo
echo "A user rebuilds the model, streaming, with the base and the result checked as they stream:"
step deltamerge apply "$DEMO/base" "$DEMO/delta" "$DEMO/rebuilt"
step deltamerge verify "$DEMO/rebuilt" --manifest "$DEMO/delta/deltamerge.json"
echo
echo "fp16 additive deltas are lossy (make-delta said how many elements); a XOR delta is not:"
step deltamerge make-delta --kind xor "$DEMO/base" "$DEMO/target" "$DEMO/delta-xor" --quiet
step deltamerge apply "$DEMO/base" "$DEMO/delta-xor" "$DEMO/rebuilt-xor" --quiet
step deltamerge diff "$DEMO/rebuilt-xor" "$DEMO/target"
echo
echo "Done: the rebuilt models are in $DEMO/rebuilt and $DEMO/rebuilt-xor."
