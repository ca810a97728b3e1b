"""peft LoKr adapters (LyCORIS' Kronecker product), bit for bit as peft merges them.

peft's ``get_delta_weight`` is ``kron(w1, w2) * (alpha / r)`` in fp32, ``w1`` being ``lokr_w1``
or ``lokr_w1_a @ lokr_w1_b`` (``decompose_both``) and ``w2`` ``lokr_w2`` or ``lokr_w2_a @
lokr_w2_b`` (when ``r`` is small next to its shape), with ``r`` and ``alpha`` per module from
``rank_pattern``/``alpha_pattern``. Which of these peft makes, and their shapes, follow from the
weight's shape, ``r``, ``decompose_both`` and ``decompose_factor`` (``peft_layout``); peft loads
only those, so a file with others is refused (its factors would be dropped, the module left at
its init). ``merge`` adds the delta to the weight in the weight's dtype (one fp32 sum, rounded
once). ``w1`` and ``w2`` are small (about the square root of the weight) and computed whole, as
peft does; each element of ``kron`` is one product, so row ``p * b + q`` of the delta is
``outer(w1[p], w2[q])`` flattened, times the scale, for any block of rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta

PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's ``lokr.layer.factorization``: two factors of ``dimension``, the smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def peft_layout(
    out_dim: int, in_dim: int, r: float, both: bool, factor: int
) -> dict[str, tuple[int, int]]:
    """The parameters peft's ``update_layer`` makes for a Linear layer, with their shapes."""
    (in_m, in_n), (out_l, out_k) = factorization(in_dim, factor), factorization(out_dim, factor)
    want: dict[str, tuple[int, int]] = {}
    if both and r < max(out_l, in_m) / 2:
        want.update(lokr_w1_a=(out_l, r), lokr_w1_b=(r, in_m))
    else:
        want["lokr_w1"] = (out_l, in_m)
    if r < max(out_k, in_n) / 2:
        want.update(lokr_w2_a=(out_k, r), lokr_w2_b=(r, in_n))
    else:
        want["lokr_w2"] = (out_k, in_n)
    return want


class LokrDelta(RowDelta):
    """Rows of ``kron(w1, w2) * scale``."""

    def __init__(self, source, parts, scale: float):
        super().__init__(source, parts)
        self.scale = scale

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:
        for w in ("lokr_w1", "lokr_w2"):
            if w not in tensors:
                tensors[w] = tensors[f"{w}_a"] @ tensors[f"{w}_b"]

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        t = self.tensors()
        w1, w2 = t["lokr_w1"], t["lokr_w2"]
        b = w2.shape[0]
        rows = torch.arange(r0, r0 + acc.shape[0])
        delta = scratch.get("lokr-rows", torch.float32, (acc.shape[0], w1.shape[1], w2.shape[1]))
        torch.mul(w1[rows // b].unsqueeze(2), w2[rows % b].unsqueeze(1), out=delta)
        delta.mul_(self.scale)
        acc.add_(delta.view(acc.shape))


class LokrKind(AdapterKind):
    name = "lokr"
    peft_type = "LOKR"
    parts = PARTS

    def check_config(self, path: Path) -> None:
        self.check_patterns(path, ("r", "alpha"))
        self.integer_field(path, "decompose_factor", -1)

    def prepare_plan(self, modules: list[str]) -> None:
        self._rank_alpha = self.rank_alpha(modules)

    def _factor(self, module: str, parts: dict[str, str], w: str, r: float) -> tuple[int, int]:
        """The shape of ``w`` (``lokr_w1`` or ``lokr_w2``), given whole or as ``_a @ _b``."""
        if w in parts:
            if f"{w}_a" in parts or f"{w}_b" in parts:
                raise MismatchError(f"{self.weights}: LoKr module {module!r} has {w} twice")
            shape = self.shape(parts[w])
            if len(shape) != 2:
                raise MismatchError(f"{self.weights}: tensor {parts[w]!r} is {list(shape)}")
            return shape
        a, b = (self.shape(parts[k]) if k in parts else None for k in (f"{w}_a", f"{w}_b"))
        if a is None or b is None:
            raise MismatchError(f"{self.weights}: LoKr module {module!r} lacks {w} (or {w}_a/_b)")
        if len(a) != 2 or len(b) != 2 or a[1] != r or b[0] != r:
            raise MismatchError(
                f"{self.weights}: tensors {parts[f'{w}_a']!r} {list(a)} and {parts[f'{w}_b']!r} "
                f"{list(b)} are not factors of rank {r}"
            )
        return a[0], b[1]

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, LokrDelta]:
        if "lokr_t2" in parts:
            raise UnsupportedError(
                f"{self.weights}: module {module!r} has LoKr's CP tensor lokr_t2 (convolutions): "
                "deltamerge merges LoKr into Linear layers only"
            )
        r, alpha = self._rank_alpha[module]
        (a, c), (b, d) = self._factor(module, parts, "lokr_w1", r), self._factor(module, parts, "lokr_w2", r)
        if (a * b, c * d) != spec.shape:
            raise MismatchError(
                f"{self.weights}: LoKr module {module!r}: kron of [{a}, {c}] and [{b}, {d}] is "
                f"[{a * b}, {c * d}] but tensor {spec.name!r} is {list(spec.shape)}"
            )
        want = peft_layout(*spec.shape, r, bool(self.config.get("decompose_both")),
                           self.config.get("decompose_factor", -1))
        got = {p: self.shape(k) for p, k in parts.items()}
        if got != want:
            raise MismatchError(
                f"{self.weights}: LoKr module {module!r} stores {got} but peft makes {want} for "
                f"{spec.name!r} (r {r}, decompose_both, decompose_factor) and loads only those"
            )
        return {spec.name: LokrDelta(self.source, parts, alpha / r)}
