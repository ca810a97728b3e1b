"""peft IA3 adapters: a learned vector rescales each adapted weight, bit for bit as peft merges it.

peft's ``Linear.merge`` computes ``W' = cast_W(W * transpose(l, fan_in_fan_out))`` with ``l`` in
fp32: ``l`` is ``(out, 1)`` (one factor per output row) or, for the ``feedforward_modules``,
``(1, in)`` (one per input column); which it is shows in its shape. A module that is not
feedforward has its bias rescaled too, ``b' = cast_b(b * l)``. Each element is one fp32 product
rounded once, so any block of rows gives peft's bits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta


class Ia3Delta(RowDelta):
    """Rows of ``W * l``: ``l`` along the rows (``by_row``) or along the columns."""

    def __init__(self, source, parts, by_row: bool):
        super().__init__(source, parts)
        self.by_row = by_row

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        scale = self.tensors()["ia3_l"].reshape(-1)
        if not self.by_row:
            acc.mul_(scale)
            return
        rows = scale[r0 : r0 + acc.shape[0]]
        acc.mul_(rows.view(-1, *([1] * (acc.dim() - 1))))


class Ia3Kind(AdapterKind):
    name = "ia3"
    peft_type = "IA3"
    parts = ("ia3_l",)

    def check_config(self, path: Path) -> None:
        if not isinstance(self.config.get("fan_in_fan_out", False), bool):
            raise FormatError(f"{path}: 'fan_in_fan_out' must be true or false")

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, Ia3Delta]:
        shape = self.shape(parts["ia3_l"])
        flip = bool(self.config.get("fan_in_fan_out"))
        out_dim, in_dim = reversed(spec.shape) if flip else spec.shape
        if shape == (out_dim, 1):
            feedforward = False
        elif shape == (1, in_dim):
            feedforward = True
        else:
            raise MismatchError(
                f"{self.weights}: tensor {parts['ia3_l']!r} is {list(shape)} but {spec.name!r} "
                f"is {list(spec.shape)}: IA3 needs [{out_dim}, 1] or [1, {in_dim}]"
            )
        # A vector along the output rows scales W's rows, unless W is stored transposed.
        deltas = {spec.name: Ia3Delta(self.source, parts, by_row=feedforward == flip)}
        bias = f"{spec.name.removesuffix('.weight')}.bias"
        if not feedforward and bias in specs:
            if specs[bias].shape != (out_dim,):
                raise MismatchError(
                    f"{self.weights}: tensor {bias!r} is {list(specs[bias].shape)}, not [{out_dim}]"
                )
            deltas[bias] = Ia3Delta(self.source, parts, by_row=True)
        return deltas
