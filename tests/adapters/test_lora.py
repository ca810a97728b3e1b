"""PEFT LoRA adapters merged while streaming, compared bit for bit with peft's merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_state
from lora_factors import ALL, SMALL_BLOCK, VOCAB, assert_matches, make_adapter, peft_merge, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import deltamerge.kinds.lora as lora
from deltamerge import apply_delta
from deltamerge.errors import MismatchError, UnsupportedError
from deltamerge.kinds.patterns import match_patterns


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {d: tiny_llama(root / str(d).removeprefix("torch."), d)
            for d in (torch.float16, torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", [
    {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    {"r": 6, "lora_alpha": 7, "target_modules": ["q_proj", "v_proj"], "use_rslora": True},
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"],
     "rank_pattern": {"v_proj": 4, "layers.1.mlp.up_proj": 2},
     "alpha_pattern": {"down_proj": 7, "model.layers.0.self_attn.q_proj": 3}},
    {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
], ids=["plain", "rslora", "patterns", "embedding"])
def test_merge_is_bit_identical_to_peft(
    tmp_path: Path, bases, dtype: torch.dtype, config: dict
) -> None:
    adapter = make_adapter(bases[dtype], dtype, tmp_path / "adapter", **config)
    reference = peft_merge(bases[dtype], dtype, [adapter])
    result = apply_delta(bases[dtype], adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert result.kinds == ["lora"]
    assert_matches(tmp_path / "out", reference)


@pytest.mark.parametrize(("window", "merge_rows", "window_bytes"),
                         [(16, 5, lora.WINDOW_BYTES), (256, 64, lora.WINDOW_BYTES), (256, 64, 1)],
                         ids=["16-rows", "256-rows", "16-rows-by-bytes"])
def test_windows_of_the_product_give_peft_bits(
    tmp_path: Path, window: int, merge_rows: int, window_bytes: int, monkeypatch
) -> None:
    """Tensors taller than a window (ffn 700, and 16-row windows, by count or by the byte cap
    on wide rows): the product in pieces, each added to the base's rows a few rows at a time."""
    monkeypatch.setattr(lora, "WINDOW_ROWS", window)
    monkeypatch.setattr(lora, "MERGE_ROWS", merge_rows)
    monkeypatch.setattr(lora, "WINDOW_BYTES", window_bytes)
    base = tiny_llama(tmp_path / "base", torch.float16, ffn=700)
    adapter = make_adapter(base, torch.float16, tmp_path / "adapter", r=16, lora_alpha=32,
                           target_modules=ALL + ["embed_tokens"])
    reference = peft_merge(base, torch.float16, [adapter])
    for block in (SMALL_BLOCK, 50_000, 32 << 20):
        out = tmp_path / f"out{block}"
        apply_delta(base, adapter, out, block_size=block, workers=2)
        assert_matches(out, reference)


def test_fan_in_fan_out_on_conv1d(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores weights [in, out]: peft transposes the product (fan_in_fan_out)."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(config).to(torch.float16).save_pretrained(base, safe_serialization=True)
    adapter = make_adapter(base, torch.float16, tmp_path / "adapter", cls=GPT2LMHeadModel, r=8,
                           lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    reference = peft_merge(base, torch.float16, [adapter], cls=GPT2LMHeadModel)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", reference)


def test_modules_to_save_extend_the_vocabulary(tmp_path: Path, bases) -> None:
    """Chinese-LLaMA style: embed_tokens and lm_head stored whole with more rows, new tokenizer."""
    base = bases[torch.float16]
    adapter = make_adapter(base, torch.float16, tmp_path / "adapter", vocab=100, r=8,
                           lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           modules_to_save=["embed_tokens", "lm_head"])
    (adapter / "tokenizer_config.json").write_text(json.dumps({"from": "adapter"}))
    (adapter / "tokenizer.model").write_bytes(b"extended vocabulary")
    reference = peft_merge(base, torch.float16, [adapter], vocab=100)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    out = tmp_path / "out"
    assert_matches(out, reference)
    assert load_state(out)["lm_head.weight"].shape == (100, 64)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 100
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert (out / "tokenizer.model").read_bytes() == b"extended vocabulary"


def test_extended_vocabulary_needs_every_vocab_tensor(tmp_path: Path, bases) -> None:
    """peft saves every resized embedding layer; an adapter without lm_head's cannot be merged."""
    base = bases[torch.float16]
    adapter = make_adapter(base, torch.float16, tmp_path / "adapter", vocab=100, r=4,
                           target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    weights = adapter / "adapter_model.safetensors"
    state = load_file(weights)
    assert "base_model.model.lm_head.weight" in state
    save_file({k: v for k, v in state.items() if "lm_head" not in k}, weights)
    with pytest.raises(MismatchError, match="must store all of them"):
        apply_delta(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bin_adapter(tmp_path: Path, bases) -> None:
    base = bases[torch.float32]
    adapter = make_adapter(base, torch.float32, tmp_path / "adapter", safe=False, r=8,
                           lora_alpha=16, target_modules=["q_proj", "o_proj"],
                           modules_to_save=["lm_head"])
    assert (adapter / "adapter_model.bin").is_file()
    assert not (adapter / "adapter_model.safetensors").exists()
    reference = peft_merge(base, torch.float32, [adapter])
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK, workers=2)
    assert_matches(tmp_path / "out", reference)


def test_output_dtype_is_the_base_s(tmp_path: Path, bases) -> None:
    """fp32 factors into an fp16 base stay fp16, as peft leaves them; --dtype still overrides."""
    adapter = make_adapter(bases[torch.float16], torch.float16, tmp_path / "adapter", r=4,
                           target_modules=["q_proj"])
    apply_delta(bases[torch.float16], adapter, tmp_path / "out")
    assert {t.dtype for t in load_state(tmp_path / "out").values()} == {torch.float16}
    apply_delta(bases[torch.float16], adapter, tmp_path / "out32", dtype="float32")
    assert {t.dtype for t in load_state(tmp_path / "out32").values()} == {torch.float32}


@pytest.mark.parametrize("change,message", [
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias='all'"),
    ({"peft_type": "POLY"}, "peft_type .POLY.: deltamerge merges LORA, IA3"),
    ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
])
def test_other_adapter_math_is_refused(
    tmp_path: Path, bases, change: dict, message: str
) -> None:
    adapter = make_adapter(bases[torch.float16], torch.float16, tmp_path / "adapter", r=4,
                           target_modules=["q_proj"])
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.raises(UnsupportedError, match=message):
        apply_delta(bases[torch.float16], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rank_must_match_the_config(tmp_path: Path, bases) -> None:
    adapter = make_adapter(bases[torch.float16], torch.float16, tmp_path / "adapter", r=4,
                           target_modules=["q_proj"])
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"r": 8}))
    with pytest.raises(MismatchError, match="has rank 4 but adapter_config.json says 8"):
        apply_delta(bases[torch.float16], adapter, tmp_path / "out")


def test_pattern_rule_is_peft_s(tmp_path: Path) -> None:
    """``(.*\\.)?(key)$``: a key matches whole trailing name components, first key wins."""
    modules = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj",
               "model.layers.11.mlp.up_proj", "model.layers.0.self_attn.xv_proj"]
    patterns = {"v_proj": 4, "layers.1.mlp.up_proj": 2, "up_proj": 3}
    found = match_patterns(tmp_path, {"rank_pattern": patterns}, modules)["rank_pattern"]
    assert found == {modules[0]: 4, modules[1]: 2, modules[2]: 3}
