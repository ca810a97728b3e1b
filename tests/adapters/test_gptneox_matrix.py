"""Every adapter type on GPT-NeoX (Pythia), fp16 and bf16, bit for bit peft's merge_and_unload.

GPT-NeoX's attention is one fused ``query_key_value`` (96 x 32 here), its MLP one wider
(``dense_h_to_4h``, 64 x 32) and one taller than wide (``dense_4h_to_h``, 32 x 64), every Linear
with a bias, and its output embedding ``embed_out`` (which transformers 5's state_dict calls
``lm_head``). The other test files put AdaLoRA, OFT, BOFT and HRA (fp16), IA3 (both), DoRA
(bf16) and LoRA (fp16) on it; this one adds the rest: each type a configuration with the fused
qkv among its targets, at both dtypes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import load_state
from lora_factors import ADAPTER_PARTS, SMALL_BLOCK, assert_matches, make_random, peft_merge, with_biases
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    C3AConfig,
    FourierFTConfig,
    HRAConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    MissConfig,
    OFTConfig,
    RandLoraConfig,
    ShiraConfig,
    TrainableTokensConfig,
    VeraConfig,
)
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from deltamerge import apply_delta
from deltamerge.kinds.detect import detect_kind

QKV, UP, DOWN, DENSE = "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "attention.dense"
# The parameters peft starts at zero or identity, made random (lora_factors' and the newer types').
PARTS = (*ADAPTER_PARTS, "fourierft_spectrum", "randlora_lambda", "randlora_gamma", "miss_block",
         "shira_weight", "c3a_kernel", "oft_R", "boft_R", "boft_s", "hra_u")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

CONFIGS = {  # type -> (its kind, a configuration on GPT-NeoX), the dtypes not covered elsewhere
    "lora": ("lora", ["bfloat16"], lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                      target_modules=[QKV, DENSE, DOWN],
                                                      rank_pattern={DOWN: 2})),
    "dora": ("lora", ["float16"], lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                     target_modules=[QKV, UP, DOWN])),
    "adalora": ("adalora", ["bfloat16"], lambda: AdaLoraConfig(init_r=4, lora_alpha=8, total_step=10,
                                                               target_modules=[QKV, DOWN])),
    "oft": ("oft", ["bfloat16"], lambda: OFTConfig(oft_block_size=8, target_modules=[QKV, UP])),
    "boft": ("boft", ["bfloat16"], lambda: BOFTConfig(boft_block_size=8, target_modules=[QKV, DENSE])),
    "hra": ("hra", ["bfloat16"], lambda: HRAConfig(r=2, target_modules=[QKV, DOWN])),
    "loha": ("loha", list(DTYPES), lambda: LoHaConfig(r=4, alpha=8, target_modules=[QKV, DOWN])),
    "lokr": ("lokr", list(DTYPES), lambda: LoKrConfig(r=2, alpha=4, target_modules=[QKV, UP],
                                                      decompose_both=True, decompose_factor=4)),
    "vera": ("vera", list(DTYPES), lambda: VeraConfig(r=8, target_modules=[QKV, DOWN, UP])),
    "fourierft": ("fourierft", list(DTYPES), lambda: FourierFTConfig(
        target_modules=[QKV, DOWN], n_frequency=40, scaling=30.0, random_loc_seed=5)),
    "randlora": ("randlora", list(DTYPES), lambda: RandLoraConfig(r=8, randlora_alpha=20,
                                                                  target_modules=[QKV, DOWN, UP])),
    "miss": ("miss", list(DTYPES), lambda: MissConfig(r=6, target_modules=[QKV, DOWN])),
    "shira": ("shira", list(DTYPES), lambda: ShiraConfig(r=2, random_seed=4, target_modules=[QKV, UP])),
    "c3a": ("c3a", list(DTYPES), lambda: C3AConfig(block_size=8, target_modules=[QKV, DOWN])),
    "trainable-tokens": ("trainable-tokens", list(DTYPES), lambda: TrainableTokensConfig(
        target_modules=["embed_in"], token_indices=[5, 0, 63, 40])),
}
CASES = [(which, dtype) for which, (_, dtypes, _) in CONFIGS.items() for dtype in dtypes]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("neox")
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=64)
    found = {}
    for name, dtype in DTYPES.items():
        torch.manual_seed(0)
        found[name] = root / name
        model = with_biases(GPTNeoXForCausalLM(config)).to(dtype)
        model.save_pretrained(found[name], safe_serialization=True)
    return found


def make(base: Path, dtype: torch.dtype, config, out: Path, seed: int = 1) -> Path:
    return make_random(base, dtype, config, out, PARTS, GPTNeoXForCausalLM, seed)


@pytest.mark.parametrize(("which", "dtype"), CASES, ids=[f"{w}-{d}" for w, d in CASES])
def test_merge_matches_peft(tmp_path: Path, bases, which: str, dtype: str) -> None:
    kind, _, config = CONFIGS[which]
    base = bases[dtype]
    adapter = make(base, DTYPES[dtype], config(), tmp_path / "adapter")
    assert detect_kind(adapter, None) == kind
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    reference = peft_merge(base, DTYPES[dtype], [adapter], cls=GPTNeoXForCausalLM)
    reference["embed_out.weight"] = reference.pop("lm_head.weight")  # transformers 5's name
    assert_matches(tmp_path / "out", reference)
    merged, before = load_state(tmp_path / "out"), load_state(base)
    target = ("gpt_neox.embed_in.weight" if kind == "trainable-tokens"
              else f"gpt_neox.layers.0.attention.{QKV}.weight")
    assert not torch.equal(merged[target], before[target])  # the adapter changed what it targets
