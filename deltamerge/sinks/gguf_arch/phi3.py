"""Phi-3: the converter's ``Phi3MiniModel`` (``conversion/phi.py``).

``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``), rows as they are. Its
own hyperparameters, its own reading of the sentencepiece tokenizer (added tokens from
tokenizer_config.json and tokenizer.json), and for LongRoPE models the long and short factors as
tensors written first, with the attention factor key the converter adds while making them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ...errors import FormatError, UnsupportedError
from .. import gguf_kv
from .base import Arch
from .bpe import add_gpt2_vocab

_USER_DEFINED, _CONTROL = 4, 3  # SentencePieceTokenTypes


def _rope_dims(h: dict[str, Any]) -> int:
    n_embd = gguf_kv.find_hparam(h, ("hidden_size", "n_embd"))
    n_head = gguf_kv.find_hparam(h, ("num_attention_heads", "n_head"))
    return int(gguf_kv.rope_parameters(h).get("partial_rotary_factor", 1.0) * n_embd) // n_head


class Phi3(Arch):
    gguf_arch = "PHI3"
    hf_architectures = ("Phi3ForCausalLM",)
    label = "Phi-3"

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``Phi3MiniModel.set_gguf_parameters``."""
        rope = gguf_kv.rope_parameters(h)
        if "original_max_position_embeddings" not in rope:
            raise FormatError(f"{where}: a Phi-3 config needs original_max_position_embeddings")
        writer.add_context_length(gguf_kv.find_hparam(h, ("n_positions", "max_position_embeddings")))
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_embedding_length(gguf_kv.find_hparam(h, ("hidden_size", "n_embd")))
        writer.add_feed_forward_length(h["intermediate_size"])
        writer.add_block_count(gguf_kv.block_count(h, where))
        writer.add_head_count(gguf_kv.find_hparam(h, ("num_attention_heads", "n_head")))
        writer.add_head_count_kv(gguf_kv.find_hparam(h, ("num_key_value_heads", "n_head_kv")))
        writer.add_layer_norm_rms_eps(h["rms_norm_eps"])
        writer.add_rope_dimension_count(_rope_dims(h))
        writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
        writer.add_file_type(ftype)
        writer.add_sliding_window(h.get("sliding_window") or 0)

    def generated(self, writer: Any, h: dict[str, Any], where: Path) -> list[tuple[str, torch.Tensor]]:
        """``Phi3MiniModel.generate_extra_tensors``: LongRoPE's factors (and its attention factor key)."""
        rope = gguf_kv.rope_parameters(h)
        long, short = rope.get("long_factor"), rope.get("short_factor")
        if not long:
            return []
        max_pos = gguf_kv.find_hparam(h, ("n_positions", "max_position_embeddings"))
        original = rope["original_max_position_embeddings"]
        scale = max_pos / original
        kind = str(rope.get("rope_type", "")).lower()
        if kind in ("su", "longrope"):
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn_factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise UnsupportedError(f"{where}: GGUF output of Phi-3 with {kind or 'no'} RoPE scaling type")
        writer.add_rope_scaling_attn_factors(attn_factor)
        if short is None or len(long) != len(short) or len(long) != _rope_dims(h) / 2:
            raise FormatError(f"{where}: the long and short RoPE factors must be {_rope_dims(h) // 2} each")
        return [("rope_factors_long.weight", torch.tensor(long, dtype=torch.float32)),
                ("rope_factors_short.weight", torch.tensor(short, dtype=torch.float32))]

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        """``Phi3MiniModel.set_vocab``: GPT-2 BPE for Phi-4, else its reading of tokenizer.model."""
        config = gguf_kv.json_file(folder / "tokenizer_config.json")
        if config is not None and config.get("tokenizer_class") == "GPT2Tokenizer":
            add_gpt2_vocab(writer, folder, h)
            return
        if not (folder / "tokenizer.model").is_file():
            raise UnsupportedError(f"{folder}: GGUF output of a Phi-3 needs its tokenizer.model, found none")
        tokens, scores, types = gguf_kv.sentencepiece_vocab(folder, h, None)
        added = list((config or {}).get("added_tokens_decoder", {}).items())
        tokenizer = gguf_kv.json_file(folder / "tokenizer.json") or {}
        added += [(entry["id"], entry) for entry in tokenizer.get("added_tokens", [])]
        for key, data in added:
            tid = int(key)
            if not 0 <= tid < len(tokens):
                raise FormatError(f"{folder}: added token {tid} is beyond the vocabulary ({len(tokens)})")
            tokens[tid], scores[tid] = data["content"].encode("utf-8"), -1000.0
            types[tid] = _CONTROL if data.get("special") else _USER_DEFINED
        gguf_kv.add_llama_tokens(writer, folder, tokens, scores, types)


ARCHS: list[Arch] = [Phi3()]
