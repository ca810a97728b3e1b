"""The demo runs in a plain install of deltamerge, which has neither numpy nor safetensors, so
its example builder must need neither (safetensors' ``save_file`` imports numpy)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import torch
from helpers import ROOT, assert_states_equal, load_state

SCRIPT = ROOT / "scripts" / "make_example.py"
HIDE = "import sys; sys.modules['numpy'] = None; sys.modules['safetensors'] = None"


def test_example_builder_needs_no_numpy_and_writes_what_readers_read(tmp_path: Path):
    child = (f"{HIDE}\nimport runpy\nsys.argv = ['make_example.py', {str(tmp_path)!r}]\n"
             f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nor torch's warning that it found no numpy

    example = runpy.run_path(str(SCRIPT))
    base = example["state"](0, example["VOCAB"])
    target = example["state"](1, example["VOCAB"] + 1, base)
    assert_states_equal(load_state(tmp_path / "base"), base)
    assert_states_equal(load_state(tmp_path / "target"), target)  # read by safetensors itself
    assert target["lm_head.weight"].dtype == torch.float16
