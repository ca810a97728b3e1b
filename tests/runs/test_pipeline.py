"""The threaded pipeline: the same bytes as a single-threaded run, and clean failure in any stage."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from helpers import FFN, HIDDEN, LAYERS, assert_states_equal, llama_state, load_state, save_checkpoint
from safetensors.torch import save_file

import deltamerge
from deltamerge.engine import Engine
from deltamerge.errors import WorkError
from deltamerge.sinks.folder import partial_dir


def lora_adapter(folder: Path, rank: int = 4) -> Path:
    """A PEFT-format adapter written by hand: the files peft saves, random factors."""
    g = torch.Generator().manual_seed(9)
    shapes = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "down_proj": (HIDDEN, FFN)}
    tensors = {}
    for i in range(LAYERS):
        for module, (out_dim, in_dim) in shapes.items():
            part = "mlp" if module == "down_proj" else "self_attn"
            key = f"base_model.model.model.layers.{i}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 8, "bias": "none",
        "target_modules": list(shapes), "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
    }))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    base = save_checkpoint(llama_state(0), root / "base", shard_bytes=40_000)
    target = {n: (t.float() + 0.01).half() for n, t in llama_state(0).items()}
    save_checkpoint(target, root / "target", "bin")
    deltamerge.make_delta(base, root / "target", root / "add", max_shard_size=50_000)
    deltamerge.make_delta(base, root / "target", root / "xor", kind="xor")
    return {"base": base, "add": root / "add", "xor": root / "xor",
            "lora": lora_adapter(root / "lora")}


@pytest.mark.parametrize("kind", ["add", "xor", "lora"])
def test_pipelined_output_equals_single_threaded(tmp_path: Path, world, kind: str):
    outs = {}
    for workers in (1, 4):
        outs[workers] = tmp_path / f"out{workers}"
        deltamerge.apply_delta(world["base"], world[kind], outs[workers], workers=workers,
                               block_size=3000, max_shard_size=60_000)
    assert_states_equal(load_state(outs[1]), load_state(outs[4]))
    for f in outs[1].iterdir():
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (outs[4] / f.name).read_bytes(), f.name


def test_pipelined_make_delta_equals_single_threaded(tmp_path: Path, world):
    a = deltamerge.make_delta(world["base"], world["base"].parent / "target", tmp_path / "a",
                              workers=1)
    b = deltamerge.make_delta(world["base"], world["base"].parent / "target", tmp_path / "b",
                              workers=3)
    assert (a.result_digest, a.mismatched_elements) == (b.result_digest, b.mismatched_elements)
    assert (tmp_path / "a/deltamerge.json").read_text() == (tmp_path / "b/deltamerge.json").read_text()


@pytest.mark.parametrize("stage", ["_read", "_check", "_compute", "_write", "_seal"])
def test_an_exception_in_any_stage_stops_the_others_and_leaves_no_out(
    tmp_path: Path, world, monkeypatch, stage: str
):
    original = getattr(Engine, stage)
    calls = {"n": 0}

    def failing(self, block):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError(f"injected failure in {stage}")
        return original(self, block)

    monkeypatch.setattr(Engine, stage, failing)
    threads_before = threading.active_count()
    out = tmp_path / "out"
    with pytest.raises(WorkError, match=f"injected failure in {stage}") as raised:
        deltamerge.apply_delta(world["base"], world["add"], out, workers=4, block_size=3000)
    assert "--resume" in str(raised.value)
    assert not out.exists()
    assert threading.active_count() == threads_before
    assert partial_dir(out).is_dir()  # kept for --resume, as after any failed work


def test_pipelined_delta_file_hashing_checks_large_files(tmp_path: Path):
    """Delta files over 1 MiB are hashed from the merge's own reads, in a stage of their own."""
    from deltamerge.errors import VerificationError

    base = save_checkpoint(llama_state(0, vocab=6000), tmp_path / "base")
    target = {n: (t.float() + 0.01).half() for n, t in llama_state(0, vocab=6000).items()}
    save_checkpoint(target, tmp_path / "target")
    deltamerge.make_delta(base, tmp_path / "target", tmp_path / "delta")
    shard = tmp_path / "delta/model.safetensors"
    assert shard.stat().st_size > 1 << 20
    assert deltamerge.apply_delta(base, tmp_path / "delta", tmp_path / "ok", workers=4).verified
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors"):
        deltamerge.apply_delta(base, tmp_path / "delta", tmp_path / "bad", workers=4)
    assert not (tmp_path / "bad").exists()
