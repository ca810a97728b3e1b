"""Additive, XOR and LoRA deltas on every architecture of the survey, built from transformers' own
configs at tiny sizes: additive as FastChat's apply computes it (once per stored tensor, so tied
embeddings get the delta once), XOR bit for bit, LoRA bit for bit as peft's merge_and_unload
(``target_modules="all-linear"``; on Mixtral that makes peft adapt the fused experts and the
router through ``target_parameters``). The results are read back by transformers itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_states_equal, load_state
from lora_factors import randomize_lora
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from deltamerge import apply_delta, make_delta

SMALL_BLOCK = 1000  # bytes: blocks of a few rows, so every tensor is cut
GQA = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
       "intermediate_size": 64, "vocab_size": 64, "hidden_size": 32}
ARCHS = {
    "falcon": (FalconForCausalLM, lambda: FalconConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=64)),
    "bloom": (BloomForCausalLM, lambda: BloomConfig(hidden_size=32, n_head=4, n_layer=2,
                                                    vocab_size=64)),
    "gpt-neox": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
        vocab_size=64)),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(
        n_embd=32, n_head=4, n_layer=2, vocab_size=64, n_positions=32, bos_token_id=0,
        eos_token_id=0)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**GQA)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**GQA)),
    "gemma": (GemmaForCausalLM, lambda: GemmaConfig(**GQA, head_dim=8)),
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(
        **{**GQA, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2)),
}
TIED = {"falcon", "bloom", "gpt2", "gemma"}
MOE = {"qwen2-moe": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(
    **GQA, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
    num_experts_per_tok=2))}


def save_model(name: str, folder: Path, seed: int, dtype: torch.dtype = torch.float16) -> Path:
    cls, config = {**ARCHS, **MOE}[name]
    torch.manual_seed(seed)
    cls(config()).to(dtype).save_pretrained(folder)
    return folder


def load(name: str, folder: Path, dtype: torch.dtype = torch.float16):
    return {**ARCHS, **MOE}[name][0].from_pretrained(folder, dtype=dtype)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per architecture, a base and a "fine-tuned" model (another seed), fp16 safetensors."""
    root = tmp_path_factory.mktemp("archs")
    return {n: (save_model(n, root / n / "base", 0), save_model(n, root / n / "target", 1))
            for n in ARCHS}


def assert_loads_as(name: str, folder: Path, reference: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.float16) -> None:
    """transformers reads ``folder`` back into exactly ``reference`` (tied weights tied)."""
    model = load(name, folder, dtype)
    state = model.state_dict()
    assert sorted(state) == sorted(reference)
    for key, tensor in reference.items():
        assert state[key].dtype == tensor.dtype, key
        assert torch.equal(state[key], tensor), key
    if name in TIED:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", list(ARCHS))
def test_additive_delta_is_fastchat_s_sum_once(tmp_path: Path, pairs, name: str) -> None:
    base, target = pairs[name]
    make_delta(base, target, tmp_path / "delta")
    apply_delta(base, tmp_path / "delta", tmp_path / "out", block_size=SMALL_BLOCK, workers=2)
    base_state, delta_state = load_state(base), load_state(tmp_path / "delta")
    # FastChat's `param.data += delta.state_dict()[name]`, once for each tensor the files store.
    expected = {n: base_state[n] + delta_state[n] for n in base_state}
    assert_states_equal(load_state(tmp_path / "out"), expected)

    ours = load(name, tmp_path / "out").state_dict()
    assert_loads_as(name, tmp_path / "out", ours)
    if name in TIED:
        # FastChat walks base.state_dict(), where a tied embedding appears twice: it adds the
        # delta twice to the one tensor. deltamerge adds it once, as the target has it.
        fastchat = load(name, base)
        delta_model = load(name, tmp_path / "delta").state_dict()
        for key, param in fastchat.state_dict().items():
            param.data += delta_model[key]
        key = _embedding_key(fastchat)
        twice = fastchat.get_input_embeddings().weight
        assert torch.equal(twice, ours[key] + delta_model[key])
        assert not torch.equal(twice, ours[key])


def _embedding_key(model: nn.Module) -> str:
    weight = model.get_input_embeddings().weight
    return next(k for k, v in model.state_dict().items() if v is weight or v.data_ptr() == weight.data_ptr())


@pytest.mark.parametrize("name", list(ARCHS))
def test_xor_delta_round_trips_bit_for_bit(tmp_path: Path, pairs, name: str) -> None:
    base, target = pairs[name]
    made = make_delta(base, target, tmp_path / "delta", kind="xor")
    assert made.mismatched_elements == 0
    apply_delta(base, tmp_path / "delta", tmp_path / "out", block_size=SMALL_BLOCK)
    assert_states_equal(load_state(tmp_path / "out"), load_state(target))
    assert_loads_as(name, tmp_path / "out", load(name, target).state_dict())


def make_adapter(name: str, base: Path, out: Path, dtype: torch.dtype = torch.float16,
                 seed: int = 1, **config) -> Path:
    """peft's adapter with random factors (B starts at zero, which would test nothing)."""
    model = get_peft_model(load(name, base, dtype), LoraConfig(**config))
    randomize_lora(model, seed)
    model.save_pretrained(out)
    return out


