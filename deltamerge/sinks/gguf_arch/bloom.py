"""BLOOM: the converter's ``BloomModel`` (``conversion/bloom.py``).

Its fused ``query_key_value`` weight and bias, grouped by head (each head's q, k, v), are
regrouped by kind (all q, all k, all v) as GPT-2's are; names are looked up without the
``transformer.`` prefix. The tokenizer is a GPT-2 style BPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import gguf_kv
from .base import Arch, by_kind_order


class Bloom(Arch):
    gguf_arch = "BLOOM"
    hf_architectures = ("BloomForCausalLM",)
    label = "BLOOM"

    def map_name(self, hf_name: str) -> str:
        return hf_name.replace("transformer.", "")

    def row_order(
        self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], where: Path
    ) -> tuple[int, ...]:
        n_head = h.get("n_head", h.get("num_attention_heads"))
        return by_kind_order(hf_name, shape, n_head, "self_attention.query_key_value")

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``BloomModel.set_gguf_parameters``."""
        n_embed = h.get("hidden_size", h.get("n_embed"))
        n_head = h.get("n_head", h.get("num_attention_heads"))
        writer.add_context_length(h.get("seq_length", n_embed))
        writer.add_embedding_length(n_embed)
        writer.add_feed_forward_length(4 * n_embed)
        writer.add_block_count(gguf_kv.block_count(h, where))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head)
        writer.add_layer_norm_eps(h["layer_norm_epsilon"])
        writer.add_file_type(ftype)


ARCHS: list[Arch] = [Bloom()]
