"""FourierFT, VeRA without saved projections, RandLoRA, MiSS, SHiRA and C3A adapters, merged bit for
bit as peft's merge_and_unload, on a LLaMA and a Gemma (tied embeddings) base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_factors import (
    SMALL_BLOCK,
    VOCAB,
    _edit_config,
    assert_matches,
    make_random,
    peft_merge,
    tiny_llama,
)
from peft import (
    C3AConfig,
    FourierFTConfig,
    MissConfig,
    RandLoraConfig,
    ShiraConfig,
    VeraConfig,
)
from safetensors.torch import load_file, save_file
from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import deltamerge.kinds.lora as lora
from deltamerge import apply_delta
from deltamerge.errors import FormatError, MismatchError, UnsupportedError
from deltamerge.kinds.detect import detect_kind

# Each type's parameters, which peft starts at zero or identity: made random and non-zero.
PARTS = ("fourierft_spectrum", "vera_lambda", "randlora_lambda", "randlora_gamma",
         "miss_block", "shira_weight", "c3a_kernel")
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CASES = [("llama", F16), ("llama", BF16), ("llama", F32), ("gemma", F16), ("gemma", BF16)]
CLASSES = {"llama": LlamaForCausalLM, "gemma": GemmaForCausalLM, "gpt2": GPT2LMHeadModel}

CONFIGS = {
    # n_frequency per module from the pattern; a seed of its own
    "fourierft": lambda: FourierFTConfig(target_modules=["q_proj", "down_proj", "up_proj"],
                                         n_frequency=50, scaling=30.0, random_loc_seed=5,
                                         n_frequency_pattern={"down_proj": 70}),
    # vera_A/vera_B not saved: drawn again from projection_prng_key, sized by the widest module
    "vera-regenerated": lambda: VeraConfig(r=8, target_modules=["q_proj", "down_proj", "gate_proj"],
                                           save_projection=False, projection_prng_key=11),
    # bases saved with every module; q_proj square, gate_proj taller than wide, down_proj wider
    "randlora": lambda: RandLoraConfig(r=8, randlora_alpha=20,
                                       target_modules=["q_proj", "down_proj", "gate_proj"]),
    # bases drawn again (bf16 kaiming), r not dividing the sides: a last partial basis
    "randlora-regenerated": lambda: RandLoraConfig(r=6, target_modules=["v_proj", "down_proj", "up_proj"],
                                                   save_projection=False, projection_prng_key=3),
    # r=6 divides no side of LLaMA's (64, 172): a last partial block of columns
    "miss": lambda: MissConfig(r=6, target_modules=["q_proj", "down_proj", "up_proj"]),
    "miss-mini": lambda: MissConfig(r=4, mini_r=4, init_weights="mini",
                                    target_modules=["k_proj", "gate_proj"]),
    # r x r tiles: r divides both sides; blocks of rows are whole tiles
    "miss-bat": lambda: MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "down_proj"]),
    "shira": lambda: ShiraConfig(r=2, random_seed=4, target_modules=["q_proj", "down_proj", "up_proj"]),
    # no seed: torch's default one, as peft's unseeded generator
    "shira-unseeded": lambda: ShiraConfig(r=1, target_modules=["v_proj", "gate_proj"]),
    # block_size per module from the pattern (LLaMA's ffn, 172, is no multiple of 8)
    "c3a": lambda: C3AConfig(block_size=8, target_modules=["q_proj", "down_proj", "up_proj"],
                             block_size_pattern={"down_proj": 4, "mlp.up_proj": 2}),
}


def tiny_gemma(folder: Path, dtype: torch.dtype) -> Path:
    torch.manual_seed(0)
    config = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                         vocab_size=VOCAB)
    GemmaForCausalLM(config).to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[tuple[str, torch.dtype], Path]:
    root = tmp_path_factory.mktemp("bases")
    build = {"llama": tiny_llama, "gemma": tiny_gemma}
    return {(arch, d): build[arch](root / f"{arch}-{str(d)[6:]}", d) for arch, d in CASES}


def make(base: Path, arch: str, dtype: torch.dtype, config, out: Path, seed: int = 1) -> Path:
    """peft's adapter for ``config``, every parameter random (as if trained), saved."""
    return make_random(base, dtype, config, out, PARTS, CLASSES[arch], seed)


def merged_as_peft(base: Path, arch: str, dtype: torch.dtype, adapter: Path, out: Path) -> None:
    apply_delta(base, adapter, out, block_size=SMALL_BLOCK)
    assert_matches(out, peft_merge(base, dtype, [adapter], cls=CLASSES[arch]))


# Each type on every case; a type's other variants on two (fewer peft merges, a faster file).
VARIANTS = ("randlora", "miss-mini", "miss-bat", "shira-unseeded")
MATRIX = [(w, a, d) for w in CONFIGS for a, d in CASES
          if w not in VARIANTS or (a, d) in (("llama", F16), ("gemma", BF16))]


@pytest.mark.parametrize(("which", "arch", "dtype"), MATRIX,
                         ids=[f"{w}-{a}-{str(d)[6:]}" for w, a, d in MATRIX])
