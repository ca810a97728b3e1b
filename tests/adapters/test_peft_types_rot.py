"""peft's AdaLoRA, OFT, BOFT and HRA adapters, compared bit for bit with merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import lora_factors
import peft.tuners.boft.layer as boft_layer
import pytest
import torch
from helpers import apply_in_process
from lora_factors import (
    SMALL_BLOCK,
    VOCAB,
    _edit_config,
    assert_matches,
    make,
    peft_merge,
    tiny_llama,
    with_biases,
)
from peft import AdaLoraConfig, BOFTConfig, HRAConfig, OFTConfig
from safetensors.torch import load_file, save_file
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
)

from deltamerge import apply_delta
from deltamerge.errors import MismatchError, UnsupportedError
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
# every type on both models in fp16 and bf16, COFT on two, an fp32 base for OFT
CASES = [(w, m, d) for w in CONFIGS if w != "oft-coft" for m in ("llama", "gemma")
         for d in (torch.float16, torch.bfloat16)]
CASES += [("oft-coft", "llama", torch.float16), ("oft-coft", "gemma", torch.bfloat16),
          ("oft", "llama", torch.float32)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {d: tiny_llama(root / str(d).removeprefix("torch."), d)
            for d in (torch.float16, torch.bfloat16, torch.float32)}


@pytest.fixture(autouse=True)
def _randomize_ours(monkeypatch) -> None:
    """test_peft_types' ``make`` randomizes these types' parameters too; BOFT does not try to
    build its CUDA extension (on CPU it fails, slowly, and peft goes on without it)."""
    monkeypatch.setattr(lora_factors, "ADAPTER_PARTS", (*lora_factors.ADAPTER_PARTS, *PARTS))
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
    # Gemma fp16: blocks of a few rows, padded to the rotations' 16 (and its 8-row k_proj one
    # block); else a block holds whole tensors (tiny products are slow on a busy machine's two
    # MKL threads)
    block = SMALL_BLOCK if (model, dtype) == ("gemma", torch.float16) else 50_000
    apply_delta(base, adapter, tmp_path / "out", block_size=block)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, [adapter], cls=cls))


def _neox(folder: Path, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=64)
    with_biases(GPTNeoXForCausalLM(config)).to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


NEOX = {  # GPT-NeoX's fused query_key_value (96 x 32) among the targets of each type
    "adalora": lambda: AdaLoraConfig(init_r=4, lora_alpha=8, total_step=10,
                                     target_modules=["query_key_value", "dense_4h_to_h"]),
    "oft": lambda: OFTConfig(oft_block_size=8, target_modules=["query_key_value", "dense_h_to_4h"]),
    "boft": lambda: BOFTConfig(boft_block_size=8, target_modules=["query_key_value", "dense"]),
    "hra": lambda: HRAConfig(r=2, target_modules=["query_key_value", "dense_4h_to_h"]),
}


@pytest.mark.parametrize("which", list(NEOX))
def test_gpt_neox_fused_qkv(tmp_path: Path, which: str) -> None:
    dtype, cls = torch.float16, GPTNeoXForCausalLM
    base = _neox(tmp_path / "base", dtype)
    adapter = make(base, dtype, NEOX[which](), tmp_path / "adapter", cls=cls)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    reference = peft_merge(base, dtype, [adapter], cls=cls)
    reference["embed_out.weight"] = reference.pop("lm_head.weight")  # transformers 5's name
    assert_matches(tmp_path / "out", reference)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
def test_types_chain_in_one_pass(tmp_path: Path, bases, dtype: torch.dtype) -> None:  # noqa: F811
    """One adapter of each type on the same modules, merged in one pass as peft merges in turn."""
    base = bases[dtype]
    adapters = [make(base, dtype, CONFIGS[w][0](), tmp_path / w, seed=i)
                for i, w in enumerate(("oft", "adalora", "hra", "boft"))]
    apply_delta(base, adapters, tmp_path / "out", block_size=50_000)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, adapters))


@pytest.mark.parametrize("which", ("oft", "boft", "hra"))
def test_rotations_bits_do_not_depend_on_threads(tmp_path: Path, bases, which: str) -> None:  # noqa: F811
    """The rotations' rows go to the pool's threads in pieces (at least 16 rows each, the last
    one padded): one thread, two and five give peft's bytes. Blocks of 37 rows of the 64-wide
    projections cut them unevenly, so pieces of 19/18, 16/16/5 rows occur."""
    base = bases[torch.float16]
    adapter = make(base, torch.float16, CONFIGS[which][0](), tmp_path / "adapter")
    reference = peft_merge(base, torch.float16, [adapter])
    for threads in (1, 2, 5):
        apply_delta(base, adapter, tmp_path / f"out{threads}", block_size=37 * 64 * 4, threads=threads)
        assert_matches(tmp_path / f"out{threads}", reference)


def test_adalora_on_gpt2_conv1d(tmp_path: Path) -> None:
    """fan_in_fan_out: AdaLoRA's product transposed onto GPT-2's (in, out) weights."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    base = tmp_path / "base"
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(base, safe_serialization=True)
    ada = AdaLoraConfig(init_r=4, lora_alpha=8, total_step=10, target_modules=["c_attn", "c_fc"],
                        fan_in_fan_out=True)
    adapter = make(base, torch.bfloat16, ada, tmp_path / "adapter", cls=GPT2LMHeadModel)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, torch.bfloat16, [adapter], cls=GPT2LMHeadModel))


