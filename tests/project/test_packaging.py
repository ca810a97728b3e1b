"""deltamerge installs beside the torch a user already has: pyproject.toml asks for ranges (the
CPU torch CI uses is pinned in scripts/constraints.txt, for the scripts alone), and building
the package prints no warning of its own making. Offline: pip sees only files made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from helpers import ROOT
from packaging.requirements import Requirement

OTHER_TORCH = "2.12.0"  # not the 2.13.0 CI installs


def _pip(*args: str | Path) -> subprocess.CompletedProcess:
    """pip with no configuration of this machine's (indexes, find-links, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return subprocess.run([sys.executable, "-m", "pip", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel, built from a copy of the sources (a build writes beside them), and pip's output."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(ROOT / "deltamerge", src / "deltamerge",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    proc = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp / "dist").glob("deltamerge-*.whl")
    return wheel, proc.stdout + proc.stderr


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(z.read(name).decode())
    return [r for r in map(Requirement, metadata.get_all("Requires-Dist") or [])
            if r.marker is None or "extra" not in str(r.marker)]


def _fake_distribution(site: Path, name: str, version: str) -> None:
    """What pip reads of an installed distribution: its metadata, not its code."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))


def test_wheel_ships_py_typed(built):
    """PEP 561: without the marker in the wheel, type checkers ignore the package's annotations."""
    wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        assert "deltamerge/py.typed" in z.namelist()


def test_build_prints_no_warning(built):
    _, output = built
    assert "warning" not in output.lower(), output


EDITABLE_BUILD = """
import sys, warnings
import setuptools.build_meta as backend
from setuptools.warnings import SetuptoolsWarning
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    backend.build_editable(sys.argv[1])
for w in caught:
    if issubclass(w.category, SetuptoolsWarning):
        print("caught:", w.category.__name__, str(w.message).splitlines()[0])
"""


def test_editable_build_warns_of_nothing(built, tmp_path: Path):
    """What the scripts' ``pip install -e .`` runs: setuptools' editable build, whose warnings
    (licence form, package layout) pip prints at every install."""
    src = built[0].parent.parent / "src"
    proc = subprocess.run([sys.executable, "-c", EDITABLE_BUILD, tmp_path], cwd=src,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("caught:")] == []


def test_requirements_are_ranges_and_include_blake3(built):
    requirements = {r.name.lower().replace("_", "-"): r for r in _requirements(built[0])}
    assert {"torch", "huggingface-hub", "blake3"} <= set(requirements)
    assert all(s.operator == ">=" for r in requirements.values() for s in r.specifier), requirements


def test_install_keeps_the_torch_already_installed(built, tmp_path: Path):
    wheel, _ = built
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)  # bare: none of this interpreter's packages
    python = env / "bin" / "python"
    site = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True).stdout.strip())
    for req in _requirements(wheel):
        lowest = next((s.version for s in req.specifier if s.operator in (">=", "==")), "1.0")
        _fake_distribution(site, req.name, OTHER_TORCH if req.name == "torch" else lowest)

    report = tmp_path / "report.json"
    proc = _pip("--python", python, "install", "--dry-run", "--no-index", "--report", report, wheel)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["deltamerge"]  # torch 2.12.0, and every other requirement, kept