def test_merge_matches_peft(tmp_path: Path, bases, which: str, arch: str, dtype: torch.dtype) -> None:
    base = bases[arch, dtype]
    adapter = make(base, arch, dtype, CONFIGS[which](), tmp_path / "adapter")
    assert detect_kind(adapter, None) == which.split("-")[0]
    merged_as_peft(base, arch, dtype, adapter, tmp_path / "out")


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"n_frequency_pattern": {}}, MismatchError, r"down_proj.fourierft_spectrum.*\[70\].*\[50\]"),
    ({"random_loc_seed": None}, FormatError, "random_loc_seed"),
    ({"bias": "all"}, UnsupportedError, "bias='all'"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, FormatError,
     "layers_to_transform cannot be used when target_modules is a string"),
])
def test_fourierft_refusals(tmp_path: Path, bases, change: dict, error, message: str) -> None:
    base = bases["llama", F16]
    adapter = make(base, "llama", F16, CONFIGS["fourierft"](), tmp_path / "adapter")
    _edit_config(adapter, change)
    with pytest.raises(error, match=message):
        apply_delta(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sparse", ["sparse", "very_sparse"])
def test_randlora_sparse_bases_drawn_again(tmp_path: Path, bases, sparse: str) -> None:
    base = bases["llama", BF16]
    config = RandLoraConfig(r=4, target_modules=["k_proj", "up_proj"], save_projection=False,
                            projection_prng_key=9, **{sparse: True})
    merged_as_peft(base, "llama", BF16, make(base, "llama", BF16, config, tmp_path / "a"),
                   tmp_path / "out")


def test_randlora_windows_give_peft_bits(tmp_path: Path, monkeypatch) -> None:
    """Tensors taller than the product's windows (ffn 300), blocks starting inside them."""
    monkeypatch.setattr(lora, "WINDOW_ROWS", 32)
    base = tiny_llama(tmp_path / "base", F16, ffn=300)
    config = RandLoraConfig(r=8, target_modules=["gate_proj", "down_proj"])
    adapter = make(base, "llama", F16, config, tmp_path / "adapter")
    merged_as_peft(base, "llama", F16, adapter, tmp_path / "out")


@pytest.mark.parametrize("seed", [4, None], ids=["seeded", "unseeded"])
def test_shira_positions_drawn_again_without_indices(tmp_path: Path, bases, seed) -> None:
    """A file without shira_indices: peft's random mask from random_seed, drawn again."""
    base = bases["gemma", BF16]
    config = ShiraConfig(r=2, random_seed=seed, target_modules=["o_proj", "up_proj"])
    adapter = make(base, "gemma", BF16, config, tmp_path / "adapter")
    state = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in state.items() if "shira_indices" not in k},
              adapter / "adapter_model.safetensors")
    merged_as_peft(base, "gemma", BF16, adapter, tmp_path / "out")


@pytest.mark.parametrize(("which", "change", "message"), [
    ("c3a", {"block_size_pattern": {}}, r"down_proj.c3a_kernel.*\[16, 43, 4\].*\[8, 21, 8\]"),
    ("miss", {"r": 4}, r"down_proj.miss_block.*\[6, 64\].*\[4, 64\]"),
    ("miss-bat", {"init_weights": True}, r"miss_block.*\[16, 4, 4\].*\[4, 64\]"),
    ("shira", {"r": 3}, r"down_proj.shira_weight.*\[472\].*\[708\]"),
])
def test_shapes_peft_would_not_load_are_refused(
    tmp_path: Path, bases, which: str, change: dict, message: str
) -> None:
    base = bases["llama", F16]
    adapter = make(base, "llama", F16, CONFIGS[which](), tmp_path / "adapter")
    _edit_config(adapter, change)
    with pytest.raises(MismatchError, match=message):
        apply_delta(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("peft_type", ["C3A", "MISS", "SHIRA", "RANDLORA"])
def test_conv1d_layers_are_refused(tmp_path: Path, peft_type: str) -> None:
    """GPT-2's Conv1D: peft has no such layer for these types (RandLoRA's is not merged here)."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
                    ).save_pretrained(base, safe_serialization=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    part = {"C3A": "c3a_kernel", "MISS": "miss_block", "SHIRA": "shira_weight",
            "RANDLORA": "randlora_lambda"}[peft_type]
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": peft_type, "target_modules": ["c_fc"], "save_projection": False}))
    save_file({f"base_model.model.transformer.h.0.mlp.c_fc.{part}": torch.ones(4)},
              adapter / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"adapter_model.safetensors: .*'transformer.h.0.mlp."
                                               r"c_fc.weight' is a Conv1D layer"):
        apply_delta(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["fourierft", "vera-regenerated"])
def test_gpt2_conv1d(tmp_path: Path, which: str) -> None:
    """fan_in_fan_out: the delta transposed onto GPT-2's (in, out) weights."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32)
                    ).to(BF16).save_pretrained(base, safe_serialization=True)
    config = {"fourierft": FourierFTConfig(n_frequency=40, target_modules=["c_attn", "c_fc"],
                                           fan_in_fan_out=True),
              "vera-regenerated": VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                             save_projection=False)}[which]
    merged_as_peft(base, "gpt2", BF16, make(base, "gpt2", BF16, config, tmp_path / "a"),
                   tmp_path / "out")


def test_types_chain_in_one_pass(tmp_path: Path, bases) -> None:
    """``apply BASE A B C D E F OUT``: each type once, merged as peft merges them in turn."""
    base, dtype = bases["gemma", BF16], BF16
    names = ["c3a", "shira", "fourierft", "miss-bat", "randlora-regenerated", "vera-regenerated"]
    adapters = [make(base, "gemma", dtype, CONFIGS[w](), tmp_path / w, seed=i)
                for i, w in enumerate(names)]
    apply_delta(base, adapters, tmp_path / "out", block_size=SMALL_BLOCK)
    assert_matches(tmp_path / "out", peft_merge(base, dtype, adapters, cls=GemmaForCausalLM))
