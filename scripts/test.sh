#!/usr/bin/env bash
# Make a virtual environment, install deltamerge with its test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh test
ruff check deltamerge tests scripts
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_XET=1
# llama.cpp's converter, which tests/llamacpp.py compares GGUF output with (cached in .cache/)
DELTAMERGE_LLAMACPP=$(scripts/fetch_llamacpp.sh)
export DELTAMERGE_LLAMACPP
exec python -m pytest -q "$@"
