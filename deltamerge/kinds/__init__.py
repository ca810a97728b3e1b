"""The delta kinds, each one small module behind the same two interfaces.

A :class:`Kind` plans: given the tensors so far (the base's, or the result of earlier deltas in a
chain) it says what each tensor becomes and returns a :class:`Step` for every tensor it changes.
A :class:`Step` computes: given rows ``[r0, r1)`` of the tensor before it and the same rows of
the delta tensors it declared as ``inputs``, it writes rows of the tensor after it. The engine
owns reading, buffers, hashing and writing; a kind owns only its arithmetic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compute_pool import ComputePool
from ..dtypes import itemsize
from ..sources import Checkpoint
from ..tensor_spec import TensorSpec

# Tensors that are buffers, not weights: a delta that lacks them leaves the base's copy alone.
NON_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)


def is_non_weight(name: str) -> bool:
    return name.endswith(NON_WEIGHT_SUFFIXES)


class Scratch:
    """Reused buffers, one per purpose, so no block allocates fresh memory: the compute
    stage's are overwritten by the next block; a slot's last until its block is done."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = itemsize(dtype)
        for d in shape:
            nbytes *= d
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._buffers[key] = buf
        return buf[:nbytes].view(dtype).view(shape)


@dataclass(frozen=True)
class RowInput:
    """A tensor a step reads in the same row blocks as the tensor it changes."""

    checkpoint: Checkpoint
    name: str

    @property
    def spec(self) -> TensorSpec:
        return self.checkpoint.specs[self.name]


class Step(ABC):
    """One delta's effect on one tensor.

    ``before`` and ``after`` are the tensor's spec on either side of the step; ``after.dtype`` is
    the step's natural result dtype (what it rounds to when another step follows).
    """

    inputs: tuple[RowInput, ...] = ()
    # Rows per block must be a multiple of this (NF4 blocks run along the flattened tensor).
    row_multiple: int = 1
    # True: the engine feeds every row of the base tensor to ``feed`` before the first block
    # (NF4 double quantization needs the mean over the whole tensor); only a first step may ask.
    first_pass: bool = False

    def __init__(self, before: TensorSpec | None, after: TensorSpec):
        self.before = before
        self.after = after

    @abstractmethod
    def apply(
        self, cur: torch.Tensor, inputs: list[torch.Tensor], r0: int, out: torch.Tensor,
        scratch: Scratch,
    ) -> None:
        """Write into ``out`` (rows ``[r0, r0 + len(out))`` of the result, in ``out.dtype``).

        ``cur`` holds the same rows of the tensor before the step, rows the base lacks already
        filled in; ``inputs`` the same rows of each of ``self.inputs``.
        """

    def feed(self, rows: torch.Tensor, r0: int) -> None:  # noqa: B027 - optional hook
        """With ``first_pass``: rows ``[r0, r0 + len(rows))`` of the base, in order, before ``apply``."""

    def end_first_pass(self) -> None:  # noqa: B027 - optional hook
        """With ``first_pass``: every row has been fed."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release anything the step loaded (LoRA factors) once its tensor is done."""


@dataclass
class ApplyOptions:
    """What the user chose, as every kind sees it."""

    new_rows: str = "zero"  # "zero" | "mean": how rows beyond the base start
    qlora: str | None = None  # None | "nf4" | "nf4-dq": LoRA onto the NF4 round trip of the base
    qlora_dtype: torch.dtype | None = None  # the dtype the base was quantized from (default: its own)
    qlora_scope: str = "all-linear"  # names.QLORA_SCOPES: every Linear layer, or the targets only
    qlora_kernel: str = "cuda"  # names.QLORA_KERNELS: bitsandbytes' CUDA or CPU rules
    safe_merge: bool = False  # peft's safe_merge: a Linear layer's product rounded before the add
    # A LoRA state dict without adapter_config.json (PandaGPT's pytorch_model.pt) names these:
    lora_r: int | None = None  # checked against the factors' shapes, which give the rank anyway
    lora_alpha: float | None = None  # required: nothing in the factors gives it
    lora_prefix: str | None = None  # what precedes the base's names in the keys (else detected)
    # The run's --threads, which compute the LoRA products (and quantize GGUF rows).
    pool: ComputePool = field(default_factory=ComputePool)


class Kind(ABC):
    """A delta of one kind, opened from its folder.

    ``checkpoint`` is the delta's tensors where it has them as a checkpoint, so that apply can
    check them against the delta's manifest.
    """

    name: str = "?"
    checkpoint: Checkpoint | None = None

    def __init__(self, folder: Path):
        self.folder = folder

    @abstractmethod
    def plan(
        self, specs: dict[str, TensorSpec], options: ApplyOptions
    ) -> tuple[dict[str, TensorSpec], dict[str, Step]]:
        """The tensors after this delta, and a step for each tensor it changes."""

    def aux_files(self) -> dict[str, Path | bytes]:
        """Non-weight files this delta brings (config, tokenizer)."""
        return {}

    def config_updates(self) -> dict:
        """Fields of the result's config.json this delta sets, known once it has planned."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""


def same_specs(a: TensorSpec, b: TensorSpec) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape
