"""Lossless tensor XOR deltas: delta bits = bits(target) XOR bits(base cast to the target's dtype).

An additive fp16 delta loses elements where base and target are far apart; a XOR of the bits
loses nothing, so base XOR delta gives the target back bit for bit in any dtype. Rows the target
has beyond the base's (an extended vocabulary) are XORed with zero, i.e. stored as they are;
apply therefore starts them at zero too, and refuses ``--new-rows mean``, which would XOR them
with the mean of the base's rows and rebuild something the publisher never made.
"""

from __future__ import annotations

import torch

from ..dtypes import BITS_DTYPE
from ..errors import InputError
from ..sources import Checkpoint
from ..tensor_spec import TensorSpec
from . import ApplyOptions, RowInput, Scratch, Step
from .add import MakeStep, TensorDelta


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS_DTYPE[t.element_size()])


def _xor_into(stored: torch.Tensor, cur: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
    """``out`` = bits(stored) XOR bits(cur cast to stored's dtype), in ``stored``'s dtype.

    ``out`` may have another dtype (``--dtype``, or a later step's buffer): the XOR is then made
    in a scratch buffer and cast, since bits only mean something in the dtype they were made in.
    """
    shape = tuple(stored.shape)
    cast = cur
    if cur.dtype != stored.dtype:
        cast = scratch.get("xor-cast", stored.dtype, shape)
        cast.copy_(cur)
    if out.dtype == stored.dtype:
        torch.bitwise_xor(_bits(stored), _bits(cast), out=_bits(out))
        return
    result = scratch.get("xor-result", stored.dtype, shape)
    torch.bitwise_xor(_bits(stored), _bits(cast), out=_bits(result))
    out.copy_(result)


class XorStep(Step):
    def __init__(self, before: TensorSpec, delta: Checkpoint, name: str):
        super().__init__(before, delta.specs[name])
        self.inputs = (RowInput(delta, name),)

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        _xor_into(inputs[0], cur, out, scratch)


class XorKind(TensorDelta):
    name = "xor"
    step = XorStep

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        if options.new_rows == "mean":
            raise InputError(
                f"{self.folder}: --new-rows mean does not apply to a XOR delta: rows beyond the "
                "base were XORed with zero when it was made"
            )
        return super().plan(specs, options)


class MakeXorStep(MakeStep):
    """bits(target) XOR bits(base cast to the target's dtype): lossless."""

    def encode(self, target, cur, out, scratch: Scratch) -> None:
        _xor_into(target, cur, out, scratch)

    def decode(self, delta, cur, out, scratch: Scratch) -> None:
        _xor_into(delta, cur, out, scratch)
