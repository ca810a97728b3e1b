"""peft adapter types besides LoRA (IA3, LoHa, LoKr), compared bit for bit with merge_and_unload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import apply_in_process, load_state, run_cli
from lora_factors import (
    ADAPTER_PARTS,
    SMALL_BLOCK,
    VOCAB,
    _edit_config,
    assert_matches,
    load_model,
    make,
    peft_merge,
    tiny_llama,
    with_biases,
)
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    TrainableTokensConfig,
    VeraConfig,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import deltamerge.kinds.lora as lora
from deltamerge import apply_delta
from deltamerge.errors import MismatchError, UnsupportedError
from deltamerge.kinds.detect import detect_kind

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

CONFIGS = {
    "ia3": lambda: IA3Config(target_modules=["k_proj", "down_proj", "up_proj"],
                             feedforward_modules=["down_proj"]),
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"],
                               alpha_pattern={"down_proj": 3}, rank_pattern={"q_proj": 2}),
    # r=2 below half of every factor's side: w1 and w2 both given as factors
    "lokr-both": lambda: LoKrConfig(r=2, alpha=8, target_modules=["q_proj", "down_proj"],
                                    decompose_both=True),
    # w1 whole, w2 as factors; decompose_factor picks other shapes
    "lokr-factor": lambda: LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "gate_proj"],
                                      decompose_factor=4),
    # w1 and w2 whole (r large next to the factors' sides): r only in the scale
    "lokr-whole": lambda: LoKrConfig(r=16, alpha=5, target_modules=["v_proj", "up_proj"],
                                     alpha_pattern={"up_proj": 7}),
    # vera_A/vera_B sized to the widest module, sliced for each
    "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "down_proj", "gate_proj"]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[torch.dtype, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {d: tiny_llama(root / str(d).removeprefix("torch."), d) for d in DTYPES}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("which", list(CONFIGS))
def test_merge_matches_peft(tmp_path: Path, bases, which: str, dtype: torch.dtype) -> None:
    adapter = make(bases[dtype], dtype, CONFIGS[which](), tmp_path / "adapter")
    assert detect_kind(adapter, None) == which.split("-")[0]
    apply_delta(bases[dtype], adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(bases[dtype], dtype, [adapter]))


@pytest.mark.parametrize(("window", "merge_rows", "window_bytes"),
                         [(16, 5, 8 << 20), (256, 64, 8 << 20), (256, 64, 1)],
                         ids=["16-rows", "256-rows", "16-rows-by-bytes"])
def test_loha_windows_give_peft_bits(
    tmp_path: Path, window: int, merge_rows: int, window_bytes: int, monkeypatch
) -> None:
    """Tensors taller than LoHa's windows of products (ffn 700), blocks starting inside them."""
    monkeypatch.setattr(lora, "WINDOW_ROWS", window)
    monkeypatch.setattr(lora, "MERGE_ROWS", merge_rows)
    monkeypatch.setattr(lora, "WINDOW_BYTES", window_bytes)
    base = tiny_llama(tmp_path / "base", torch.float16, ffn=700)
    config = LoHaConfig(r=8, alpha=4, target_modules=["gate_proj", "down_proj", "k_proj"])
    adapter = make(base, torch.float16, config, tmp_path / "adapter")
    reference = peft_merge(base, torch.float16, [adapter])
    for block in (SMALL_BLOCK, 50_000):
        apply_delta(base, adapter, tmp_path / f"out{block}", block_size=block, workers=2)
        assert_matches(tmp_path / f"out{block}", reference)


