"""A module's delta that peft computes whole (an FFT over the weight), added a block of rows at a time.

FourierFT's inverse 2-D FFT and C3A's block-circulant FFTs mix every row of the weight, so their
rows cannot be formed alone and still round as peft's do: the delta is computed whole, by peft's
own calls (C3A's by tiles of its columns, each computed alone; FourierFT's only when small, a
larger one goes by windows: ``fourierft.SpectrumDelta``), at its tensor's first block, held
(fp32, or the weight's dtype where peft rounds the delta to it: C3A) while that tensor streams
and released after its last block. Only one tensor's delta is held at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import Scratch
from .adapter import RowDelta
from .lora import FactorSource

Build = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class DenseDelta(RowDelta):
    """Rows of ``build(parts)`` (an ``(out, in)`` delta, fp32 or narrower: the add widens it
    exactly) added to the weight's fp32 rows, rounded once, as peft's ``W += delta``;
    ``transposed``: the weight is stored ``(in, out)`` (GPT-2's Conv1D, peft's ``fan_in_fan_out``)."""

    def __init__(self, source: FactorSource, parts: dict[str, str], build: Build, transposed: bool):
        super().__init__(source, parts)
        self.build = build
        self.transposed = transposed

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:
        delta = self.build(tensors)
        tensors.clear()  # the parameters are not needed once the delta is formed
        tensors["delta"] = delta.T if self.transposed else delta

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        acc.add_(self.tensors()["delta"][r0 : r0 + acc.shape[0]])
