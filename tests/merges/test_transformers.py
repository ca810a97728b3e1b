"""The real client proves the output: transformers loads it and computes the same logits."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import llama_config, llama_state, save_checkpoint

import deltamerge


def test_result_loads_and_matches_reference_logits(tmp_path: Path):
    transformers = __import__("transformers")
    base, delta = llama_state(0, torch.float32), llama_state(1, torch.float32, scale=0.01)
    save_checkpoint(base, tmp_path / "base", "bin", shard_bytes=40_000,
                    config=llama_config(dtype="float32"))
    save_checkpoint(delta, tmp_path / "delta", config=llama_config(dtype="float32"))
    deltamerge.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out",
                           max_shard_size=60_000)
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reference_state = {n: base[n] + delta[n] for n in base}
    save_checkpoint(reference_state, tmp_path / "reference", config=llama_config(dtype="float32"))
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "reference", dtype=torch.float32
    )
    ids = torch.tensor([[1, 5, 9, 42, 77, 3]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, reference(ids).logits)
