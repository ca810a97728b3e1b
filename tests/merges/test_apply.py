"""apply and make-delta for additive deltas: bit-exact arithmetic in every format pairing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_states_equal,
    llama_config,
    llama_state,
    load_state,
    save_checkpoint,
)

import deltamerge
from deltamerge.integrity.digest import model_digest


def expected_add(base, delta, dtype):
    return {n: (base[n].float() + delta[n].float()).to(dtype) for n in delta}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "base_fmt,delta_fmt",
    [
        ("safetensors", "safetensors"),
        ("safetensors", "bin"),
        ("bin", "safetensors"),
        ("bin", "bin"),
    ],
)
def test_apply_is_fp32_add_rounded(tmp_path: Path, dtype, base_fmt, delta_fmt):
    base, delta = llama_state(0, dtype), llama_state(1, dtype, scale=0.01)
    save_checkpoint(base, tmp_path / "base", base_fmt, shard_bytes=20_000)
    save_checkpoint(delta, tmp_path / "delta", delta_fmt, shard_bytes=33_000)
    result = deltamerge.apply_delta(
        tmp_path / "base",
        tmp_path / "delta",
        tmp_path / "out",
        max_shard_size=40_000,
        block_size=4096,
    )
    assert_states_equal(load_state(tmp_path / "out"), expected_add(base, delta, dtype))
    assert len(result.shards) > 1 and (tmp_path / "out/model.safetensors.index.json").is_file()
    assert result.tensors == len(delta)


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16", "float32"])
def test_dtype_option_rounds_fp32_sum_once(tmp_path: Path, out_dtype):
    base, delta = llama_state(0, torch.float32), llama_state(1, torch.float16, scale=0.01)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(delta, tmp_path / "delta")
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out", dtype=out_dtype)
    target = getattr(torch, out_dtype)
    assert_states_equal(load_state(tmp_path / "out"), expected_add(base, delta, target))


def test_default_dtype_is_the_deltas(tmp_path: Path):
    base, delta = llama_state(0, torch.float32), llama_state(1, torch.bfloat16)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(delta, tmp_path / "delta")
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    out = load_state(tmp_path / "out")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}


def test_pipelined_equals_single_threaded(tmp_path: Path):
    base, delta = llama_state(0), llama_state(1)
    save_checkpoint(base, tmp_path / "base", shard_bytes=30_000)
    save_checkpoint(delta, tmp_path / "delta", "bin")
    for workers in (1, 3):
        deltamerge.apply_delta(
            tmp_path / "base",
            tmp_path / "delta",
            tmp_path / f"out{workers}",
            workers=workers,
            block_size=2048,
            max_shard_size=50_000,
        )
    assert_states_equal(load_state(tmp_path / "out1"), load_state(tmp_path / "out3"))
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == sorted(
        p.name for p in (tmp_path / "out3").iterdir()
    )


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_v0_delta_with_an_extra_vocabulary_row(tmp_path: Path, mode):
    base = llama_state(0, vocab=96)
    delta = llama_state(1, vocab=97, scale=0.01)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(delta, tmp_path / "delta", "bin", shard_bytes=30_000)
    deltamerge.apply_delta(
        tmp_path / "base",
        tmp_path / "delta",
        tmp_path / "out",
        new_rows=mode,
        block_size=1024,
    )
    out = load_state(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        b = base[name].float()
        new = (
            torch.zeros(1, b.shape[1])
            if mode == "zero"
            else b.mean(dim=0, keepdim=True)  # Alpaca's, on the base loaded in fp32
        )
        extended = torch.cat([b, new])
        assert out[name].shape == (97, 64)
        assert torch.equal(out[name], (extended + delta[name].float()).half()), name
        if mode == "zero":
            assert torch.equal(out[name][96], delta[name][96])
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["vocab_size"] == 97


def test_non_weight_buffers_are_copied_from_the_base(tmp_path: Path):
    base = llama_state(0, inv_freq=True)
    delta = llama_state(1)
    save_checkpoint(base, tmp_path / "base", "bin")
    save_checkpoint(delta, tmp_path / "delta")
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    out = load_state(tmp_path / "out")
    inv = [n for n in base if n.endswith("inv_freq")]
    assert inv and all(torch.equal(out[n], base[n]) for n in inv)


def test_tied_embeddings_get_the_delta_once(tmp_path: Path):
    """A .bin saved with tied weights holds one storage under two names: add once, not twice."""
    base, delta = llama_state(0), llama_state(1)
    base["lm_head.weight"] = base["model.embed_tokens.weight"]
    delta["lm_head.weight"] = delta["model.embed_tokens.weight"].clone()
    cfg = llama_config(tie_word_embeddings=True)
    (tmp_path / "base").mkdir()
    torch.save(base, tmp_path / "base/pytorch_model.bin")
    (tmp_path / "base/config.json").write_text(json.dumps(cfg))
    save_checkpoint(delta, tmp_path / "delta")
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    out = load_state(tmp_path / "out")
    once = (base["lm_head.weight"].float() + delta["lm_head.weight"].float()).half()
    assert torch.equal(out["lm_head.weight"], once)
    assert torch.equal(out["model.embed_tokens.weight"], once)


def test_non_weight_files_come_from_the_delta_else_the_base(tmp_path: Path):
    save_checkpoint(llama_state(0), tmp_path / "base")
    (tmp_path / "base/tokenizer.model").write_bytes(b"base tokenizer")
    (tmp_path / "base/generation_config.json").write_text('{"from": "base"}')
    save_checkpoint(llama_state(1), tmp_path / "delta")
    (tmp_path / "delta/tokenizer.model").write_bytes(b"delta tokenizer")
    (tmp_path / "delta/README.md").write_text("not copied")
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    assert (tmp_path / "out/tokenizer.model").read_bytes() == b"delta tokenizer"
    assert json.loads((tmp_path / "out/generation_config.json").read_text()) == {"from": "base"}
    assert not (tmp_path / "out/README.md").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_make_delta_then_apply_reproduces_the_target_but_the_reported(tmp_path: Path, dtype):
    base = llama_state(0, dtype)
    target = {
        n: (t.float() + llama_state(5, torch.float32, scale=0.002)[n]).to(dtype) for n, t in base.items()
    }
    target["model.norm.weight"] = base["model.norm.weight"] * 4  # far apart: lossy in fp16
    save_checkpoint(base, tmp_path / "base", "bin", shard_bytes=25_000)
    save_checkpoint(target, tmp_path / "target", shard_bytes=45_000)
    made = deltamerge.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    delta = load_state(tmp_path / "delta")
    assert all(delta[n].dtype == dtype for n in delta)
    applied = deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    out = load_state(tmp_path / "out")
    differing = sum(int((out[n].view(torch.int16) != target[n].view(torch.int16)).sum()) for n in target)
    assert differing == made.mismatched_elements
    assert applied.verified and applied.model_digest == made.result_digest
    assert made.elements == sum(t.numel() for t in target.values())


def test_make_delta_stores_new_rows_against_zero(tmp_path: Path):
    base = llama_state(0, vocab=96)
    target = llama_state(2, vocab=98)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(target, tmp_path / "target")
    deltamerge.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    delta = load_state(tmp_path / "delta")
    assert torch.equal(delta["lm_head.weight"][96:], target["lm_head.weight"][96:])


def test_result_digest_does_not_depend_on_layout(tmp_path: Path):
    base, delta = llama_state(0), llama_state(1)
    save_checkpoint(base, tmp_path / "base")
    save_checkpoint(delta, tmp_path / "delta")
    a = deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "a")
    b = deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "b", max_shard_size=30_000)
    assert a.model_digest == b.model_digest
    record = json.loads((tmp_path / "a/deltamerge-result.json").read_text())
    assert record["result"]["model_digest"] == a.model_digest
    assert record["algorithm"] == a.algorithm == "blake3"
    from deltamerge.integrity.manifest import parse_role

    role = parse_role(tmp_path, record["result"], "result", "blake3")
    assert model_digest(role.tensors, "blake3") == a.model_digest


def test_progress_callback_reaches_the_total(tmp_path: Path):
    save_checkpoint(llama_state(0), tmp_path / "base")
    save_checkpoint(llama_state(1), tmp_path / "delta")
    seen = []
    deltamerge.apply_delta(
        tmp_path / "base",
        tmp_path / "delta",
        tmp_path / "out",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen and seen[-1][0] == seen[-1][1] > 0
