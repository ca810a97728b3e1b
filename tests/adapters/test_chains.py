"""Several deltas in one pass: each step rounds as merging them one after the other does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_state, run_in_process
from lora_factors import SMALL_BLOCK, assert_matches, make_adapter, peft_merge, tiny_llama
from safetensors.torch import load_file

from deltamerge import apply_delta, make_delta

Q = "model.layers.0.self_attn.q_proj"


def _two_adapters(base: Path, dtype: torch.dtype, root: Path) -> tuple[Path, Path]:
    first = make_adapter(base, dtype, root / "first", seed=1, r=8, lora_alpha=16,
                         target_modules=["q_proj", "v_proj", "down_proj"],
                         modules_to_save=["lm_head"])
    second = make_adapter(base, dtype, root / "second", seed=2, r=4, lora_alpha=8,
                          target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=True)
    return first, second


def _delta(adapter: Path, module: str, scale: float) -> torch.Tensor:
    state = load_file(adapter / "adapter_model.safetensors")
    a = state[f"base_model.model.{module}.lora_A.weight"].float()
    b = state[f"base_model.model.{module}.lora_B.weight"].float()
    return (b @ a) * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_adapters_equal_merging_one_after_the_other(tmp_path: Path, dtype: torch.dtype) -> None:
    base = tiny_llama(tmp_path / "base", dtype)
    first, second = _two_adapters(base, dtype, tmp_path)
    reference = peft_merge(base, dtype, [first, second])
    result = apply_delta(base, [first, second], tmp_path / "out", block_size=SMALL_BLOCK)
    assert result.kinds == ["lora", "lora"]
    assert_matches(tmp_path / "out", reference)

    # The test has teeth: adding both products before one rounding gives other bits.
    w = load_file(base / "model.safetensors")[f"{Q}.weight"].float()
    once = (w + _delta(first, Q, 2.0) + _delta(second, Q, 8 / 2)).to(dtype)
    assert not torch.equal(once, reference[f"{Q}.weight"])


def test_chain_from_the_command_line(tmp_path: Path) -> None:
    base = tiny_llama(tmp_path / "base", torch.float16)
    first, second = _two_adapters(base, torch.float16, tmp_path)
    done = run_in_process("apply", base, first, second, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "(kind: lora, lora)" in done.stdout
    assert_matches(tmp_path / "out", peft_merge(base, torch.float16, [first, second]))


def test_xor_delta_then_adapter(tmp_path: Path) -> None:
    """An adapter trained on a model published as a XOR delta: rebuild and merge in one pass."""
    base = tiny_llama(tmp_path / "base", torch.float16, seed=0)
    target = tiny_llama(tmp_path / "target", torch.float16, seed=1)
    make_delta(base, target, tmp_path / "xor", kind="xor")
    adapter = make_adapter(target, torch.float16, tmp_path / "adapter", r=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "embed_tokens"])
    result = apply_delta(base, [tmp_path / "xor", adapter], tmp_path / "out", block_size=SMALL_BLOCK)
    assert result.kinds == ["xor", "lora"]
    assert_matches(tmp_path / "out", peft_merge(target, torch.float16, [adapter]))
    assert set(load_state(tmp_path / "out")) == set(load_state(target))
