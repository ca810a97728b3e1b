#!/usr/bin/env bash
# Make a virtual environment, install deltamerge with its test extras, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh test
ruff check deltamerge tests scripts
export HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_XET=1
exec python -m pytest -q "$@"
