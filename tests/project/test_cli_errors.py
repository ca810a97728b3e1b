"""What a user sees when something is wrong: one line, the documented exit status, no OUT.

The commands run through click in this process (``run_in_process``: the same handling and exit
statuses, no second torch import); test_missing_tensor runs the real process, whose stderr
holds whatever a library writes to the file descriptor too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import llama_state, one_line, run_cli, run_in_process, save_checkpoint


def no_output_left(out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    state = llama_state(1)
    return base, state


def test_missing_tensor(tmp_path: Path, pair):
    base, state = pair
    del state["model.layers.1.mlp.up_proj.weight"]
    delta = save_checkpoint(state, tmp_path / "delta")
    proc = run_cli("apply", base, delta, tmp_path / "out")
    one_line(proc, 2, "model.layers.1.mlp.up_proj.weight", "not in the delta")
    no_output_left(tmp_path / "out")


def test_tensor_only_in_the_delta(tmp_path: Path, pair):
    base, state = pair
    state["model.extra.weight"] = state["model.norm.weight"].clone()
    delta = save_checkpoint(state, tmp_path / "delta")
    proc = run_in_process("apply", base, delta, tmp_path / "out")
    one_line(proc, 2, "model.extra.weight", "not in the base")
    no_output_left(tmp_path / "out")


def test_shape_mismatch_names_both_shapes(tmp_path: Path, pair):
    base, state = pair
    state["model.layers.0.mlp.gate_proj.weight"] = state["model.layers.0.mlp.gate_proj.weight"][:100]
    delta = save_checkpoint(state, tmp_path / "delta", "bin")
    proc = run_in_process("apply", base, delta, tmp_path / "out")
    one_line(proc, 2, "gate_proj", "[100, 64]", "[172, 64]")
    no_output_left(tmp_path / "out")


def test_fewer_vocabulary_rows_is_an_error(tmp_path: Path):
    base = save_checkpoint(llama_state(0, vocab=96), tmp_path / "base")
    delta = save_checkpoint(llama_state(1, vocab=95), tmp_path / "delta")
    proc = run_in_process("apply", base, delta, tmp_path / "out")
    one_line(proc, 2, "[95, 64]", "[96, 64]", "in the base")


def test_existing_out_is_refused_unless_force(tmp_path: Path, pair):
    base, state = pair
    delta = save_checkpoint(state, tmp_path / "delta")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_in_process("apply", base, delta, out)
    one_line(proc, 2, str(out), "--force")
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_in_process("apply", base, delta, out, "--force", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_path_that_does_not_exist(tmp_path: Path, pair):
    base, _ = pair
    proc = run_in_process("apply", base, tmp_path / "no-such-delta", tmp_path / "out")
    one_line(proc, 2, "no-such-delta", "no such folder")
    no_output_left(tmp_path / "out")


def test_bad_usage_exits_2(tmp_path: Path, pair):
    base, _ = pair
    proc = run_in_process("apply", base, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_inputs_are_never_written(tmp_path: Path, pair):
    base, state = pair
    delta = save_checkpoint(state, tmp_path / "delta")
    before = {p: p.stat().st_mtime_ns for p in [*base.iterdir(), *delta.iterdir()]}
    proc = run_in_process("apply", base, delta, base, "--force")
    one_line(proc, 2, "input folder")
    assert {p: p.stat().st_mtime_ns for p in [*base.iterdir(), *delta.iterdir()]} == before


def test_success_prints_a_summary(tmp_path: Path, pair):
    base, state = pair
    delta = save_checkpoint(state, tmp_path / "delta")
    proc = run_in_process("apply", base, delta, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    for word in ("tensors", "peak mem", "digest", "kind: add"):
        assert word in proc.stdout


def test_version_and_help():
    proc = run_in_process("--version")
    assert proc.returncode == 0 and "deltamerge" in proc.stdout
    for cmd in ("apply", "make-delta"):
        proc = run_in_process(cmd, "--help")
        assert proc.returncode == 0 and "Example" in proc.stdout