@pytest.mark.parametrize(("peft_type", "part", "shape"), [
    ("OFT", "oft_R.weight", (4, 28)), ("BOFT", "boft_R", (1, 12, 8, 8)), ("HRA", "hra_u", (32, 2))])
def test_conv1d_is_refused(tmp_path: Path, peft_type: str, part: str, shape: tuple) -> None:
    """peft's OFT, BOFT and HRA do not adapt GPT-2's Conv1D: one line naming file and tensor."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    base = tmp_path / "base"
    GPT2LMHeadModel(config).to(torch.float16).save_pretrained(base, safe_serialization=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": peft_type, "target_modules": ["c_attn"], "r": 2 if peft_type == "HRA" else 4,
         "oft_block_size": 0, "boft_block_size": 8}))
    module = "base_model.model.transformer.h.0.attn.c_attn"
    tensors = {f"{module}.{part}": torch.zeros(shape), f"{module}.boft_s": torch.ones(96, 1)}
    save_file({k: v for k, v in tensors.items() if peft_type == "BOFT" or "boft_s" not in k},
              adapter / "adapter_model.safetensors")
    code, err = apply_in_process(base, adapter, tmp_path / "out")
    assert code == 2 and "adapter_model.safetensors" in err and "'transformer.h.0.attn.c_attn.weight'" in err
    assert "Conv1D" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_boft_butterfly_factors_are_refused(tmp_path: Path, bases) -> None:  # noqa: F811
    """Several butterfly factors need peft's CUDA extension; peft on CPU cannot load them."""
    base = bases[torch.float16]
    adapter = make(base, torch.float16, CONFIGS["boft"][0](), tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    state = {k: v.repeat(2, 1, 1, 1) if k.endswith("boft_R") else v for k, v in state.items()}
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match="holds 2 butterfly factors"):
        apply_delta(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", [True, False])
def test_hra_target_without_u_is_refused(tmp_path: Path, bases, init: bool) -> None:  # noqa: F811
    """peft starts a selected module without ``hra_u`` at random u: its merge is not the base."""
    base = bases[torch.float16]
    adapter = make(base, torch.float16, HRAConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    _edit_config(adapter, {"target_modules": ["q_proj", "v_proj"], "init_weights": init})
    with pytest.raises(MismatchError, match="'model.layers.0.self_attn.v_proj' but the adapter has no"):
        apply_delta(base, adapter, tmp_path / "out")
