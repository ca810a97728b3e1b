"""peft IA3 adapters: a learned vector rescales each adapted weight, bit for bit as peft merges it.

peft's ``Linear.merge`` computes ``W' = cast_W(W * transpose(l, fan_in_fan_out))`` with ``l`` in
fp32 (``fan_in_fan_out`` true on ``Conv1D`` layers, false on ``nn.Linear``, whatever the config
says: ``AdapterKind.transposed``): ``l`` is ``(out, 1)`` (one factor per output row) or, for the
``feedforward_modules``, ``(1, in)`` (one per input column); which it is shows in its shape, and
must be what the config's ``feedforward_modules`` says (a full-match regex, or names a module's
name ends with; peft sizes the vector by it and fails to load one of the other shape). A module
that is not feedforward has its bias rescaled too, ``b' = cast_b(b * l)``. Each element is one
fp32 product rounded once, so any block of rows gives peft's bits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta
from .lora import ADAPTER_CONFIG
from .patterns import Rule, run_rules


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
        ff, targets = self.config.get("feedforward_modules"), self.config.get("target_modules")
        if ff is not None and not isinstance(ff, str) and not (
                isinstance(ff, list) and all(isinstance(f, str) for f in ff)):
            raise FormatError(f"{path}: feedforward_modules must be a string or a list of strings")
        if isinstance(ff, list) and isinstance(targets, list) and not set(ff) <= set(targets):
            raise FormatError(f"{path}: feedforward_modules {sorted(set(ff) - set(targets))} are "
                              "not in target_modules (peft refuses this config)")

    def prepare_plan(self, modules: list[str]) -> None:
        """The modules the config calls feedforward (None: peft's default for the model type,
        which only the vectors' shapes show here)."""
        ff = self.config.get("feedforward_modules")
        if ff is None:
            self._feedforward = None
        elif isinstance(ff, str):
            rule = Rule("feedforward_modules", ff, ff, "fullmatch")
            hits = run_rules(self.folder / ADAPTER_CONFIG, [rule], modules)[0]
            self._feedforward = {modules[i] for i in hits}
        else:
            self._feedforward = {m for m in modules if any(m.endswith(f) for f in ff)}

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, Ia3Delta]:
        shape = self.shape(parts["ia3_l"])
        flip = self.transposed(spec.name)
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
        if self._feedforward is not None and feedforward != (module in self._feedforward):
            want = [1, in_dim] if not feedforward else [out_dim, 1]
            raise MismatchError(
                f"{self.weights}: tensor {parts['ia3_l']!r} is {list(shape)} but feedforward_modules "
                f"{'does not select' if feedforward else 'selects'} {module!r}: peft makes it "
                f"{want} and fails to load this adapter"
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
