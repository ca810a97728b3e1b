"""numpy is not among deltamerge's dependencies (torch does not pull it in either), so nothing
may need it: a plain ``pip install deltamerge`` has no numpy. The test extras do install it
(transformers needs it), so the child process here hides it before anything imports torch.
torch warns on import when it finds no numpy; deltamerge's commands must not pass that on."""

from __future__ import annotations

from pathlib import Path

from helpers import assert_states_equal, llama_state, load_state, run_cli, save_checkpoint

import deltamerge

HIDE_NUMPY = "import sys; sys.modules['numpy'] = None"


def test_apply_checksum_and_make_delta_run_without_numpy(tmp_path: Path):
    base = save_checkpoint(llama_state(0), tmp_path / "base", shard_bytes=60_000)
    target = save_checkpoint({n: (t.float() + 0.01).half() for n, t in llama_state(0).items()},
                             tmp_path / "target", "bin")
    proc = run_cli("make-delta", base, target, tmp_path / "delta", "-q", prelude=HIDE_NUMPY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    proc = run_cli("apply", base, tmp_path / "delta", tmp_path / "out", "--workers", "2",
                   prelude=HIDE_NUMPY)
    assert proc.returncode == 0, proc.stderr
    assert "matches the publisher's result" in proc.stdout + proc.stderr
    assert "NumPy" not in proc.stderr and "Warning" not in proc.stderr
    proc = run_cli("checksum", tmp_path / "out", prelude=HIDE_NUMPY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert deltamerge.checksum(tmp_path / "out").model_digest in proc.stdout
    deltamerge.apply_delta(base, tmp_path / "delta", tmp_path / "reference")
    assert_states_equal(load_state(tmp_path / "out"), load_state(tmp_path / "reference"))