@pytest.mark.parametrize("which", ["ia3", "lokr-both", "loha"])
def test_modules_to_save_replace_the_base(tmp_path: Path, bases, which: str) -> None:
    """Whole modules saved with the adapter replace the base's, in its dtype (fp32 -> bf16)."""
    dtype = torch.bfloat16
    config = CONFIGS[which]()
    config.modules_to_save = ["lm_head", "norm"]
    adapter = make(bases[dtype], dtype, config, tmp_path / "adapter")
    saved = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.lm_head.weight" in saved
    state = {k: v.float() * 2 + 1 if not any(p in k for p in ADAPTER_PARTS) else v
             for k, v in saved.items()}  # trained copies, saved in fp32
    save_file(state, adapter / "adapter_model.safetensors")
    apply_delta(bases[dtype], adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    reference = peft_merge(bases[dtype], dtype, [adapter])
    assert_matches(tmp_path / "out", reference)
    assert torch.equal(reference["lm_head.weight"], state["base_model.model.lm_head.weight"].to(dtype))


def test_saved_module_the_base_lacks_is_refused(tmp_path: Path, bases) -> None:
    adapter = make(bases[torch.float16], torch.float16, CONFIGS["ia3"](), tmp_path / "a")
    _edit_config(adapter, {"modules_to_save": ["score"]})
    state = load_file(adapter / "adapter_model.safetensors")
    state["base_model.model.score.weight"] = torch.ones(2, 64)
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(MismatchError, match="'score.weight', which the base lacks"):
        apply_delta(bases[torch.float16], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_lokr_factors_as_configured(tmp_path: Path, bases) -> None:
    """The configs above do cover LoKr's three layouts (else the test above proves less)."""
    seen = set()
    for which in ("lokr-both", "lokr-factor", "lokr-whole"):
        adapter = make(bases[torch.float16], torch.float16, CONFIGS[which](), tmp_path / which)
        names = adapter_keys(adapter)
        seen |= {n.rpartition(".")[2] for n in names}
    assert {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"} <= seen


def adapter_keys(adapter: Path) -> list[str]:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
def test_types_chain_in_one_pass(tmp_path: Path, bases, dtype: torch.dtype) -> None:
    """``apply BASE A B C D E OUT`` with one adapter of each type, as peft merges them in turn."""
    base = bases[dtype]
    adapters = [
        make(base, dtype, CONFIGS["ia3"](), tmp_path / "ia3", seed=2),
        make(base, dtype, CONFIGS["loha"](), tmp_path / "loha", seed=3),
        make(base, dtype, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]),
             tmp_path / "lora", seed=4),
        make(base, dtype, CONFIGS["lokr-both"](), tmp_path / "lokr", seed=5),
        make(base, dtype, CONFIGS["vera"](), tmp_path / "vera", seed=6),
    ]
    apply_delta(base, adapters, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, adapters))


def test_cli_chains_types(tmp_path: Path, bases) -> None:
    """``deltamerge apply BASE A B OUT`` as a user runs it: the kinds detected, one pass."""
    base = bases[torch.float16]
    adapters = [make(base, torch.float16, CONFIGS["vera"](), tmp_path / "vera", seed=7),
                make(base, torch.float16, CONFIGS["ia3"](), tmp_path / "ia3", seed=8)]
    done = run_cli("apply", base, *adapters, tmp_path / "out", "-q")
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path / "out", peft_merge(base, torch.float16, adapters))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
def test_ia3_scales_gpt_neox_biases(tmp_path: Path, dtype: torch.dtype) -> None:
    """A module that is not feedforward has its bias rescaled too; a feedforward one does not."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=64)
    base = tmp_path / "base"
    with_biases(GPTNeoXForCausalLM(config)).to(dtype).save_pretrained(base, safe_serialization=True)
    ia3 = IA3Config(target_modules=["query_key_value", "dense_4h_to_h", "dense_h_to_4h"],
                    feedforward_modules=["dense_4h_to_h"])
    adapter = make(base, dtype, ia3, tmp_path / "adapter", cls=GPTNeoXForCausalLM)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    reference = peft_merge(base, dtype, [adapter], cls=GPTNeoXForCausalLM)
    reference["embed_out.weight"] = reference.pop("lm_head.weight")  # transformers 5's name
    assert_matches(tmp_path / "out", reference)
    before = load_model(base, dtype, cls=GPTNeoXForCausalLM).state_dict()
    qkv, ff = "gpt_neox.layers.0.attention.query_key_value.bias", "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"
    assert not torch.equal(reference[qkv], before[qkv])
    assert torch.equal(reference[ff], before[ff])


def test_ia3_on_gpt2_conv1d(tmp_path: Path) -> None:
    """fan_in_fan_out: GPT-2 stores its weights (in, out), so the vector runs the other way."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    base = tmp_path / "base"
    with_biases(GPT2LMHeadModel(config)).to(torch.float16).save_pretrained(
        base, safe_serialization=True)
    ia3 = IA3Config(target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                    feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)
    adapter = make(base, torch.float16, ia3, tmp_path / "adapter", cls=GPT2LMHeadModel)
    apply_delta(base, adapter, tmp_path / "out")
    assert_matches(tmp_path / "out", peft_merge(base, torch.float16, [adapter], cls=GPT2LMHeadModel))


