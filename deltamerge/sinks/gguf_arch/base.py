"""What every architecture module shares: :class:`Arch`, whose defaults are llama.cpp's
``TextModel``, and the row orders fused tensors are regrouped by."""


from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import UnsupportedError
from .. import gguf_kv
from .bpe import add_gpt2_vocab

try:
    import gguf
except ImportError:
    gguf = None


@dataclass(frozen=True)
class Stacked:
    """Where a Hugging Face tensor goes in a tensor the converter stacks from several (Mixtral's
    experts): slot ``slot`` of ``slots`` of ``names[index]``. ``names`` are the stacked tensors of
    its layer, each the name the converter looks up in llama.cpp's map, in the order it writes them
    once the layer's last stacked tensor has come."""

    names: tuple[str, ...]
    index: int
    slot: int
    slots: int


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

    def row_order(
        self, hf_name: str, shape: tuple[int, ...], h: dict[str, Any], where: Path
    ) -> tuple[int, ...]:
        """The source row of each GGUF row, for a tensor the converter regroups as a whole (fused
        qkv); empty: rows in their order."""
        return ()

    def stacked(self, hf_name: str, h: dict[str, Any], where: Path) -> Stacked | None:
        """The slot the tensor fills in a stacked tensor; None: a tensor of its own."""
        return None

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
