"""The architectures GGUF output supports, one module each, behind one interface (:class:`Arch`).

Each module mirrors one of llama.cpp's converter classes (``conversion/*.py`` of the pinned
``convert_hf_to_gguf.py``): which GGUF architecture it writes, the tensors it drops, how a
tensor's rows change on the way (q/k head permutation, +1 on norms), the hyperparameter and
tokenizer key/values, and the tensors it generates from the config alone (``rope_freqs``).
:func:`plan_gguf` asks the architecture for all of that before any data, so a new architecture
is one module registered here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import UnsupportedError
from .. import gguf_kv

try:
    import gguf
except ImportError:
    gguf = None


class Arch:
    """A converter class of llama.cpp: the defaults are ``TextModel``'s."""

    gguf_arch = "LLAMA"  # a gguf.MODEL_ARCH member's name
    hf_architectures: tuple[str, ...] = ()
    label = ""  # the models it covers, for the refusal message
    refused_keys: tuple[str, ...] = ("quantization_config", "text_config", "mrope_section")

    @property
    def model_arch(self) -> Any:
        return gguf.MODEL_ARCH[self.gguf_arch]

    def check(self, config: dict[str, Any], h: dict[str, Any], where: Path) -> None:
        """Refuse what the converter's class handles another way (experts, pre-quantized weights)."""
        arch = config["architectures"][0]
        for key in self.refused_keys:
            if config.get(key) is not None or h.get(key) is not None:
                raise UnsupportedError(f"{where}: GGUF output of a {arch} with {key!r} is not supported")

    def dropped(self, hf_name: str, h: dict[str, Any]) -> bool:
        """Tensors the converter leaves out (besides transformers' buffers, which every class drops)."""
        return False

    def permute_heads(self, hf_name: str, h: dict[str, Any]) -> int:
        """``LlamaModel.permute``'s head count for this tensor's rows; 0: rows kept in order."""
        return 0

    def map_name(self, hf_name: str) -> str:
        """The name the converter looks up in llama.cpp's tensor map (BLOOM strips ``transformer.``)."""
        return hf_name

    def row_order(self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any]) -> tuple[int, ...]:
        """The source row of each GGUF row, for a tensor the converter regroups as a whole (fused
        qkv); empty: rows in their order."""
        return ()

    def plus_one(self, hf_name: str, h: dict[str, Any]) -> bool:
        """Whether the converter adds 1 to the tensor (Gemma's norms)."""
        return False

    def kept_rows(self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], folder: Path) -> int:
        """How many of the tensor's rows the converter keeps (Gemma 3 cuts its embedding to the
        tokenizer's vocabulary); the rest are dropped as they stream."""
        return shape[0]

    def add_parameters(self, writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
        gguf_kv.add_parameters(writer, h, ftype, where)

    def add_vocab(self, writer: Any, folder: Path, h: dict[str, Any]) -> None:
        """``TextModel.set_vocab``: a GPT-2 style BPE."""
        from .bpe import add_gpt2_vocab

        add_gpt2_vocab(writer, folder, h)

    def generated(self, writer: Any, h: dict[str, Any], where: Path) -> list[tuple[str, torch.Tensor]]:
        """Tensors made from the config (GGUF name, f32 data), written before all others; a key
        the converter adds while making them goes into ``writer`` (before ``general.*``, as there)."""
        return []


def blocks_order(blocks: list[int], block_rows: int) -> tuple[int, ...]:
    """The row order that puts source block ``blocks[i]`` (of ``block_rows`` rows) at block i."""
    return tuple(b * block_rows + r for b in blocks for r in range(block_rows))


def by_kind_order(hf_name: str, shape: tuple[int, ...], n_head: int, suffix: str) -> tuple[int, ...]:
    """BLOOM's and GPT-NeoX's fused qkv, (n_head, 3, head_dim) rows made (3, n_head, head_dim)."""
    if not hf_name.endswith((f"{suffix}.weight", f"{suffix}.bias")):
        return ()
    return blocks_order([head * 3 + kind for kind in range(3) for head in range(n_head)],
                        shape[0] // (3 * n_head))


def _registry() -> dict[str, Arch]:
    from . import bloom, falcon, gemma, gptneox, llama, phi3, qwen

    archs: list[Arch] = [*llama.ARCHS, *qwen.ARCHS, *gemma.ARCHS, *phi3.ARCHS, *falcon.ARCHS,
                         *bloom.ARCHS, *gptneox.ARCHS]
    return {name: arch for arch in archs for name in arch.hf_architectures}


def supported() -> list[str]:
    return list(_registry())


def for_config(config: dict[str, Any], where: Path) -> Arch:
    """The module for config.json's first architecture, or a one-line refusal listing the supported."""
    arches = config.get("architectures")
    name = arches[0] if isinstance(arches, list) and arches else None
    arch = _registry().get(name) if isinstance(name, str) else None
    if arch is None:
        raise UnsupportedError(
            f"{where}: GGUF output supports {', '.join(supported())}; "
            f"not {name or 'a config without architectures'}")
    return arch
