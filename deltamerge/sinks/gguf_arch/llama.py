"""LLaMA 1/2/3, Mistral, SmolLM: the converter's ``LlamaModel`` (``conversion/llama.py``).

q and k rows are permuted within each head (the rotary halves interleaved); the tokenizer is
sentencepiece's ``tokenizer.model``, else a sentencepiece-style ``tokenizer.json``, else a GPT-2
style BPE (Llama 3, SmolLM); ``rope_type: llama3`` generates ``rope_freqs.weight``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...errors import UnsupportedError
from .. import gguf_kv
from ..gguf_special import SpecialVocab
from .base import Arch
from .bpe import add_gpt2_vocab


class Llama(Arch):
    gguf_arch = "LLAMA"
    hf_architectures = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")
    label = "LLaMA 1/2/3, Mistral, SmolLM"
    refused_keys = (*Arch.refused_keys, "num_local_experts", "num_experts", "n_routed_experts",
                    "draft_vocab_size")

    def check(self, config: dict[str, Any], h: dict[str, Any], where: Path) -> None:
        super().check(config, h, where)
        gguf_kv.heads(h, where)

    def permute_heads(self, hf_name: str, h: dict[str, Any]) -> int:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return gguf_kv.find_hparam(h, ("n_heads", "num_attention_heads"))
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return gguf_kv.find_hparam(h, ("n_kv_heads", "num_key_value_heads"))
        return 0

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``LlamaModel.set_gguf_parameters``."""
        super().add_parameters(writer, h, ftype, where)
        if "vocab_size" in h:
            writer.add_vocab_size(h["vocab_size"])
        n_head, _ = gguf_kv.heads(h, where)
        writer.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // n_head)

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        """``LlamaModel.set_vocab``."""
        tokenizer_config = gguf_kv.json_file(folder / "tokenizer_config.json")
        if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise UnsupportedError(f"{folder}: GGUF output of a Mistral tekken tokenizer is not supported")
        if tokenizer_config is not None:
            if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
                writer.add_add_space_prefix(add_prefix_space)
            if tokenizer_config.get("tokenizer_class") == "HybridDNATokenizer":
                raise UnsupportedError(f"{folder}: GGUF output of a HybridDNATokenizer is not supported")
        if not gguf_kv.add_sentencepiece_vocab(writer, folder, h):
            if not gguf_kv.add_llama_hf_vocab(writer, folder):
                add_gpt2_vocab(writer, folder, h)
        vocab_size = h.get("vocab_size", 32000)
        if vocab_size == 32016:  # Code Llama's infill tokens
            special = SpecialVocab(folder, load_merges=False,
                                                special_token_types=["prefix", "suffix", "middle", "eot"])
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                special._set_special_token(typ, tid)
            special.add_to_gguf(writer, quiet=True)
        if vocab_size == 49152:
            writer.add_add_bos_token(False)

    def generated(self, writer: Any, h: dict[str, Any], where: Path) -> list[tuple[str, torch.Tensor]]:
        """``LlamaModel.generate_extra_tensors``: Llama 3's RoPE frequency factors, in its float32 ops."""
        rope = gguf_kv.rope_parameters(h)
        rope = rope.get("full_attention", rope)
        if not rope or str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        base = rope.get("rope_theta", 10000.0)
        dim = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = rope.get("factor", 8.0)
        low = rope.get("low_freq_factor", 1.0)
        high = rope.get("high_freq_factor", 4.0)
        old_context = rope.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_context / low, old_context / high
        factors: list[float] = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_context / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return [("rope_freqs.weight", torch.tensor(factors, dtype=torch.float32))]


ARCHS: list[Arch] = [Llama()]
