"""Additive deltas (Vicuna, Alpaca, StableVicuna): result = fp32(base) + fp32(delta), rounded.

This is bit for bit what FastChat's fp16 ``param.data += delta`` computes on CPU, and what
Alpaca's fp32 ``weight_diff.py recover`` computes. Rows of ``embed_tokens`` / ``lm_head`` beyond
the base's (Vicuna v0's added ``[PAD]``) start at zero (FastChat) or at the base rows' mean
(Alpaca), as the engine's fill says.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch

from ..dtypes import BITS_DTYPE
from ..errors import MismatchError
from ..sources import Checkpoint, open_checkpoint
from ..tensor_spec import TensorSpec
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
        rounded_sum(cur, inputs[0], out, scratch)


def rounded_sum(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, scratch: Scratch, subtract: bool = False
) -> None:
    """``out = round(fp32(a) ± fp32(b))``, rounded once into ``out.dtype``.

    When all three share a dtype, torch's own add is that computation (CPU fp16/bf16 kernels
    widen to fp32 and round once: bit for bit FastChat's ``param.data += delta``) and is ten
    times faster than the fp32 path; mixed dtypes widen both into fp32 buffers first, because
    mixed-dtype in-place arithmetic is slower still.
    """
    op = torch.sub if subtract else torch.add
    if a.dtype == b.dtype == out.dtype:
        op(a, b, out=out)
        return
    shape = tuple(out.shape)
    if out.dtype == torch.float32:
        wide_a = a if a.dtype == torch.float32 else scratch.get("add_a", torch.float32, shape).copy_(a)
        wide_b = b if b.dtype == torch.float32 else scratch.get("add_b", torch.float32, shape).copy_(b)
        op(wide_a, wide_b, out=out)
        return
    acc = scratch.get("add_a", torch.float32, shape)
    acc.copy_(a)
    wide_b = b if b.dtype == torch.float32 else scratch.get("add_b", torch.float32, shape).copy_(b)
    op(acc, wide_b, out=acc)
    out.copy_(acc)


class TensorDelta(Kind):
    """A delta stored as one tensor per base tensor (additive or XOR): same names, same rows."""

    step: type[Step]

    def __init__(self, folder: Path, checkpoint: Checkpoint | None = None):
        super().__init__(folder)
        self.checkpoint = checkpoint or open_checkpoint(folder)

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        check_pairing(self.checkpoint, specs)
        names = [n for n in self.checkpoint.specs if not is_non_weight(n)]
        after = {n: self.checkpoint.specs[n] for n in names}
        after.update({n: s for n, s in specs.items() if n not in after})
        return after, {n: self.step(specs[n], self.checkpoint, n) for n in names}

    def aux_files(self):
        return dict(self.checkpoint.aux_files())

    def close(self) -> None:
        self.checkpoint.close()


class AddKind(TensorDelta):
    name = "add"
    step = AddStep


class MakeStep(Step):
    """What make-delta writes for one tensor; also what apply will rebuild from it.

    The rebuilt rows are compared with the target (``mismatches``: the elements a lossy delta
    does not reproduce; zero for XOR, checked rather than assumed) and handed to ``on_result``
    (the publisher's result digest) at once, from the compute stage's own buffer: setting them
    aside for the seal would cost a buffer per slot (measured: make-delta's peak 476 -> 442 MiB
    at 32 MiB blocks), and the compute stage is not what a make-delta run waits on.
    """

    def __init__(self, before: TensorSpec | None, target: Checkpoint, name: str):
        super().__init__(before, target.specs[name])
        self.inputs = (RowInput(target, name),)
        self.mismatches = 0
        self.on_result = None  # set by make-delta: called with each block of the rebuilt tensor

    @abstractmethod
    def encode(self, target: torch.Tensor, cur: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
        """The stored delta of these rows."""

    @abstractmethod
    def decode(self, delta: torch.Tensor, cur: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> None:
        """What apply computes from the stored delta: exactly the apply step's arithmetic."""

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        target = inputs[0]
        self.encode(target, cur, out, scratch)
        rebuilt = scratch.get("rebuilt", target.dtype, tuple(target.shape))
        self.decode(out, cur, rebuilt, scratch)
        self.mismatches += count_differences(rebuilt, target, scratch)
        if self.on_result is not None:
            self.on_result(rebuilt)


class MakeAddStep(MakeStep):
    """target - base in the target's dtype (fp32 arithmetic, rounded once).

    ``overflows`` counts the elements whose difference is beyond the dtype's range (fp16's
    65504): stored as Inf, they rebuild as Inf, so make-delta names the tensors that have any.
    """

    def __init__(self, before: TensorSpec | None, target: Checkpoint, name: str):
        super().__init__(before, target, name)
        self.overflows = 0

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        super().apply(cur, inputs, r0, out, scratch)
        self.overflows += count_overflows(out, inputs[0], scratch)

    def encode(self, target, cur, out, scratch: Scratch) -> None:
        rounded_sum(target, cur, out, scratch, subtract=True)

    def decode(self, delta, cur, out, scratch: Scratch) -> None:
        rounded_sum(cur, delta, out, scratch)


def count_differences(a: torch.Tensor, b: torch.Tensor, scratch: Scratch) -> int:
    """Elements whose bits differ (so -0.0 against 0.0 counts, NaN against itself does not)."""
    bits = BITS_DTYPE[a.element_size()]
    flags = scratch.get("differ", torch.bool, tuple(a.shape))
    torch.ne(a.view(bits), b.view(bits), out=flags)
    return int(torch.count_nonzero(flags))


def count_overflows(delta: torch.Tensor, target: torch.Tensor, scratch: Scratch) -> int:
    """Elements of ``delta`` that are ±Inf where the target is finite: a difference that
    overflowed. The common case (none) costs two comparisons into a reused buffer."""
    if not delta.is_floating_point():
        return 0
    flags = scratch.get("differ", torch.bool, tuple(delta.shape))
    if not any(bool(torch.eq(delta, v, out=flags).any()) for v in (float("inf"), float("-inf"))):
        return 0
    return int(torch.count_nonzero(torch.isinf(delta) & torch.isfinite(target)))
