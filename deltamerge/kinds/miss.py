"""peft MiSS adapters: one trained block shared along the weight's columns (or, "bat", per row block).

peft's ``MissLinear.merge`` (``init_weights`` true, false or ``"mini"``) adds ``miss_block``
``B`` ``(r, out)`` to every ``r`` columns of the weight, ``W[o, i] + B[i % r, o]`` (a last partial
block gets ``B``'s first rows), in fp32 and rounded once to the weight's dtype; ``"mini"`` stores
``(r, mini_r)`` and repeats it along ``out``. Each element is one sum, so any block of rows is
exact. With ``init_weights="bat"`` ``miss_block`` is ``(out / r, r, r)`` and the weight, cut into
``r x r`` tiles, becomes ``W + (W_tile @ B[a] + B[a])`` for the tiles of row block ``a``: rows
``a*r..`` depend only on themselves, so blocks of whole ``r`` rows (``Step.row_multiple``) are
computed by peft's own reshapes and batched product. peft adapts Linear layers only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from . import ApplyOptions, Scratch, lora
from .adapter import AdapterKind, RowDelta, is_number


class MissDelta(RowDelta):
    """``W[o, i] + B[i % r, o]``, ``B`` repeated along ``out`` to its full width (``"mini"``)."""

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        bt = self.tensors()["miss_block"].T  # (out, or mini_r, x r)
        rows = torch.arange(r0, r0 + acc.shape[0]) % bt.shape[0]
        cols = torch.arange(acc.shape[1]) % bt.shape[1]
        acc.add_(bt[rows][:, cols])


class MissBatDelta(RowDelta):
    """``init_weights="bat"``: ``W + (W_tile @ B + B)``, a block of whole row tiles at a time."""

    def __init__(self, source, parts, r: int):
        super().__init__(source, parts)
        self.r = r

    def merge(self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch) -> None:
        b, r = self.tensors()["miss_block"], self.r
        step = max(1, lora.MERGE_ROWS // r) * r
        for a in range(0, out.shape[0], step):
            e = min(out.shape[0], a + step)
            acc = scratch.get("adapter-acc", torch.float32, (e - a, out.shape[1]))
            acc.copy_(cur[a:e])
            tiles = acc.reshape((e - a) // r, r, acc.shape[1] // r, r).permute(2, 0, 1, 3)
            blocks = b[(r0 + a) // r : (r0 + e) // r]
            delta = (tiles @ blocks + blocks).permute(1, 2, 0, 3).reshape(acc.shape)
            acc.add_(delta)
            out[a:e].copy_(acc)

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        raise AssertionError("MissBatDelta merges whole tiles itself")


class MissKind(AdapterKind):
    name = "miss"
    peft_type = "MISS"
    parts = ("miss_block",)

    def check_config(self, path: Path) -> None:
        self.refuse_bias(path, "MiSS")
        for key, default in (("r", 64), ("mini_r", 1)):
            value = self.config.get(key, default)
            if not is_number(value) or not isinstance(value, int):
                raise FormatError(f"{path}: {key!r} must be a positive integer, not {value!r}")
        if self.config.get("init_weights", True) not in (True, False, "bat", "mini"):
            raise FormatError(f"{path}: init_weights {self.config['init_weights']!r} is not true, "
                              "false, 'bat' or 'mini'")

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, RowDelta]:
        self.refuse_conv1d(module, spec.name, "peft adapts Linear layers only with MiSS")
        out_dim, in_dim = spec.shape
        r, mini_r = self.config.get("r", 64), self.config.get("mini_r", 1)
        init = self.config.get("init_weights", True)
        want = {"bat": (out_dim // r, r, r), "mini": (r, mini_r)}.get(init, (r, out_dim))
        divides = (in_dim % r == 0 and out_dim % r == 0) if init == "bat" else (
            out_dim % mini_r == 0 if init == "mini" else True)
        got = self.shape(parts["miss_block"])
        if got != want or r > in_dim or not divides:
            raise MismatchError(
                f"{self.weights}: tensor {parts['miss_block']!r} is {list(got)} but peft makes "
                f"{list(want)} for {spec.name!r} {list(spec.shape)} (r {r}, init_weights "
                f"{init!r}{f', mini_r {mini_r}' if init == 'mini' else ''}) or refuses the layer"
            )
        if init == "bat":
            return {spec.name: MissBatDelta(self.source, parts, r)}
        return {spec.name: MissDelta(self.source, parts)}

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        """"bat" deltas need blocks of whole ``r``-row tiles."""
        after, steps = super().plan(specs, options)
        for step in steps.values():
            if isinstance(getattr(step, "factors", None), MissBatDelta):
                step.row_multiple = step.factors.r
        return after, steps
