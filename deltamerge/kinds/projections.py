"""Shared random projections peft regenerates instead of saving them (``save_projection: false``).

VeRA and RandLoRA share one pair of frozen random tensors across every module. Saved, they are in
the adapter's file; otherwise peft draws them again when it loads the adapter, from a CPU
``torch.Generator`` seeded with ``projection_prng_key``, sized by the widest selected module, and
each wrapped layer then casts them to its weight's dtype before the adapter's upcast to fp32.
:class:`WithProjections` serves the drawn tensors under names of their own to the code that reads
factors from the file (``lora.Factors``), which then treats them like saved ones.
"""

from __future__ import annotations

import torch

from ..compute_pool import ComputePool
from ..errors import UnsupportedError
from ..tensor_spec import TensorSpec
from .lora import FactorSource

GENERATED = "<regenerated>."  # the prefix of a drawn tensor's name: no key in a file has it


def layer_dtype(where: object, names: list[str], specs: dict[str, TensorSpec]) -> torch.dtype:
    """The dtype peft's layers round the projections through: their weights' (one for all)."""
    dtypes = {specs[n].dtype for n in names}
    if len(dtypes) != 1:
        raise UnsupportedError(
            f"{where}: the selected modules' weights have dtypes {sorted(map(str, dtypes))}: peft "
            "casts the regenerated projections through each in turn; deltamerge does not"
        )
    return dtypes.pop()


class WithProjections:
    """A ``FactorSource`` that also serves the regenerated projections (fp32, whole)."""

    def __init__(self, source: FactorSource | WithProjections, tensors: dict[str, torch.Tensor]):
        # a kind planned again draws again: it replaces what it drew, never wraps it twice
        self.source = source.source if isinstance(source, WithProjections) else source
        self.tensors = {GENERATED + k: v for k, v in tensors.items()}

    def name(self, part: str) -> str:
        return GENERATED + part

    def load(self, name: str, keep: bool = False) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        return self.source.load(name, keep)

    @property
    def pool(self) -> ComputePool:
        return self.source.pool

    def window(self, owner: object, shape: tuple[int, int]) -> tuple[torch.Tensor, bool]:
        return self.source.window(owner, shape)

    def windows(
        self, owner: object, shape: tuple[int, int], starts: list[int]
    ) -> list[tuple[torch.Tensor, bool]]:
        return self.source.windows(owner, shape, starts)

    def close(self) -> None:
        self.source.close()
