"""Falcon: the converter's ``FalconModel`` (``conversion/falcon.py``).

Its fused ``query_key_value`` holds kv groups (each group's query heads, then its key and its
value head); the converter regroups them as all queries, all keys, all values. The context
length is 2048 whatever the config says. The tokenizer is a GPT-2 style BPE.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...errors import UnsupportedError
from .. import gguf_kv
from .base import Arch, blocks_order


def _heads(h: dict[str, Any]) -> tuple[int, int]:
    n_head = h.get("num_attention_heads")
    if n_head is None:
        n_head = h["n_head"]
    n_kv = h.get("num_kv_heads")
    if n_kv is None:
        n_kv = h.get("n_head_kv", 1)
    return n_head, n_kv


class Falcon(Arch):
    gguf_arch = "FALCON"
    hf_architectures = ("FalconForCausalLM", "RWForCausalLM")
    label = "Falcon"

    def row_order(
        self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], where: Path
    ) -> tuple[int, ...]:
        """``modify_tensors``' regrouping, where its ``view`` of the tensor works: where it fails
        (a ``multi_query`` Falcon, Falcon-7B's layout: transformers gives ``num_kv_heads`` as
        ``num_attention_heads`` while the tensor holds one key and one value head; a fused bias),
        the converter stops with an error, and so does the plan, naming why."""
        if "query_key_value" not in hf_name:
            return ()
        n_head = gguf_kv.find_hparam(h, ("num_attention_heads", "n_head"))
        n_kv = gguf_kv.find_hparam(h, ("num_kv_heads", "n_head_kv")) or 1
        group = n_head // n_kv + 2
        head_dim = h["hidden_size"] // n_head
        if math.prod(shape) != n_kv * group * head_dim * head_dim * n_head:
            raise UnsupportedError(
                f"{where}: tensor {hf_name!r} {list(shape)} is not the {n_kv} kv groups of "
                f"{group} heads of {head_dim} x {head_dim * n_head} that llama.cpp's converter "
                f"regroups for num_attention_heads {n_head}, num_kv_heads {n_kv}; the pinned "
                "converter fails on it (transformers reads a multi_query Falcon, Falcon-7B's layout, "
                "as num_kv_heads = num_attention_heads)")
        queries = [g * group + j for g in range(n_kv) for j in range(group - 2)]
        blocks = queries + [g * group + kind for kind in (group - 2, group - 1) for g in range(n_kv)]
        return blocks_order(blocks, head_dim)

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``FalconModel.set_gguf_parameters``."""
        n_head, n_kv = _heads(h)
        writer.add_context_length(2048)
        writer.add_tensor_data_layout("jploski")
        writer.add_embedding_length(h["hidden_size"])
        writer.add_feed_forward_length(4 * h["hidden_size"])
        writer.add_block_count(gguf_kv.block_count(h, where))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_eps(h["layer_norm_epsilon"])
        writer.add_file_type(ftype)


ARCHS: list[Arch] = [Falcon()]
