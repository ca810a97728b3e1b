"""Additive deltas (Vicuna, Alpaca, StableVicuna): result = fp32(base) + fp32(delta), rounded.

This is bit for bit what FastChat's fp16 ``param.data += delta`` computes on CPU, and what
Alpaca's fp32 ``weight_diff.py recover`` computes. Rows of ``embed_tokens`` / ``lm_head`` beyond
the base's (Vicuna v0's added ``[PAD]``) start at zero (FastChat) or at the base rows' mean
(Alpaca), as the engine's fill says.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MismatchError
from ..readers import Checkpoint, open_checkpoint
from ..safetensors_format import TensorSpec
from . import ApplyOptions, Kind, RowInput, Scratch, Step, is_non_weight

VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")


def check_pairing(
    delta: Checkpoint, base_specs: dict[str, TensorSpec], role: str = "the delta"
) -> None:
    """Refuse a delta (or target) that does not fit the base: one-sided tensors, bad shapes."""
    base_name = "the base"
    for name, d in delta.specs.items():
        if is_non_weight(name):
            continue
        b = base_specs.get(name)
        if b is None:
            raise MismatchError(f"{delta.file_of(name)}: tensor {name!r} is not in {base_name}")
        grows = d.shape[1:] == b.shape[1:] and d.rows > b.rows and name.endswith(VOCAB_TENSORS)
        if d.shape != b.shape and not grows:
            raise MismatchError(
                f"{delta.file_of(name)}: tensor {name!r} has shape {list(d.shape)} in {role} "
                f"but {list(b.shape)} in {base_name}"
            )
    for name in base_specs:
        if name not in delta.specs and not is_non_weight(name):
            raise MismatchError(f"{delta.path}: tensor {name!r} of {base_name} is not in {role}")


class AddStep(Step):
    def __init__(self, before: TensorSpec, delta: Checkpoint, name: str):
        super().__init__(before, delta.specs[name])
        self.inputs = (RowInput(delta, name),)

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        if out.dtype == torch.float32:
            out.copy_(cur)
            out.add_(inputs[0])
            return
        acc = scratch.get("add", torch.float32, tuple(out.shape))
        acc.copy_(cur)
        acc.add_(inputs[0])
        out.copy_(acc)


class AddKind(Kind):
    name = "add"

    def __init__(self, folder: Path, checkpoint: Checkpoint | None = None):
        super().__init__(folder)
        self.checkpoint = checkpoint or open_checkpoint(folder)

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        check_pairing(self.checkpoint, specs)
        names = [n for n in self.checkpoint.specs if not is_non_weight(n)]
        after = {n: self.checkpoint.specs[n] for n in names}
        after.update({n: s for n, s in specs.items() if n not in after})
        return after, {n: AddStep(specs[n], self.checkpoint, n) for n in names}

    def aux_files(self):
        return dict(self.checkpoint.aux_files())

    def weight_files(self) -> list[Path]:
        return list(self.checkpoint.files)

    def close(self) -> None:
        self.checkpoint.close()


class MakeAddStep(Step):
    """target - base in the target's dtype; also what apply will rebuild from it, to report and hash.

    ``result`` receives the rows apply will produce (base + stored delta), so make-delta can count
    the elements fp16 rounding loses and record the publisher's result digest in one pass.
    """

    def __init__(self, before: TensorSpec | None, target: Checkpoint, name: str):
        super().__init__(before, target.specs[name])
        self.inputs = (RowInput(target, name),)
        self.mismatches = 0
        self.on_result = None  # set by make-delta: called with each block of the rebuilt tensor

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        target = inputs[0]
        shape = tuple(out.shape)
        acc = scratch.get("add", torch.float32, shape)
        acc.copy_(target)
        acc.sub_(cur)
        out.copy_(acc)
        rebuilt = scratch.get("rebuilt", target.dtype, shape)
        acc.copy_(cur)
        acc.add_(out)
        rebuilt.copy_(acc)
        self.mismatches += count_differences(rebuilt, target)
        if self.on_result is not None:
            self.on_result(rebuilt)


def count_differences(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (so -0.0 against 0.0 counts, NaN against itself does not)."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return int((a.view(bits) != b.view(bits)).sum())
