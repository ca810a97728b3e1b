# Sourced by demo.sh and test.sh: make .venv if missing, activate it, install deltamerge with
# the extras given as "$1" (torch is pinned to the CPU build in pyproject.toml; an unpinned
# torch pulls a CUDA build of several GB).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".${1:+[$1]}"
