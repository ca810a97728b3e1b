"""Qwen2/2.5 and Qwen3: the converter's ``Qwen2Model`` and ``Qwen3Model`` (``conversion/qwen.py``).

Renames only: rows stay as they are (no q/k permutation), the q/k/v biases and Qwen3's q/k
norms are written F32 like every bias and norm. The tokenizer is a GPT-2 style BPE (or
sentencepiece's ``tokenizer.model`` where there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import UnsupportedError
from .. import gguf_kv
from .base import Arch
from .bpe import add_gpt2_vocab


class Qwen2(Arch):
    gguf_arch = "QWEN2"
    hf_architectures = ("Qwen2ForCausalLM",)
    label = "Qwen2/2.5"

    def check(self, config: dict[str, Any], h: dict[str, Any], where: Path) -> None:
        super().check(config, h, where)
        if (where.parent / "modules.json").is_file():
            raise UnsupportedError(f"{where.parent}/modules.json: GGUF output of a sentence-transformers "
                                   "model (its pooling) is not supported")

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        """``Qwen2Model.set_vocab``: sentencepiece, else GPT-2 style BPE."""
        if not gguf_kv.add_sentencepiece_vocab(writer, folder, h):
            add_gpt2_vocab(writer, folder, h)


class Qwen3(Qwen2):
    gguf_arch = "QWEN3"
    hf_architectures = ("Qwen3ForCausalLM",)
    label = "Qwen3"


ARCHS: list[Arch] = [Qwen2(), Qwen3()]
