"""Gemma 1/2/3: the converter's ``GemmaModel``, ``Gemma2Model``, ``Gemma3Model`` (``conversion/gemma.py``).

Every ``*norm.weight`` gets 1 added (Gemma's RMSNorm scales by ``1 + weight``), in the dtype the
converter computes it: f16 and f32 as they are, others widened to f32 first. ``lm_head`` is
dropped (tied to the embedding). Gemma 1 and 2 write their own few hyperparameters instead of
``TextModel``'s; Gemma 3 writes those and then its own, and cuts the embedding to the tokenizer's
vocabulary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ...errors import FormatError, UnsupportedError
from .. import gguf_kv
from ..gguf_special import SpecialVocab
from .base import Arch
from .bpe import add_gpt2_vocab


def _sentencepiece(writer: Any, folder: Path, h: dict[str, Any]) -> None:
    if not gguf_kv.add_sentencepiece_vocab(writer, folder, h):
        raise UnsupportedError(f"{folder}: GGUF output of a Gemma needs its tokenizer.model, found none")


class Gemma(Arch):
    gguf_arch = "GEMMA"
    hf_architectures = ("GemmaForCausalLM",)
    label = "Gemma"

    def dropped(self, hf_name: str, h: dict[str, Any]) -> bool:
        return hf_name == "lm_head.weight"

    def plus_one(self, hf_name: str, h: dict[str, Any]) -> bool:
        return hf_name.endswith("norm.weight")

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``GemmaModel.set_gguf_parameters``."""
        writer.add_context_length(h["max_position_embeddings"])
        writer.add_embedding_length(h["hidden_size"])
        writer.add_block_count(gguf_kv.block_count(h, where))
        writer.add_feed_forward_length(h["intermediate_size"])
        writer.add_head_count(h["num_attention_heads"])
        writer.add_head_count_kv(h.get("num_key_value_heads", h["num_attention_heads"]))
        writer.add_layer_norm_rms_eps(h["rms_norm_eps"])
        writer.add_key_length(h["head_dim"])
        writer.add_value_length(h["head_dim"])
        writer.add_file_type(ftype)

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        """``GemmaModel.set_vocab``: sentencepiece, then CodeGemma's infill tokens."""
        _sentencepiece(writer, folder, h)
        special = SpecialVocab(folder, load_merges=False,
                                            special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
        for typ, tid in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
            special._set_special_token(typ, tid)
        special.chat_template = None
        special.add_to_gguf(writer, quiet=True)
        writer.add_add_space_prefix(False)


class Gemma2(Gemma):
    gguf_arch = "GEMMA2"
    hf_architectures = ("Gemma2ForCausalLM",)
    label = "Gemma 2"

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``Gemma2Model.set_gguf_parameters``."""
        super().add_parameters(writer, h, ftype, where)
        writer.add_attn_logit_softcapping(h["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(h["final_logit_softcapping"])
        writer.add_sliding_window(h["sliding_window"])

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        _sentencepiece(writer, folder, h)
        writer.add_add_space_prefix(False)


class Gemma3(Gemma):
    gguf_arch = "GEMMA3"
    hf_architectures = ("Gemma3ForCausalLM",)
    label = "Gemma 3"

    def dropped(self, hf_name: str, h: dict[str, Any]) -> bool:
        return False  # Gemma3Model keeps lm_head when there is one

    def kept_rows(self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], folder: Path) -> int:
        """``Gemma3Model.modify_tensors``: the embedding cut to the tokenizer's vocabulary."""
        if "embed_tokens.weight" not in hf_name:
            return shape[0]
        if (folder / "tokenizer.model").is_file():
            n = gguf_kv.find_hparam(h, ("vocab_size_per_layer_input", "vocab_size"))
            return min(shape[0], n) if n else shape[0]
        path = folder / "tokenizer.json"
        try:
            tokenizer = json.loads(path.read_text(encoding="utf-8"))
            n = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{path}: cannot count the tokenizer's vocabulary ({e})") from None
        return min(shape[0], n)

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        """``Gemma3Model.set_gguf_parameters``: ``TextModel``'s, then its own (a key written again
        keeps its place and takes the new value, as in the converter's writer, which warns of it:
        expected here, so not passed on)."""
        gguf_kv.add_parameters(writer, h, ftype, where)
        writer_log = logging.getLogger("gguf.gguf_writer")
        level = writer_log.level
        writer_log.setLevel(logging.ERROR)
        try:
            self._add_own_parameters(writer, h, where)
        finally:
            writer_log.setLevel(level)

    def _add_own_parameters(self, writer: Any, h: dict[str, Any], where: Path) -> None:
        writer.add_context_length(h.get("max_position_embeddings", 131072))
        writer.add_head_count(h.get("num_attention_heads", 8))
        writer.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
        writer.add_key_length(h.get("head_dim", 256))
        writer.add_value_length(h.get("head_dim", 256))
        rope = gguf_kv.rope_parameters(h)
        writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
        if h.get("attn_logit_softcapping") is not None:
            raise UnsupportedError(f"{where}: a Gemma 3 with attn_logit_softcapping is not supported")
        if final := h.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(final)
        if h.get("sliding_window_pattern") != 1:
            writer.add_sliding_window(h["sliding_window"])
        writer.add_head_count_kv(h.get("num_key_value_heads", 4))

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        if gguf_kv.add_sentencepiece_vocab(writer, folder, h):
            writer.add_add_space_prefix(False)
        else:
            add_gpt2_vocab(writer, folder, h)


ARCHS: list[Arch] = [Gemma(), Gemma2(), Gemma3()]