def peft_merge(name: str, base: Path, adapter: Path, dtype: torch.dtype = torch.float16) -> dict:
    model = PeftModel.from_pretrained(load(name, base, dtype), adapter).merge_and_unload()
    return model.state_dict()


@pytest.mark.parametrize("name", list(ARCHS))
def test_lora_all_linear_is_peft_s_merge(tmp_path: Path, pairs, name: str) -> None:
    base, _ = pairs[name]
    adapter = make_adapter(name, base, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules="all-linear")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if name == "mixtral":  # peft reaches Mixtral's fused experts and router as parameters
        assert {"gate_up_proj", "down_proj", "gate.weight"} <= set(config["target_parameters"])
    if name == "gpt2":
        assert config["fan_in_fan_out"]  # Conv1D
    reference = peft_merge(name, base, adapter)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK, workers=2)
    assert_loads_as(name, tmp_path / "out", reference)
    assert sorted(load_state(tmp_path / "out")) == sorted(load_state(base))  # the base's layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixtral_experts_in_other_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    base = save_model("mixtral", tmp_path / "base", 0, dtype)
    adapter = make_adapter("mixtral", base, tmp_path / "adapter", dtype, r=4, lora_alpha=8,
                           target_modules="all-linear", use_rslora=True)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_loads_as("mixtral", tmp_path / "out", peft_merge("mixtral", base, adapter, dtype), dtype)


def test_mixtral_experts_stored_fused(tmp_path: Path, pairs) -> None:
    """A checkpoint that stores the experts as transformers 5 holds them (3-D, one per layer)."""
    base = tmp_path / "fused"
    shutil.copytree(pairs["mixtral"][0], base)
    state = load("mixtral", pairs["mixtral"][0]).state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 96, 32)
    save_file({k: v.contiguous() for k, v in state.items()}, base / "model.safetensors")
    adapter = make_adapter("mixtral", pairs["mixtral"][0], tmp_path / "adapter", r=4,
                           lora_alpha=8, target_modules="all-linear")
    reference = peft_merge("mixtral", pairs["mixtral"][0], adapter)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK, workers=2)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(got) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.equal(got[key], tensor), key


def test_qwen2_moe_experts_stored_per_expert(tmp_path: Path) -> None:
    """Qwen2-MoE stores experts.{e}.gate_proj/up_proj/down_proj; peft sees them fused."""
    base = save_model("qwen2-moe", tmp_path / "base", 0)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in load_state(base)
    adapter = make_adapter("qwen2-moe", base, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj"], target_parameters=[
                               "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"])
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_loads_as("qwen2-moe", tmp_path / "out", peft_merge("qwen2-moe", base, adapter))


class Experts(nn.Module):
    def __init__(self, experts: int, d1: int, d2: int, transposed: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, d1, d2) * 0.05)
        self.is_transposed = transposed  # (experts, in, out), as peft reads such MoE layers


class Toy(nn.Module):
    """Parameters peft adapts through ParamWrapper: experts tall enough for several windows of
    the product, experts peft sees transposed, one expert, and a plain 2-D weight."""

    def __init__(self):
        super().__init__()
        self.tall = Experts(8, 700, 300, False)
        self.flipped = Experts(4, 96, 40, True)
        self.single = Experts(1, 64, 32, False)
        self.lin = nn.Linear(32, 48, bias=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_target_parameters_arithmetic_is_peft_s(tmp_path: Path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    toy = Toy().to(dtype)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in toy.state_dict().items()},
              tmp_path / "base" / "model.safetensors")
    adapter = get_peft_model(toy, LoraConfig(r=16, lora_alpha=8, target_parameters=[
        "tall.w", "flipped.w", "single.w", "lin.weight"]))
    randomize_lora(adapter)
    adapter.save_pretrained(tmp_path / "adapter")
    fresh = Toy().to(dtype)
    fresh.load_state_dict(load_file(tmp_path / "base" / "model.safetensors"))
    reference = PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().state_dict()
    apply_delta(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", block_size=50_000)
    got = load_file(tmp_path / "out" / "model.safetensors")
    for key, tensor in reference.items():
        assert torch.equal(got[key], tensor), key

    # The test has teeth: peft rounds a parameter's product to its dtype before adding it;
    # rounding once, as for a Linear module, gives other bits.
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a, b = (factors[f"base_model.model.lin.lora_{x}.weight"].float() for x in "AB")
    base = load_file(tmp_path / "base" / "model.safetensors")["lin.weight"].float()
    assert not torch.equal((base + b @ a * 0.5).to(dtype), reference["lin.weight"])


def test_neox_lm_head_is_stored_as_embed_out(tmp_path: Path, pairs) -> None:
    """transformers 5 calls GPT-NeoX's embed_out lm_head: modules_to_save lands on embed_out."""
    base, _ = pairs["gpt-neox"]
    assert "embed_out.weight" in load_state(base)
    adapter = make_adapter("gpt-neox", base, tmp_path / "adapter", r=4,
                           target_modules=["query_key_value"], modules_to_save=["lm_head"])
    assert "base_model.model.lm_head.weight" in load_file(adapter / "adapter_model.safetensors")
    apply_delta(base, adapter, tmp_path / "out")
    assert_loads_as("gpt-neox", tmp_path / "out", peft_merge("gpt-neox", base, adapter))
