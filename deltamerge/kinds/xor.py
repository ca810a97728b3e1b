"""Lossless tensor XOR deltas: delta bits = bits(target) XOR bits(base cast to the target's dtype).

An additive fp16 delta loses elements where base and target are far apart; a XOR of the bits
loses nothing, so base XOR delta gives the target back bit for bit in any dtype. Rows the target
has beyond the base's (an extended vocabulary) are XORed with zero, i.e. stored as they are;
apply therefore starts them at zero too, and refuses ``--new-rows mean``, which would XOR them
with the mean of the base's rows and rebuild something the publisher never made.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch

from ..dtypes import BITS_DTYPE
from ..errors import InputError
from ..readers import Checkpoint, open_checkpoint
from ..safetensors_format import TensorSpec
from . import ApplyOptions, Kind, RowInput, Scratch, Step, is_non_weight
from .add import check_pairing, count_differences


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


class XorKind(Kind):
    name = "xor"

    def __init__(self, folder: Path, checkpoint: Checkpoint | None = None):
        super().__init__(folder)
        self.checkpoint = checkpoint or open_checkpoint(folder)

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        if options.new_rows == "mean":
            raise InputError(
                f"{self.folder}: --new-rows mean does not apply to a XOR delta: rows beyond the "
                "base were XORed with zero when it was made"
            )
        check_pairing(self.checkpoint, specs)
        names = [n for n in self.checkpoint.specs if not is_non_weight(n)]
        after = {n: self.checkpoint.specs[n] for n in names}
        after.update({n: s for n, s in specs.items() if n not in after})
        return after, {n: XorStep(specs[n], self.checkpoint, n) for n in names}

    def aux_files(self):
        return dict(self.checkpoint.aux_files())

    def weight_files(self) -> list[Path]:
        return list(self.checkpoint.files)

    def close(self) -> None:
        self.checkpoint.close()


class MakeXorStep(Step):
    """What make-delta writes for ``--kind xor``; also rebuilds each block as apply will.

    The rebuilt rows go to ``on_result`` (the publisher's result digest) and are compared with
    the target, so ``mismatches`` is a real check of the round trip, not an assumption.
    """

    def __init__(self, before: TensorSpec | None, target: Checkpoint, name: str):
        super().__init__(before, target.specs[name])
        self.inputs = (RowInput(target, name),)
        self.mismatches = 0
        self.on_result = None  # set by make-delta: called with each block of the rebuilt tensor
        self._rebuilt: deque[torch.Tensor] = deque()

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        target = inputs[0]
        _xor_into(target, cur, out, scratch)
        rebuilt = scratch.keep("xor-rebuilt", target.dtype, tuple(target.shape))
        _xor_into(out, cur, rebuilt, scratch)
        self.mismatches += count_differences(rebuilt, target, scratch)
        self._rebuilt.append(rebuilt)

    def seal(self) -> None:
        rebuilt = self._rebuilt.popleft()
        if self.on_result is not None:
            self.on_result(rebuilt)
