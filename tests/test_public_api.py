"""The package's public face (issue 25): it runs where ``fcntl`` and ``resource`` do not exist,
its lazy exports agree with the ones type checkers read, and its errors are importable from one
place and caught as the builtins they also are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_states_equal, llama_state, load_state, run_cli, save_checkpoint

from deltamerge import apply_delta, make_delta

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