@pytest.mark.parametrize("change,message", [
    ({"peft_type": "POLY"}, "peft_type 'POLY'"),
    ({"peft_type": "LN_TUNING"}, "peft_type 'LN_TUNING'"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices .* LOKR"),
    ({"rank_pattern": {"q_proj": 3}}, "not factors of rank 3"),
])
def test_refusals_name_what(tmp_path: Path, bases, change: dict, message: str) -> None:
    adapter = make(bases[torch.float16], torch.float16, CONFIGS["lokr-both"](), tmp_path / "a")
    _edit_config(adapter, change)
    with pytest.raises((UnsupportedError, MismatchError), match=message):
        apply_delta(bases[torch.float16], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ia3_vector_of_the_wrong_length_is_refused(tmp_path: Path, bases) -> None:
    """An IA3 vector that fits neither side of its weight: one line naming both tensors."""
    base = bases[torch.float16]
    adapter = make(base, torch.float16, CONFIGS["ia3"](), tmp_path / "a")
    other = make(bases[torch.float16], torch.float16,
                 IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"]),
                 tmp_path / "b")
    state = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
    state[key] = load_file(other / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"]
    save_file(state, adapter / "adapter_model.safetensors")
    code, err = apply_in_process(base, adapter, tmp_path / "out")
    assert code != 0 and "down_proj.ia3_l" in err and "down_proj.weight" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("float16", "bfloat16"))
def test_trainable_tokens_replace_rows(tmp_path: Path, dtype: torch.dtype, tied: bool) -> None:
    """Whole embedding rows replaced (not added); tied embeddings: the one stored weight."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=VOCAB, tie_word_embeddings=tied)
    base = tmp_path / "base"
    LlamaForCausalLM(config).to(dtype).save_pretrained(base, safe_serialization=True)
    tokens = TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[5, 0, VOCAB - 1, 40])
    adapter = make(base, dtype, tokens, tmp_path / "adapter")
    assert detect_kind(adapter, None) == "trainable-tokens"
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    reference = peft_merge(base, dtype, [adapter])
    assert_matches(tmp_path / "out", reference)
    before = load_state(base)["model.embed_tokens.weight"]
    changed = (reference["model.embed_tokens.weight"] != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == [0, 5, 40, VOCAB - 1]


def test_vera_on_gpt2_conv1d(tmp_path: Path) -> None:
    """fan_in_fan_out: the product transposed onto GPT-2's (in, out) weights."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
    base = tmp_path / "base"
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(base, safe_serialization=True)
    vera = VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapter = make(base, torch.bfloat16, vera, tmp_path / "adapter", cls=GPT2LMHeadModel)
    apply_delta(base, adapter, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, torch.bfloat16, [adapter], cls=GPT2LMHeadModel))


def test_gemma_tied_embeddings_chain(tmp_path: Path) -> None:
    """Gemma (tied embeddings, bf16): trainable tokens, then a LoKr and an IA3, in one pass."""
    torch.manual_seed(0)
    config = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                         vocab_size=VOCAB)
    base = tmp_path / "base"
    GemmaForCausalLM(config).to(torch.bfloat16).save_pretrained(base, safe_serialization=True)
    dtype, cls = torch.bfloat16, GemmaForCausalLM
    adapters = [
        make(base, dtype, TrainableTokensConfig(target_modules=["embed_tokens"],
                                                token_indices=[1, 7, 50]),
             tmp_path / "tokens", seed=2, cls=cls),
        make(base, dtype, LoKrConfig(r=2, alpha=4, target_modules=["o_proj", "up_proj"],
                                     decompose_both=True), tmp_path / "lokr", seed=3, cls=cls),
        make(base, dtype, IA3Config(target_modules=["v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"]),
             tmp_path / "ia3", seed=4, cls=cls),
    ]
    apply_delta(base, adapters, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, adapters, cls=cls))
