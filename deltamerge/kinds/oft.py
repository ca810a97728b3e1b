"""peft OFT adapters: the input side of each weight rotated by a block-diagonal matrix.

peft 0.21's ``OFTRotationModule.get_weight`` turns each row of ``oft_R`` (fp32, peft's autocast)
into a skew-symmetric ``b x b`` block ``Q``, optionally projected first (``coft``, with ``eps``),
and into ``R = I + 2Q + 2Q^2 + ... + Q^(k-1)`` (``use_cayley_neumann``: ``k`` terms, so ``R`` is not
quite orthogonal) or the Cayley transform ``(I - Q)(I + Q)^-1`` (``linalg.solve``); the blocks
(one shared block with ``block_share``) make the ``in x in`` matrix ``torch.block_diag``. The
merge is ``W' = cast_W(mm(R, fp32(W).t()).t())`` on a Linear layer, ``cast_W(mm(fp32(W), R))`` on
an embedding (``oft_embedding_R``): ``rotation.RotationDelta`` streams either by rows. The
block size is the config's, or ``in / r``, adjusted as peft adjusts one that does not divide the
layer's input (``adjust``); peft makes ``oft_R`` of that shape and fails to load another.
peft adapts Linear, Embedding and Conv2d layers: a convolution's 4-D weight is refused, and so
is GPT-2's Conv1D, which peft does not adapt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, is_number
from .rotation import RotationDelta, block_rows


def adjust(in_features: int, params: int) -> int:
    """peft's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``params``."""
    if params < in_features:
        higher = params
        while higher <= in_features and in_features % higher != 0:
            higher += 1
    else:
        return in_features
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (params - lower) <= (higher - params) else higher


def skew(vec: torch.Tensor, block: int) -> torch.Tensor:
    """peft's ``_pytorch_skew_symmetric``: each row of ``vec`` above the diagonal, mirrored."""
    rows, cols = torch.triu_indices(block, block, 1)
    matrix = torch.zeros(vec.shape[0], block, block, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def project(vec: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """peft's ``_project_batch`` (COFT): each block kept within ``eps`` of zero."""
    oft_r = skew(vec, block)
    eps = eps * 1 / torch.sqrt(torch.tensor(oft_r.shape[0]))
    zero = torch.zeros((oft_r.size(1), oft_r.size(1)), dtype=oft_r.dtype).unsqueeze(0).expand_as(oft_r)
    diff = oft_r - zero
    norm_diff = torch.norm(oft_r - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm_diff <= eps).bool(), oft_r, zero + eps * (diff / norm_diff))
    rows, cols = torch.triu_indices(block, block, 1)
    return out[:, rows, cols]


def cayley(vec: torch.Tensor, block: int, neumann: bool, terms: int) -> torch.Tensor:
    """peft's ``_cayley_batch``: the blocks, in its order of operations."""
    b = vec.shape[0]
    q = skew(vec, block)
    if not neumann:
        eye = torch.eye(block).unsqueeze(0).expand(b, block, block)
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = torch.eye(block, dtype=vec.dtype).repeat(b, 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            power = torch.bmm(power, q)
            r.add_(power)
    return r


class OftDelta(RotationDelta):
    def __init__(self, source, parts, rows: int, transposed: bool, config: dict, block: int, rank: int):
        super().__init__(source, parts, rows, transposed, block * rank)
        self.config, self.block, self.rank = config, block, rank

    def setup(self, tensors: dict[str, torch.Tensor]) -> None:
        vec = tensors.pop(next(iter(tensors)))
        if self.config.get("coft", False):
            vec = project(vec, self.block, self.config.get("eps", 6e-5))
        blocks = cayley(vec, self.block, self.config.get("use_cayley_neumann", True),
                        self.config.get("num_cayley_neumann_terms", 5))
        tensors["blocks"] = blocks.expand(self.rank, -1, -1) if blocks.shape[0] == 1 else blocks

    def matrix(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.block_diag(*torch.unbind(tensors["blocks"]))

    def window(self, tensors: dict[str, torch.Tensor], a: int, b: int, scratch: Scratch) -> torch.Tensor:
        blocks = tensors["blocks"]
        buf = scratch.get("rotation-window", torch.float32, (b - a, self.width))
        if self.transposed:
            return block_rows(blocks, a, b, buf)
        cols = scratch.get("rotation-columns", torch.float32, (self.width, b - a))
        return cols.copy_(block_rows(blocks.transpose(1, 2), a, b, buf).t())


class OftKind(AdapterKind):
    name = "oft"
    peft_type = "OFT"
    parts = ("oft_R", "oft_embedding_R")

    def check_config(self, path: Path) -> None:
        r, block = self.config.get("r", 0), self.config.get("oft_block_size", 32)
        for key, value in (("r", r), ("oft_block_size", block),
                           ("num_cayley_neumann_terms", self.config.get("num_cayley_neumann_terms", 5))):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError(f"{path}: {key!r} must be a whole number, not {value!r}")
        if (r != 0) == (block != 0):
            raise FormatError(f"{path}: exactly one of 'r' ({r}) and 'oft_block_size' ({block}) "
                              "must be non-zero (peft refuses this config)")
        if self.config.get("coft") and not is_number(self.config.get("eps", 6e-5)):
            raise FormatError(f"{path}: 'eps' must be a number, not {self.config.get('eps')!r}")
        self.refuse_bias(path, "OFT")

    def layout(self, in_features: int) -> tuple[int, int]:
        """``(r, block size)`` as peft's ``update_layer`` picks them for ``in_features``."""
        r, block = self.config.get("r", 0), self.config.get("oft_block_size", 32)
        if r == 0:
            if in_features % block != 0 or block > in_features:
                block = adjust(in_features, block)
            return in_features // block, block
        if in_features % r != 0 or r > in_features:
            r = adjust(in_features, r)
        return r, in_features // r

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, OftDelta]:
        if len(parts) != 1:
            raise MismatchError(f"{self.weights}: OFT module {module!r} has both oft_R and "
                                "oft_embedding_R")
        (part, key), = parts.items()
        embedding = part == "oft_embedding_R"
        if not embedding and self.transposed(spec.name):
            raise UnsupportedError(f"{self.weights}: module {module!r}: tensor {spec.name!r} is a "
                                   "Conv1D layer, which peft's OFT does not adapt")
        rank, block = self.layout(spec.shape[1])
        want = (1 if self.config.get("block_share") else rank, block * (block - 1) // 2)
        if self.shape(key) != want:
            raise MismatchError(
                f"{self.weights}: tensor {key!r} is {list(self.shape(key))} but peft makes it "
                f"{list(want)} for {spec.name!r} {list(spec.shape)} ({rank} blocks of {block})"
            )
        return {spec.name: OftDelta(self.source, parts, spec.shape[0], not embedding, self.config,
                                    block, rank)}
