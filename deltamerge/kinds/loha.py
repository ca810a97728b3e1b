"""peft LoHa adapters (LyCORIS' Hadamard product of two low-rank products), bit for bit as peft.

peft's ``get_delta_weight`` is ``((w1_a @ w1_b) * (w2_a @ w2_b)) * tensor(alpha / r)`` in fp32,
``w*_a`` being ``(out, r)`` and ``w*_b`` ``(r, in)``, with ``r`` and ``alpha`` per module from
``rank_pattern``/``alpha_pattern``; ``merge`` adds it to the weight in the weight's dtype
(``W += delta``: one fp32 sum, rounded once). Rows of the delta need only the same rows of the
``w*_a``, so it streams; the products are computed on a fixed grid of windows as LoRA's are
(``lora.Factors``: the BLAS sums a few rows in another order than the whole product), a
window's two products side by side on the run's compute pool, each on one thread.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta
from .lora import window_rows

PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _product(job: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """One of a window's two products, whole, on one thread (so the bits are peft's)."""
    a, b, out = job
    torch.mm(a, b, out=out)


class LohaDelta(RowDelta):
    """Rows of ``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale``, a window of rows at a time."""

    def __init__(self, source, parts, scale: float, rows: int, width: int):
        super().__init__(source, parts)
        self.scale = torch.tensor(scale)  # peft's own: the scale rounded to fp32
        self.rows = rows
        self.size = window_rows(rows, width)
        self._window_at = -1

    def _window(self, w0: int, scratch: Scratch) -> torch.Tensor:
        """Rows ``[w0, w0 + size)`` of the delta, always on the same grid."""
        t = self.tensors()
        width = t["hada_w1_b"].shape[1]
        window, mine = self.source.window(self, (self.size, width))
        if mine and self._window_at == w0:
            return window
        w1 = w0 + self.size
        other = scratch.get("loha-product", torch.float32, (self.size, width))
        self.source.pool.map(_product, [(t["hada_w1_a"][w0:w1], t["hada_w1_b"], window),
                                        (t["hada_w2_a"][w0:w1], t["hada_w2_b"], other)])
        window.mul_(other).mul_(self.scale)
        self._window_at = w0
        return window

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        r1 = r0 + acc.shape[0]
        k = r0 // self.size * self.size
        while k < r1:
            w0 = min(k, self.rows - self.size)
            window = self._window(w0, scratch)
            lo, hi = max(r0, k), min(r1, k + self.size)
            acc[lo - r0 : hi - r0].add_(window[lo - w0 : hi - w0])
            k += self.size

    def release(self) -> None:
        super().release()
        self._window_at = -1


class LohaKind(AdapterKind):
    name = "loha"
    peft_type = "LOHA"
    parts = (*PARTS, "hada_t1", "hada_t2")

    def check_config(self, path: Path) -> None:
        self.check_patterns(path, ("r", "alpha"))

    def prepare_plan(self, modules: list[str]) -> None:
        self._rank_alpha = self.rank_alpha(modules)

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, LohaDelta]:
        if "hada_t1" in parts or "hada_t2" in parts:
            raise UnsupportedError(
                f"{self.weights}: module {module!r} has LoHa's CP tensors (hada_t1/hada_t2: "
                "convolutions): deltamerge merges LoHa into Linear layers only"
            )
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise MismatchError(f"{self.weights}: LoHa module {module!r} lacks {', '.join(missing)}")
        out_dim, in_dim = spec.shape
        r, alpha = self._rank_alpha[module]
        for p in PARTS:
            want = (out_dim, r) if p.endswith("_a") else (r, in_dim)
            if self.shape(parts[p]) != want:
                raise MismatchError(
                    f"{self.weights}: tensor {parts[p]!r} is {list(self.shape(parts[p]))}, not "
                    f"{list(want)} (rank {r} for {spec.name!r} {list(spec.shape)})"
                )
        return {spec.name: LohaDelta(self.source, parts, alpha / r, out_dim, in_dim)}
