# Sourced by demo.sh and test.sh: make .venv if missing, activate it, install deltamerge
# (editable) with the extras given as "$1". torch is held to the CPU build by
# scripts/constraints.txt; pyproject.toml asks only for a range. pip runs only when
# pyproject.toml, the constraints, the extras or the folder differ from the last install's.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/deltamerge-install${1:+-$1}
want=$({ cat pyproject.toml scripts/constraints.txt; echo "extras=$1 folder=$PWD"; } | cksum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -c scripts/constraints.txt -e ".${1:+[$1]}"
  echo "$want" > "$stamp"
fi
