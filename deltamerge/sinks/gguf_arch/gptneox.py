"""GPT-NeoX (Pythia): the converter's ``GPTNeoXModel`` (``conversion/gptneox.py``).

Its fused ``query_key_value`` is regrouped by kind as BLOOM's is; it writes no ``file_type``.
The tokenizer is a GPT-2 style BPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UnsupportedError
from .. import gguf_kv
from .base import Arch, by_kind_order


class GPTNeoX(Arch):
    gguf_arch = "GPTNEOX"
    hf_architectures = ("GPTNeoXForCausalLM",)
    label = "GPT-NeoX"

    def row_order(self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any]) -> tuple[int, ...]:
        n_head = h.get("n_head", h.get("num_attention_heads"))
        return by_kind_order(hf_name, shape, n_head, "attention.query_key_value")

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``GPTNeoXModel.set_gguf_parameters``, which reads ``rotary_pct``: transformers 5's
        ``AutoConfig`` moves it into ``rope_parameters``, and the converter fails then; so does this."""
        if "rotary_pct" not in h:
            raise UnsupportedError(f"{where}: GGUF output of GPT-NeoX needs rotary_pct, which this "
                                   "transformers reads into rope_parameters (llama.cpp's converter fails "
                                   "on it too)")
        writer.add_context_length(h["max_position_embeddings"])
        writer.add_embedding_length(h["hidden_size"])
        writer.add_block_count(gguf_kv.block_count(h, where))
        writer.add_feed_forward_length(h["intermediate_size"])
        writer.add_rope_dimension_count(int(h["rotary_pct"] * (h["hidden_size"] // h["num_attention_heads"])))
        writer.add_head_count(h["num_attention_heads"])
        writer.add_parallel_residual(h.get("use_parallel_residual", True))
        writer.add_layer_norm_eps(h["layer_norm_eps"])


ARCHS: list[Arch] = [GPTNeoX()]
