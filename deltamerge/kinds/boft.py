"""peft BOFT adapters: a butterfly of block-diagonal rotations of the input side, then a scale.

peft 0.21's ``Linear.get_delta_weight`` makes each ``boft_R`` block (fp32, peft's autocast)
orthogonal by the Cayley transform (``cayley_batch``: ``linalg.solve`` of ``I + Q`` against
``I - Q``, ``Q`` the block's skew-symmetric half) and puts them on the diagonal of an ``in x in``
matrix ``R``; ``merge`` computes ``cast_W(mm(R, fp32(W).t()).t() * boft_s)``, ``boft_s`` one fp32
factor per output row (``rotation.RotationDelta`` streams it by rows). The butterfly's
permutations need peft's CUDA extension (``fbd_cuda``): without it (on CPU) peft sets
``boft_n_butterfly_factor`` to 1, its permutation is the identity (products by it change no
value, so they are left out here), and ``boft_R`` holds one factor. An adapter with more was
made with the extension and is refused, as peft on CPU fails to load it. peft adapts Linear and
Conv2d layers: a convolution's 4-D weight and GPT-2's Conv1D are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind
from .rotation import RotationDelta, block_rows

PARTS = ("boft_R", "boft_s")


def cayley_batch(data: torch.Tensor) -> torch.Tensor:
    """peft's ``BOFTLayer.cayley_batch``, in its order of operations."""
    b, r, c = data.shape
    skew_mat = 0.5 * (data - data.transpose(1, 2))
    id_mat = torch.eye(r).unsqueeze(0).expand(b, r, c)
    return torch.linalg.solve(id_mat + skew_mat, id_mat - skew_mat, left=False)


class BoftDelta(RotationDelta):
    def setup(self, tensors: dict[str, torch.Tensor]) -> None:
        n, d, h, _ = tensors["boft_R"].shape
        tensors["blocks"] = cayley_batch(tensors.pop("boft_R").view(n * d, h, h)).view(n, d, h, h).squeeze(0)

    def matrix(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.block_diag(*torch.unbind(tensors["blocks"]))

    def window(self, tensors: dict[str, torch.Tensor], a: int, b: int, scratch: Scratch) -> torch.Tensor:
        buf = scratch.get("rotation-window", torch.float32, (b - a, self.width))
        return block_rows(tensors["blocks"], a, b, buf)

    def scale_rows(self, prod: torch.Tensor, r0: int) -> None:
        prod.mul_(self.tensors()["boft_s"][r0 : r0 + prod.shape[0]])


class BoftKind(AdapterKind):
    name = "boft"
    peft_type = "BOFT"
    parts = PARTS

    def check_config(self, path: Path) -> None:
        size, num = self.config.get("boft_block_size", 4), self.config.get("boft_block_num", 0)
        for key, value in (("boft_block_size", size), ("boft_block_num", num)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FormatError(f"{path}: {key!r} must be a whole number, not {value!r}")
        if (size != 0) == (num != 0):
            raise FormatError(f"{path}: exactly one of 'boft_block_size' ({size}) and "
                              f"'boft_block_num' ({num}) must be non-zero (peft refuses this config)")
        self.refuse_bias(path, "BOFT")

    def layout(self, module: str, spec: TensorSpec) -> tuple[int, int]:
        """``(blocks, block size)`` as peft's ``update_layer`` makes them without the extension."""
        in_features = spec.shape[1]
        size, num = self.config.get("boft_block_size", 4), self.config.get("boft_block_num", 0)
        divisor = num or size
        if in_features % divisor != 0:
            field = "boft_block_num" if num else "boft_block_size"
            raise MismatchError(f"{self.weights}: BOFT module {module!r}: {field} {divisor} does not "
                                f"divide the {in_features} inputs of {spec.name!r} (peft fails)")
        return (num, in_features // num) if num else (in_features // size, size)

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, BoftDelta]:
        if self.transposed(spec.name):
            raise UnsupportedError(f"{self.weights}: module {module!r}: tensor {spec.name!r} is a "
                                   "Conv1D layer, which peft's BOFT does not adapt")
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise MismatchError(f"{self.weights}: BOFT module {module!r} lacks {', '.join(missing)}")
        num, size = self.layout(module, spec)
        rotations = self.shape(parts["boft_R"])
        if len(rotations) == 4 and rotations[0] > 1 and rotations[1:] == (num, size, size):
            raise UnsupportedError(
                f"{self.weights}: tensor {parts['boft_R']!r} holds {rotations[0]} butterfly factors: "
                "peft merges them only with its CUDA extension (fbd_cuda); on CPU it fails to load "
                "this adapter, and deltamerge does not merge it"
            )
        want = {"boft_R": (1, num, size, size), "boft_s": (spec.shape[0], 1)}
        for p, shape in want.items():
            if self.shape(parts[p]) != shape:
                raise MismatchError(
                    f"{self.weights}: tensor {parts[p]!r} is {list(self.shape(parts[p]))} but peft "
                    f"makes it {list(shape)} for {spec.name!r} {list(spec.shape)}"
                )
        return {spec.name: BoftDelta(self.source, parts, spec.shape[0], True, spec.shape[1])}
