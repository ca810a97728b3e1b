#!/usr/bin/env bash
# Make a virtual environment, install deltamerge with its test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build in pyproject.toml; an unpinned torch pulls a CUDA build.
python -m pip install --quiet -e ".[test]"
ruff check deltamerge tests scripts
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_XET=1
exec python -m pytest -q "$@"
