"""peft's AdaLoRA, OFT, BOFT and HRA adapters, compared bit for bit with merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import peft.tuners.boft.layer as boft_layer
import pytest
import test_peft_types
import torch
from peft import AdaLoraConfig, BOFTConfig, HRAConfig, OFTConfig
from test_kinds_lora import SMALL_BLOCK, VOCAB, assert_matches, peft_merge
from test_peft_types import bases, make  # noqa: F401 - bases is a fixture
from transformers import GemmaConfig, GemmaForCausalLM, LlamaForCausalLM

from deltamerge import apply_delta
from deltamerge.kinds.detect import detect_kind

PARTS = ("oft_R", "oft_embedding_R", "boft_", "hra_u")
# type -> a config for the tiny LLaMA (hidden 64, ffn 172) and one for the tiny Gemma (32, 64)
CONFIGS = {
    "adalora": (
        # training kept 2 of q_proj's 4 ranks in layer 0, none of down_proj's in layer 1
        lambda: AdaLoraConfig(
            init_r=4, lora_alpha=16, total_step=10, target_modules=["q_proj", "down_proj"],
            rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, True],
                          "model.layers.1.mlp.down_proj.lora_E": [False] * 4}),
        lambda: AdaLoraConfig(init_r=3, lora_alpha=0, total_step=10, target_modules=["k_proj", "up_proj"]),
    ),
    "oft": (
        # block 16 does not divide down_proj's 172 inputs: peft adjusts it to 4
        lambda: OFTConfig(oft_block_size=16, target_modules=["q_proj", "down_proj", "embed_tokens"]),
        lambda: OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, block_share=True,
                          target_modules=["k_proj", "up_proj", "embed_tokens"]),
    ),
    "oft-coft": (
        lambda: OFTConfig(oft_block_size=8, coft=True, eps=0.5, num_cayley_neumann_terms=7,
                          target_modules=["o_proj", "gate_proj"]),
        lambda: OFTConfig(r=2, oft_block_size=0, coft=True, eps=0.5, use_cayley_neumann=False,
                          target_modules=["k_proj", "v_proj", "down_proj"]),
    ),
    "boft": (
        lambda: BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        lambda: BOFTConfig(boft_block_size=0, boft_block_num=4,
                           target_modules=["k_proj", "o_proj", "up_proj"]),
    ),
    "hra": (
        lambda: HRAConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"]),
        lambda: HRAConfig(r=3, apply_GS=True, target_modules=["k_proj", "gate_proj", "o_proj"]),
    ),
}
CASES = [(w, m, d) for w in CONFIGS for m in ("llama", "gemma")
         for d in (torch.float16, torch.bfloat16)] + [(w, "llama", torch.float32) for w in CONFIGS]


@pytest.fixture(autouse=True)
def _randomize_ours(monkeypatch) -> None:
    """test_peft_types' ``make`` randomizes these types' parameters too; BOFT does not try to
    build its CUDA extension (on CPU it fails, slowly, and peft goes on without it)."""
    monkeypatch.setattr(test_peft_types, "ADAPTER_PARTS", (*test_peft_types.ADAPTER_PARTS, *PARTS))
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory) -> dict[torch.dtype, Path]:
    """Tiny Gemmas (tied embeddings); k_proj has 8 rows, fewer than a rotation's padded piece."""
    root = tmp_path_factory.mktemp("gemma")
    torch.manual_seed(0)
    config = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                         vocab_size=VOCAB)
    model = GemmaForCausalLM(config)
    found = {}
    for dtype in (torch.float16, torch.bfloat16):
        found[dtype] = root / str(dtype).removeprefix("torch.")
        model.to(dtype).save_pretrained(found[dtype], safe_serialization=True)
    return found


@pytest.mark.parametrize(("which", "model", "dtype"), CASES,
                         ids=[f"{w}-{m}-{str(d).removeprefix('torch.')}" for w, m, d in CASES])
def test_merge_matches_peft(tmp_path: Path, bases, gemmas, which: str, model: str,  # noqa: F811
                            dtype: torch.dtype) -> None:
    base, cls = (bases[dtype], LlamaForCausalLM) if model == "llama" else (gemmas[dtype], GemmaForCausalLM)
    config = CONFIGS[which][model == "gemma"]()
    adapter = make(base, dtype, config, tmp_path / "adapter", cls=cls)
    assert detect_kind(adapter, None) == which.split("-")[0]
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, [adapter], cls=cls))
