"""DoRA adapters (peft's use_dora) merged while streaming, bit for bit as peft's merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_state, run_in_process
from lora_factors import ALL, SMALL_BLOCK, assert_matches, make_adapter, peft_merge, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

import deltamerge.kinds.lora as lora
from deltamerge import apply_delta
from deltamerge.errors import MismatchError, UnsupportedError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {d: tiny_llama(root / str(d).removeprefix("torch."), d) for d in DTYPES}


def assert_merges_like_peft(base: Path, dtype: torch.dtype, adapters: list[Path], out: Path,
                            cls=None, blocks: tuple[int, ...] = (SMALL_BLOCK, 32 << 20)) -> None:
    """The same bits as peft for blocks of a few rows and for whole tensors: a row's norm does
    not depend on the rows beside it in its block."""
    reference = peft_merge(base, dtype, adapters, **({"cls": cls} if cls else {}))
    for block in blocks:
        result = apply_delta(base, adapters if len(adapters) > 1 else adapters[0],
                             out / f"out{block}", block_size=block)
        assert result.kinds == ["lora"] * len(adapters)
        if cls is GPTNeoXForCausalLM:  # transformers' state_dict leaves out the untouched embed_out
            reference["embed_out.weight"] = load_state(base)["embed_out.weight"]
        assert_matches(out / f"out{block}", reference)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [
    {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"],
     "use_rslora": True, "rank_pattern": {"v_proj": 4, "layers.1.mlp.up_proj": 2},
     "alpha_pattern": {"down_proj": 7}},
], ids=["plain", "rslora-patterns"])
def test_dora_is_bit_identical_to_peft(tmp_path: Path, bases, dtype: torch.dtype, config) -> None:
    adapter = make_adapter(bases[dtype], dtype, tmp_path / "adapter", use_dora=True, **config)
    magnitudes = [k for k in load_file(adapter / "adapter_model.safetensors")
                  if k.endswith("lora_magnitude_vector")]
    assert magnitudes  # randomize_lora randomises them with the factors ("lora_" names)
    assert_merges_like_peft(bases[dtype], dtype, [adapter], tmp_path)


def test_windows_of_a_tall_gpt_neox_layer(tmp_path: Path, monkeypatch) -> None:
    """GPT-NeoX's fused query_key_value (192 rows) in 16-row windows, blocks of 3 or 4 rows."""
    monkeypatch.setattr(lora, "WINDOW_ROWS", 16)
    monkeypatch.setattr(lora, "MERGE_ROWS", 5)
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, vocab_size=96, max_position_embeddings=32,
                           tie_word_embeddings=False)
    base = tmp_path / "base"
    GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(base, safe_serialization=True)
    adapter = make_adapter(base, torch.bfloat16, tmp_path / "adapter", cls=GPTNeoXForCausalLM,
                           r=16, lora_alpha=8, use_dora=True,
                           target_modules=["query_key_value", "dense_h_to_4h", "dense_4h_to_h"])
    assert_merges_like_peft(base, torch.bfloat16, [adapter], tmp_path,
                            cls=GPTNeoXForCausalLM, blocks=(SMALL_BLOCK, 3000, 32 << 20))


def test_dora_then_plain_lora_in_one_apply(tmp_path: Path, bases) -> None:
    dtype = torch.float16
    dora = make_adapter(bases[dtype], dtype, tmp_path / "dora", r=4, lora_alpha=8,
                        target_modules=["q_proj", "down_proj"], use_dora=True)
    plain = make_adapter(bases[dtype], dtype, tmp_path / "plain", seed=2, r=8, lora_alpha=16,
                         target_modules=["q_proj", "v_proj"])
    assert_merges_like_peft(bases[dtype], dtype, [dora, plain], tmp_path,
                            blocks=(SMALL_BLOCK,))


def test_embedding_dora_is_refused(tmp_path: Path, bases) -> None:
    adapter = make_adapter(bases[torch.float16], torch.float16, tmp_path / "adapter", r=4,
                           target_modules=["embed_tokens", "q_proj"], use_dora=True)
    done = run_in_process("apply", bases[torch.float16], adapter, tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "embed_tokens" in done.stderr and "DoRA" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_conv1d_dora_is_refused(tmp_path: Path) -> None:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32)
    base = tmp_path / "base"
    GPT2LMHeadModel(config).to(torch.float16).save_pretrained(base, safe_serialization=True)
    adapter = make_adapter(base, torch.float16, tmp_path / "adapter", cls=GPT2LMHeadModel, r=4,
                           target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)
    with pytest.raises(UnsupportedError, match="c_attn.*Conv1D"):
        apply_delta(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dora_with_qlora_is_refused(tmp_path: Path, bases) -> None:
    adapter = make_adapter(bases[torch.float16], torch.float16, tmp_path / "adapter", r=4,
                           target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedError, match="DoRA.*--qlora"):
        apply_delta(bases[torch.float16], adapter, tmp_path / "out", qlora="nf4")


def _rewrite(adapter: Path, drop: str | None = None, **config) -> None:
    path = adapter / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(path).items() if drop is None or drop not in k}
    save_file(state, path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **config}))


@pytest.mark.parametrize(("drop", "config", "error", "message"), [
    ("layers.1.self_attn.q_proj.lora_magnitude_vector", {}, MismatchError,
     "layers.1.self_attn.q_proj.*no lora_magnitude_vector"),
    (None, {"use_dora": False}, UnsupportedError, "magnitude without use_dora"),
    (None, {"target_parameters": ["mlp.down_proj.weight"]}, UnsupportedError,
     "use_dora with target_parameters"),
], ids=["missing-magnitude", "magnitude-without-use_dora", "target_parameters"])
def test_inconsistent_dora_adapters_are_refused(
    tmp_path: Path, bases, drop, config, error, message
) -> None:
    adapter = make_adapter(bases[torch.float32], torch.float32, tmp_path / "adapter", r=4,
                           target_modules=["q_proj"], use_dora=True)
    _rewrite(adapter, drop, **config)
    with pytest.raises(error, match=message):
        apply_delta(bases[torch.float32], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
