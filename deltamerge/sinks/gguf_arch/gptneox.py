"""GPT-NeoX (Pythia): the converter's ``GPTNeoXModel`` (``conversion/gptneox.py``).

Its fused ``query_key_value`` is regrouped by kind as BLOOM's is; it writes no ``file_type``.
The tokenizer is a GPT-2 style BPE.

The converter reads ``rotary_pct`` from ``AutoConfig(...).to_dict()``, where transformers 4 kept
it; transformers 5 moves it into ``rope_parameters`` (``partial_rotary_factor``), and the pinned
converter fails there on a KeyError. This writes the file it writes under transformers 4, which
is what users of that pin got for Pythia's config.json (``rotary_pct`` at its top level).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import FormatError, UnsupportedError
from .. import gguf_kv
from .base import Arch, by_kind_order


def rotary_pct(h: dict[str, Any], where: Path) -> float:
    """The ``rotary_pct`` transformers 4's ``to_dict`` gives the converter: config.json's (or
    GPTNeoXConfig's default, 0.25). transformers 5 copies that same number into
    ``rope_parameters['partial_rotary_factor']`` (its default 0.25 too), so either reading gives it;
    a config transformers 5 saved has only the latter, and it is the factor the model rotates by."""
    if "rotary_pct" in h:  # transformers 4, or config.json read as it is
        return h["rotary_pct"]
    factor = (h.get("rope_parameters") or {}).get("partial_rotary_factor")
    if factor is None:
        raise FormatError(f"{where}: GPT-NeoX needs 'rotary_pct' (or rope_parameters' "
                          "'partial_rotary_factor'), found neither")
    return factor


class GPTNeoX(Arch):
    gguf_arch = "GPTNEOX"
    hf_architectures = ("GPTNeoXForCausalLM",)
    label = "GPT-NeoX"

    def check(self, config: dict[str, Any], h: dict[str, Any], where: Path) -> None:
        """A config.json whose ``rotary_pct`` transformers reads as another factor (its
        ``rope_parameters`` say otherwise) names two rotations; which one the model was trained
        with, the files do not say."""
        super().check(config, h, where)
        if "rotary_pct" in config and (factor := rotary_pct(h, where)) != config["rotary_pct"]:
            raise UnsupportedError(f"{where}: 'rotary_pct' {config['rotary_pct']} and rope_parameters' "
                                   f"'partial_rotary_factor' {factor} disagree: llama.cpp's converter "
                                   "reads the first, transformers 5 the second")

    def row_order(
        self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], where: Path
    ) -> tuple[int, ...]:
        n_head = h.get("n_head", h.get("num_attention_heads"))
        return by_kind_order(hf_name, shape, n_head, "attention.query_key_value")

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``GPTNeoXModel.set_gguf_parameters``, with ``rotary_pct`` as transformers 4 gives it."""
        writer.add_context_length(h["max_position_embeddings"])
        writer.add_embedding_length(h["hidden_size"])
        writer.add_block_count(gguf_kv.block_count(h, where))
        writer.add_feed_forward_length(h["intermediate_size"])
        head_dim = h["hidden_size"] // h["num_attention_heads"]
        writer.add_rope_dimension_count(int(rotary_pct(h, where) * head_dim))
        writer.add_head_count(h["num_attention_heads"])
        writer.add_parallel_residual(h.get("use_parallel_residual", True))
        writer.add_layer_norm_eps(h["layer_norm_eps"])


ARCHS: list[Arch] = [GPTNeoX()]
