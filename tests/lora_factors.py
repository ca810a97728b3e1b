"""Adapters that test something: peft starts B at zero, so a fresh adapter's product is zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_state
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from deltamerge import apply_delta
from deltamerge.errors import DeltaMergeError


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """Every LoRA factor and every saved whole module of a peft model, random and small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


VOCAB = 96


SMALL_BLOCK = 1000  # bytes: 3 or 4 rows a block, so blocks start inside the product's windows


def tiny_llama(folder: Path, dtype: torch.dtype, ffn: int = 172, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=ffn, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=VOCAB)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"from": "base"}))
    return folder


def load_model(folder: Path, dtype: torch.dtype, vocab: int | None = None, cls=LlamaForCausalLM):
    model = cls.from_pretrained(folder, dtype=dtype)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model


def make_adapter(
    base: Path, dtype: torch.dtype, out: Path, seed: int = 1, vocab: int | None = None,
    safe: bool = True, cls=LlamaForCausalLM, **config,
) -> Path:
    """Train nothing: randomise every LoRA factor (B starts at zero) and saved whole module."""
    model = get_peft_model(load_model(base, dtype, vocab, cls), LoraConfig(**config))
    randomize_lora(model, seed)
    model.save_pretrained(out, safe_serialization=safe)
    return out


def peft_merge(
    base: Path, dtype: torch.dtype, adapters: list[Path], vocab: int | None = None,
    cls=LlamaForCausalLM,
) -> dict[str, torch.Tensor]:
    """The reference: peft's merge_and_unload on a freshly loaded base, one adapter at a time."""
    model = load_model(base, dtype, vocab, cls)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.state_dict()


def assert_matches(out: Path, reference: dict[str, torch.Tensor]) -> None:
    got = load_state(out)
    assert got and set(got) <= set(reference)
    for name, tensor in got.items():
        assert tensor.dtype == reference[name].dtype, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


DTYPE = torch.float16


def assert_refused(base: Path, delta: Path, out: Path, *words: str) -> None:
    with pytest.raises(DeltaMergeError) as info:
        apply_delta(base, delta, out)
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message, message
    for word in words:
        assert word in message, message
    assert not out.exists()


def layer(i: int, module: str) -> str:
    part = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return f"model.layers.{i}.{part}.{module}.weight"


def make(base: Path, dtype: torch.dtype, config, out: Path, seed: int = 1, cls=None) -> Path:
    model = load_model(base, dtype) if cls is None else load_model(base, dtype, cls=cls)
    model = get_peft_model(model, config)
    randomize(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    return out


def make_random(base: Path, dtype: torch.dtype, config, out: Path, parts: tuple[str, ...],
                cls=LlamaForCausalLM, seed: int = 1) -> Path:
    """peft's adapter for ``config``, every parameter whose name holds one of ``parts`` random
    (as if trained; peft starts them at zero or identity), saved."""
    model = get_peft_model(load_model(base, dtype, cls=cls), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in parts):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _edit_config(adapter: Path, change: dict) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every adapter parameter random and non-zero: peft starts them at identity or zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ADAPTER_PARTS):
                shift = 1.0 if "ia3_l" in name else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + shift)


ADAPTER_PARTS = ("ia3_l", "hada_", "lokr_", "lora_", "trainable_tokens_delta",
                 "vera_lambda")


def with_biases(model: torch.nn.Module) -> torch.nn.Module:
    """transformers starts biases at zero, where no rescaling would show: random ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    return model


def peft_4bit_view(base: Path, adapter: Path, dq: bool, dtype: torch.dtype, monkeypatch,
                   untargeted: bool = False) -> dict[str, torch.Tensor]:
    """What peft's ``Linear4bit.merge`` computes on transformers' 4-bit model (bitsandbytes on
    CPU, quantized from ``dtype``): each merged weight's ``dequantize_4bit(W4) + delta``, caught
    on its way to being quantized again; with ``untargeted``, every other 4-bit layer's
    ``dequantize_4bit(W4)`` too (what training saw there)."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=dq, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, dtype=dtype,
                                                 device_map="cpu")
    model = PeftModel.from_pretrained(model, adapter)
    caught: list[torch.Tensor] = []
    params4bit = bnb.nn.Params4bit

    def catch(data, *args, **kwargs):
        caught.append(data.clone())
        return params4bit(data, *args, **kwargs)

    monkeypatch.setattr(bnb.nn, "Params4bit", catch)
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.model.") + ".weight"
        if isinstance(module, Linear4bit):
            module.merge()
            seen[key] = caught.pop()
        elif untargeted and isinstance(module, bnb.nn.Linear4bit) and not name.endswith(".base_layer"):
            seen[key] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    monkeypatch.undo()
    assert seen and not caught
    return seen
