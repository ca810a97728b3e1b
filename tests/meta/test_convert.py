"""convert and Meta-layout bases through the whole pipeline (the reader itself: test_meta.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_states_equal, llama_state, load_state, run_in_process, save_checkpoint
from meta_helpers import hf_to_meta

import deltamerge
from deltamerge.conversion import convert

PARAMS = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4,
          "vocab_size": -1}


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_convert_gives_back_the_original_tensors(tmp_path: Path, shards: int):
    state = llama_state(3)
    hf_to_meta(state, PARAMS, shards, tmp_path / "meta")
    result = convert(tmp_path / "meta", tmp_path / "hf", max_shard_size=60_000, block_size=2048)
    assert_states_equal(load_state(tmp_path / "hf"), state)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["vocab_size"] == 96 and config["intermediate_size"] == 172
    assert result.model_digest == deltamerge.checksum(
        save_checkpoint(state, tmp_path / "ref")
    ).model_digest


def test_converted_model_loads_with_the_originals_logits(tmp_path: Path):
    transformers = __import__("transformers")
    state = llama_state(4, torch.float32)
    hf_to_meta(state, PARAMS, 2, tmp_path / "meta")
    convert(tmp_path / "meta", tmp_path / "hf")
    converted = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    config = transformers.LlamaConfig(**json.loads((tmp_path / "hf/config.json").read_text()))
    original = transformers.LlamaForCausalLM(config).to(torch.float32)
    original.load_state_dict(state, strict=False)
    original.tie_weights()
    ids = torch.tensor([[1, 7, 30, 2]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)


def test_apply_with_a_meta_base_equals_apply_with_its_conversion(tmp_path: Path):
    state = llama_state(5)
    hf_to_meta(state, PARAMS, 2, tmp_path / "meta")
    convert(tmp_path / "meta", tmp_path / "hf")
    delta = save_checkpoint(llama_state(6, scale=0.01), tmp_path / "delta")
    a = deltamerge.apply_delta(tmp_path / "meta", delta, tmp_path / "a")
    b = deltamerge.apply_delta(tmp_path / "hf", delta, tmp_path / "b")
    assert_states_equal(load_state(tmp_path / "a"), load_state(tmp_path / "b"))
    assert a.model_digest == b.model_digest


def test_convert_cli_with_dtype(tmp_path: Path):
    state = llama_state(7)
    hf_to_meta(state, PARAMS, 1, tmp_path / "meta")
    proc = run_in_process("convert", tmp_path / "meta", tmp_path / "hf", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    out = load_state(tmp_path / "hf")
    assert all(torch.equal(out[n], state[n].float()) for n in state)


def test_convert_refuses_a_hugging_face_folder(tmp_path: Path):
    hf = save_checkpoint(llama_state(0), tmp_path / "hf")
    proc = run_in_process("convert", hf, tmp_path / "out")
    assert proc.returncode == 2 and "not a Meta-layout folder" in proc.stderr


def test_convert_keeps_the_sources_added_tokens_and_pad(tmp_path: Path):
    """Chinese-LLaMA-Alpaca's .pth output: save_pretrained's files beside tokenizer.model."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with it")
    from meta_helpers import train_tokenizer

    meta = tmp_path / "meta"
    hf_to_meta(llama_state(8), PARAMS, 1, meta)
    train_tokenizer(meta / "tokenizer.model")
    (meta / "added_tokens.json").write_text(json.dumps({"[PAD]": 60}))
    (meta / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "<unk>"}))
    (meta / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "model_max_length": 1000000000000000019884624838656, "tokenizer_class": "LlamaTokenizer"}))
    source = transformers.AutoTokenizer.from_pretrained(meta)
    assert (len(source), source.pad_token) == (61, "[PAD]")
    convert(meta, tmp_path / "hf")
    for name in ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (meta / name).read_bytes(), name
    for cls in (transformers.LlamaTokenizer, transformers.AutoTokenizer):
        result = cls.from_pretrained(tmp_path / "hf")
        assert (len(result), result.pad_token, result.pad_token_id) == (61, "[PAD]", 60)
        text = "alpha [PAD] beta"
        assert result(text)["input_ids"] == source(text)["input_ids"]


def test_convert_without_a_tokenizer_says_so(tmp_path: Path):
    state = llama_state(9)
    hf_to_meta(state, PARAMS, 1, tmp_path / "meta")
    proc = run_in_process("convert", tmp_path / "meta", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert f"no tokenizer.model in {tmp_path / 'meta'} or its parent: the result has no tokenizer" \
        in proc.stdout
    assert_states_equal(load_state(tmp_path / "hf"), state)
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
