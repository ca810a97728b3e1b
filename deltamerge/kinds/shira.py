"""peft SHiRA adapters: trained values at a sparse set of a weight's positions.

peft saves each module's ``shira_weight`` and the positions it goes to, ``shira_indices``
``(2, n)`` rows and columns; a file without them gets the positions peft's ``random_mask`` draws
when it builds the layer: the first ``r * (out + in)`` of ``torch.randperm(out * in)`` from a CPU
generator seeded with ``random_seed`` (torch's default seed when it is null), in row-major order
(``torch.where(mask)``), drawn here by the same call. ``merge`` adds the values (times
``scaling``, 1) at their positions, in fp32 and rounded once to the weight's dtype: one sum per
element, so each block of rows adds the values that fall in it. peft adapts Linear layers only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta, is_number


def positions(out_dim: int, in_dim: int, r: int, seed: int | None) -> torch.Tensor:
    """peft's random mask as the flat positions ``torch.where`` lists, ascending."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    drawn = torch.randperm(out_dim * in_dim, generator=generator)[: r * (out_dim + in_dim)]
    return drawn.sort().values


class ShiraDelta(RowDelta):
    """The values of ``shira_weight`` added at their positions, a block of rows at a time."""

    def __init__(self, source, parts, out_dim: int, in_dim: int, r: int, seed: int | None):
        super().__init__(source, parts)
        self.shape, self.r, self.seed = (out_dim, in_dim), r, seed

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:
        width = self.shape[1]
        if "shira_indices" in tensors:
            rows, cols = tensors.pop("shira_indices").to(torch.int64)
            flat = rows * width + cols
            if flat.unique().numel() != flat.numel():
                raise MismatchError(f"{self.source.path}: tensor {self.parts['shira_indices']!r} "
                                    "names a position twice")
        else:
            flat = positions(*self.shape, self.r, self.seed)
        order = flat.argsort()
        tensors["positions"] = flat[order]
        tensors["values"] = tensors.pop("shira_weight")[order]

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        t, width = self.tensors(), self.shape[1]
        where = t["positions"]
        lo, hi = torch.searchsorted(where, torch.tensor([r0 * width, (r0 + acc.shape[0]) * width]))
        acc.view(-1).index_add_(0, where[lo:hi] - r0 * width, t["values"][lo:hi])


class ShiraKind(AdapterKind):
    name = "shira"
    peft_type = "SHIRA"
    parts = ("shira_weight", "shira_indices")

    def check_config(self, path: Path) -> None:
        r = self.config.get("r", 32)
        if not is_number(r) or not isinstance(r, int):
            raise FormatError(f"{path}: 'r' must be a positive integer, not {r!r}")
        seed = self.config.get("random_seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise FormatError(f"{path}: 'random_seed' must be an integer or null, not {seed!r}")
        if self.config.get("mask_type", "random") != "random":
            raise UnsupportedError(f"{path}: mask_type {self.config['mask_type']!r}: peft draws "
                                   "SHiRA's positions with its random mask only")

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, ShiraDelta]:
        self.refuse_conv1d(module, spec.name, "peft adapts Linear layers only with SHiRA")
        out_dim, in_dim = spec.shape
        r = self.config.get("r", 32)
        n = r * (out_dim + in_dim)
        got = self.shape(parts["shira_weight"])
        indices = self.shape(parts["shira_indices"]) if "shira_indices" in parts else (2, n)
        if got != (n,) or n > out_dim * in_dim or indices != (2, n):
            raise MismatchError(
                f"{self.weights}: tensor {parts['shira_weight']!r} is {list(got)} (indices "
                f"{list(indices)}) but peft makes [{n}] (r {r}) for {spec.name!r} "
                f"{list(spec.shape)} or refuses the layer"
            )
        return {spec.name: ShiraDelta(self.source, parts, out_dim, in_dim, r,
                                      self.config.get("random_seed"))}
