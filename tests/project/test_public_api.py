"""The package's public face (issue 25): it runs where ``fcntl`` and ``resource`` do not exist,
its lazy exports agree with the ones type checkers read, and its errors are importable from one
place and caught as the builtins they also are."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_states_equal, llama_state, load_state, run_cli, save_checkpoint

import deltamerge
from deltamerge import apply_delta, errors, make_delta

# Run first in a child: fcntl and resource are then missing, as on Windows; peak memory has no
# measure either (VmHWM is Linux's), so the CLI must print that it has none.
HIDE = (
    "import sys\n"
    "class _Missing:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name in ('fcntl', 'resource'):\n"
    "            raise ImportError(f'No module named {name!r}', name=name)\n"
    "for _name in ('fcntl', 'resource'):\n"
    "    sys.modules.pop(_name, None)\n"
    "sys.meta_path.insert(0, _Missing())\n"
    "import deltamerge.memory\n"
    "deltamerge.memory.vmhwm_bytes = lambda: None\n"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("portable")
    return save_checkpoint(llama_state(0), root / "base"), save_checkpoint(llama_state(1), root / "target")


def test_every_module_imports_without_fcntl_and_resource() -> None:
    prog = HIDE + (
        "import pkgutil, importlib, deltamerge\n"
        "for m in pkgutil.walk_packages(deltamerge.__path__, 'deltamerge.'):\n"
        "    importlib.import_module(m.name)\n"
        "import deltamerge.sinks.lock as lock\n"
        "assert lock.fcntl is None and 'fcntl' not in sys.modules and 'resource' not in sys.modules\n"
        "print(deltamerge.memory.peak_rss_bytes())\n"
    )
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"


def test_make_delta_and_apply_run_without_fcntl_and_resource(tmp_path: Path, models) -> None:
    base, target = models
    made = run_cli("make-delta", base, target, tmp_path / "delta", prelude=HIDE)
    assert made.returncode == 0, made.stderr
    assert "peak n/a" in made.stdout, made.stdout
    applied = run_cli("apply", base, tmp_path / "delta", tmp_path / "out", prelude=HIDE)
    assert applied.returncode == 0, applied.stderr
    assert "peak mem  n/a" in applied.stdout, applied.stdout

    make_delta(base, target, tmp_path / "delta-normal")
    apply_delta(base, tmp_path / "delta-normal", tmp_path / "out-normal")
    for ours, normal in (("delta", "delta-normal"), ("out", "out-normal")):
        names = sorted(p.name for p in (tmp_path / normal).iterdir())
        assert sorted(p.name for p in (tmp_path / ours).iterdir()) == names
        for name in set(names) - {"deltamerge-result.json"}:  # it names the delta folder
            assert (tmp_path / ours / name).read_bytes() == (tmp_path / normal / name).read_bytes(), name
    assert_states_equal(load_state(tmp_path / "out"), load_state(tmp_path / "out-normal"))


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_lock_refuses_a_second_writer_without_fcntl(tmp_path: Path, models) -> None:
    base, target = models
    args = ["deltamerge", "make-delta", str(base), str(target), str(tmp_path / "delta"), "-q"]
    first = subprocess.Popen(
        [sys.executable, "-c", f"{HIDE}\nimport runpy\nsys.argv = {args!r}\n"
                               "runpy.run_module('deltamerge', run_name='__main__')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DELTAMERGE_STOP_AT": "locked"})
    try:
        deadline = time.monotonic() + 120
        while not _stopped(first.pid):
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the run never took its lock"
            time.sleep(0.02)
        second = run_cli(*args[1:], prelude=HIDE)
        assert second.returncode == 2, second.stderr
        holder = f"another deltamerge run is writing it (pid {first.pid}: deltamerge make-delta"
        assert holder in second.stderr, second.stderr
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert not (tmp_path / ".delta.deltamerge-lock").exists()


# --- the typed public API ----------------------------------------------------------------------


def _static_exports() -> dict[str, str]:
    """The names ``if TYPE_CHECKING:`` imports in deltamerge/__init__.py, and from which module."""
    tree = ast.parse((Path(deltamerge.__file__)).read_text())
    (block,) = [n for n in tree.body
                if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
    return {alias.name: node.module for node in block.body
            if isinstance(node, ast.ImportFrom) and node.level == 1 for alias in node.names}


def test_static_imports_are_the_lazy_exports() -> None:
    """What type checkers see is what ``deltamerge.NAME`` gives, from the same module."""
    assert _static_exports() == deltamerge._EXPORTS
    assert sorted(deltamerge.__all__) == sorted(["__version__", *deltamerge._EXPORTS])
    for name, module in deltamerge._EXPORTS.items():
        assert getattr(deltamerge, name) is getattr(importlib.import_module(f"deltamerge.{module}"), name)


def test_no_public_name_is_also_a_submodule() -> None:
    """A submodule named like a function would replace it on the package when imported; the
    package is a plain module (no ``__class__`` swap guarding against that)."""
    submodules = {m.name for m in pkgutil.iter_modules(deltamerge.__path__)}
    assert not submodules & set(deltamerge._EXPORTS)
    code = ("import deltamerge.make, deltamerge.conversion, deltamerge.apply, types, sys\n"
            "from deltamerge import apply_delta, convert, make_delta\n"
            "assert type(sys.modules['deltamerge']) is types.ModuleType\n"
            "assert all(callable(f) and not isinstance(f, types.ModuleType)"
            " for f in (apply_delta, convert, make_delta))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


ERRORS = [name for name, value in vars(errors).items()
          if isinstance(value, type) and issubclass(value, errors.DeltaMergeError)]


def test_every_public_error_is_in_deltamerge_errors() -> None:
    exported = {n for n in deltamerge._EXPORTS if n.endswith("Error")} | {"InterruptedRun"}
    for name in exported | {"PushError", "HubAuthError", "NotCachedError", "OutputTakenError"}:
        assert name in ERRORS, name
    assert issubclass(errors.NotFoundError, FileNotFoundError)
    assert issubclass(errors.FormatError, ValueError)
    # The older homes still give the same classes.
    from deltamerge.sinks.folder import OutputTakenError
    from deltamerge.sources.hub import HubAuthError, NotCachedError
    assert (HubAuthError, NotCachedError, OutputTakenError) == (
        errors.HubAuthError, errors.NotCachedError, errors.OutputTakenError)


def test_builtin_catches_work(tmp_path: Path, models) -> None:
    """A caller who knows only the standard library still catches a missing folder and a bad file."""
    with pytest.raises(FileNotFoundError) as missing:
        deltamerge.checksum(tmp_path / "nowhere")
    assert isinstance(missing.value, errors.NotFoundError) and missing.value.exit_code == 2
    assert str(tmp_path / "nowhere") in str(missing.value)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"{not json}      ")
    with pytest.raises(ValueError) as malformed:
        deltamerge.inspect(bad)
    assert isinstance(malformed.value, errors.FormatError) and malformed.value.exit_code == 2
    assert "model.safetensors" in str(malformed.value)

    proc = run_cli("checksum", tmp_path / "nowhere")
    assert proc.returncode == 2, proc.stderr
