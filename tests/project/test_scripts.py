"""The scripts a fresh clone runs: CI runs the demo before the tests, so a broken demo cannot
land, and the scripts' install runs pip only when what it installs from has changed. A fake
``.venv`` whose python only logs stands in for the real one: nothing is installed here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from helpers import ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$LOG"
[ "${FAIL_INSTALL:-}" != 1 ] || [[ "$*" == *--upgrade* ]]
"""


def _fake_clone(tmp: Path) -> Path:
    clone = tmp / "clone"
    (clone / "scripts").mkdir(parents=True)
    for name in ("pyproject.toml", "scripts/venv.sh", "scripts/constraints.txt"):
        shutil.copyfile(ROOT / name, clone / name)
    bin_dir = clone / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
    return clone


def _source_venv(clone: Path, extras: str, log: Path, **env: str) -> int:
    return subprocess.run(
        ["bash", "-c", 'set -euo pipefail; . scripts/venv.sh "$0"', extras], cwd=clone,
        env={"PATH": "/usr/bin:/bin", "LOG": str(log), **env}, timeout=30,
    ).returncode


def _installs(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if "--upgrade" not in line]


def test_install_runs_pip_only_when_its_inputs_change(tmp_path: Path):
    clone, log = _fake_clone(tmp_path), tmp_path / "log"
    assert _source_venv(clone, "test", log) == 0
    assert _installs(log) == ["-m pip install --quiet -c scripts/constraints.txt -e .[test]"]
    assert _source_venv(clone, "test", log) == 0
    assert len(_installs(log)) == 1  # nothing changed: no pip at all

    assert _source_venv(clone, "", log) == 0  # other extras: installed once, then kept
    assert _source_venv(clone, "", log) == 0
    assert _source_venv(clone, "test", log) == 0
    assert _installs(log)[1:] == ["-m pip install --quiet -c scripts/constraints.txt -e ."]

    with (clone / "pyproject.toml").open("a") as f:
        f.write("\n# a changed requirement\n")
    assert _source_venv(clone, "test", log) == 0
    assert len(_installs(log)) == 3

    (clone / "scripts/constraints.txt").write_text("torch==2.13.0\nnumpy<3\n")
    assert _source_venv(clone, "test", log, FAIL_INSTALL="1") != 0  # a failed install ...
    assert _source_venv(clone, "test", log) == 0  # ... is tried again
    assert len(_installs(log)) == 5


def test_ci_runs_the_demo_then_the_tests_and_stops_on_a_broken_demo(tmp_path: Path):
    clone, log = tmp_path / "clone", tmp_path / "log"
    (clone / ".ci").mkdir(parents=True)
    (clone / "scripts").mkdir()
    shutil.copyfile(ROOT / ".ci/run", clone / ".ci/run")
    for name in ("demo", "test"):
        script = clone / "scripts" / f"{name}.sh"
        script.write_text(f'#!/usr/bin/env bash\necho {name} >> "$LOG"\nexit "${{{name.upper()}_EXIT:-0}}"\n')
        script.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "LOG": str(log)}
    assert subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, timeout=30).returncode == 0
    assert log.read_text().split() == ["demo", "test"]
    log.unlink()
    proc = subprocess.run(["bash", ".ci/run"], cwd=clone, env={**env, "DEMO_EXIT": "3"}, timeout=30)
    assert proc.returncode != 0
    assert log.read_text().split() == ["demo"]
