"""peft HRA adapters: the weight times a chain of Householder reflections.

peft 0.21's ``HRALinear.get_delta_weight`` builds an ``in x in`` fp32 matrix from ``hra_u``
(``in x r``, fp32 by peft's autocast): without ``apply_GS`` each column is normalised and the
identity multiplied by ``I - 2 u u^T`` for one column after another, as
``weight - 2 * weight @ u @ u.t()``; with ``apply_GS`` the columns are orthonormalised
(Gram-Schmidt, in peft's order) into ``U`` and the matrix is ``I - 2 U U^T``. ``merge`` computes
``cast_W(mm(fp32(W), M))`` (``rotation.RotationDelta`` streams it by rows). peft adapts
``nn.Linear`` and Conv2d layers only: GPT-2's Conv1D and a convolution's 4-D weight are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from . import Scratch, rotation
from .adapter import AdapterKind
from .rotation import RotationDelta


def gram_schmidt(opt_u: torch.Tensor) -> torch.Tensor:
    """peft's orthonormal columns for ``apply_GS``, in its order of operations."""
    columns = [(opt_u[:, 0] / opt_u[:, 0].norm()).view(-1, 1)]
    for i in range(1, opt_u.shape[1]):
        ui = opt_u[:, i].view(-1, 1)
        for j in range(i):
            ui = ui - (columns[j].t() @ ui) * columns[j]
        columns.append((ui / ui.norm()).view(-1, 1))
    return torch.cat(columns, dim=1)


def householder(opt_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """peft's ``get_delta_weight`` (not ``reverse``), in its order of operations."""
    if apply_gs:
        u = gram_schmidt(opt_u)
        return torch.eye(opt_u.shape[0], dtype=opt_u.dtype) - 2 * u @ u.t()
    opt_u = opt_u / opt_u.norm(dim=0)
    weight = torch.eye(opt_u.shape[0], dtype=opt_u.dtype)
    for i in range(opt_u.shape[1]):
        ui = opt_u[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


def eye_slice(out: torch.Tensor, a: int, rows: bool) -> torch.Tensor:
    """``out`` (``k x n`` or ``n x k``) made rows (or columns) ``[a, a + k)`` of ``torch.eye(n)``."""
    out.zero_()
    j = torch.arange(out.shape[0] if rows else out.shape[1])
    if rows:
        out[j, j + a] = 1
    else:
        out[j + a, j] = 1
    return out


def reflection_factors(u: torch.Tensor, slab: int) -> torch.Tensor:
    """The chain's factors: column ``i`` holds ``(2 * weight) @ u_i`` of peft's loop, the
    vector whose product with ``u_i^T`` step ``i`` subtracts. Row ``p`` of peft's ``weight``
    depends on its own row only, so it is followed ``slab`` rows at a time, never whole (and
    never fewer than ``rotation.MIN_ROWS``: MKL's products of fewer rows sum in another order),
    in the same buffers for every slab (each of peft's operations, written in place)."""
    n, rank = u.shape
    factors = torch.empty(n, rank)
    spans = rotation.windows(n, slab)
    most = max(b - a for a, b in spans)
    weight_buf, twice_buf, outer_buf = (torch.empty(most, n) for _ in range(3))
    factor_buf = torch.empty(most, 1)
    for a, b in spans:
        weight, twice, outer, factor = (t[: b - a] for t in (weight_buf, twice_buf, outer_buf, factor_buf))
        eye_slice(weight, a, rows=True)
        for i in range(rank):
            ui = u[:, i].view(-1, 1)
            torch.mul(weight, 2, out=twice)
            torch.mm(twice, ui, out=factor)
            factors[a:b, i : i + 1] = factor
            torch.mm(factor, ui.t(), out=outer)
            weight.sub_(outer)
    return factors


class HraDelta(RotationDelta):
    def __init__(self, source, parts, rows: int, apply_gs: bool, width: int):
        super().__init__(source, parts, rows, False, width)
        self.apply_gs = apply_gs

    def setup(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.held:
            return
        opt_u = tensors.pop("hra_u")
        if self.apply_gs:
            tensors["u"] = gram_schmidt(opt_u)
        else:
            tensors["u"] = opt_u / opt_u.norm(dim=0)
            tensors["factors"] = reflection_factors(tensors["u"], rotation.WINDOW)

    def matrix(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return householder(tensors.pop("hra_u"), self.apply_gs)

    def window(self, tensors: dict[str, torch.Tensor], a: int, b: int, scratch: Scratch) -> torch.Tensor:
        """Columns ``[a, b)`` of peft's matrix: ``I - 2 U U^T``'s, or the chain's steps on
        those columns of the identity (each step's elements are single products of a factor
        and ``u_i``, so a column needs only its own elements), in place in ``scratch``."""
        u = tensors["u"]
        weight = eye_slice(scratch.get("rotation-window", torch.float32, (self.width, b - a)), a, rows=False)
        outer = scratch.get("rotation-outer", torch.float32, (self.width, b - a))
        if self.apply_gs:
            torch.mm(2 * u, u[a:b].t(), out=outer)
            return weight.sub_(outer)
        factors = tensors["factors"]
        for i in range(u.shape[1]):
            torch.mm(factors[:, i : i + 1], u[a:b, i].view(1, -1), out=outer)
            weight.sub_(outer)
        return weight


class HraKind(AdapterKind):
    name = "hra"
    peft_type = "HRA"
    parts = ("hra_u",)

    def check_config(self, path: Path) -> None:
        r = self.config.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise FormatError(f"{path}: 'r' must be a positive whole number, not {r!r}")
        self.refuse_bias(path, "HRA")

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, HraDelta]:
        if self.transposed(spec.name):
            raise UnsupportedError(f"{self.weights}: module {module!r}: tensor {spec.name!r} is a "
                                   "Conv1D layer, which peft's HRA does not adapt")
        want = (spec.shape[1], self.config.get("r", 8))
        if self.shape(parts["hra_u"]) != want:
            raise MismatchError(
                f"{self.weights}: tensor {parts['hra_u']!r} is {list(self.shape(parts['hra_u']))} "
                f"but peft makes it {list(want)} for {spec.name!r} {list(spec.shape)}"
            )
        return {spec.name: HraDelta(self.source, parts, spec.shape[0],
                                    bool(self.config.get("apply_GS", False)), spec.shape[1])}
