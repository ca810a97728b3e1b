"""peft FourierFT adapters: a sparse spectrum whose inverse 2-D FFT is added to the weight.

peft's ``get_delta_weight`` places the module's ``fourierft_spectrum`` (``n_frequency`` values,
fp32) at positions of an ``(out, in)`` zero matrix that it never saves: the first
``n_frequency`` of ``torch.randperm(out * in)`` from a CPU generator seeded with the config's
``random_loc_seed``, as ``(p // in, p % in)``; the delta is ``ifft2(dense).real * scaling`` in
fp32, and ``merge`` adds it (transposed on Conv1D) to the weight in the weight's dtype, rounded
once. The positions are drawn here by the same call, so they are peft's; the delta is formed by
peft's own calls, whole (``dense_delta``: the FFT mixes every row, and MKL's ``ifft2`` is not,
for every shape, the same bits as 1-D transforms of the rows, then of the columns, which could
stream: it is for 5120 x 13824 and 96 x 600, not for 172 x 64 nor 300 x 300). At 13B's MLP
widths its complex input and output (540 MiB each) make the peak, not ``randperm``'s.
``n_frequency`` is per module from ``n_frequency_pattern`` (the first key ``k`` with
``re.match(rf".*\\.{k}$", module)``, else the module's own name, else ``n_frequency``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from .adapter import AdapterKind, is_number
from .dense_delta import DenseDelta
from .lora import ADAPTER_CONFIG
from .patterns import suffix_pattern_values


def positions(out_dim: int, in_dim: int, n: int, seed: int) -> torch.Tensor:
    """peft's ``indices``: rows and columns of the spectrum's values, ``(2, n)``."""
    drawn = torch.randperm(out_dim * in_dim, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([drawn // in_dim, drawn % in_dim], dim=0)


def delta(spectrum: torch.Tensor, out_dim: int, in_dim: int, seed: int, scaling: float) -> torch.Tensor:
    """peft's ``FourierFTLayer.get_delta_weight`` with fp32 parameters (its autocast)."""
    indices = positions(out_dim, in_dim, spectrum.shape[0], seed)
    dense = torch.zeros(out_dim, in_dim)
    dense[indices[0, :], indices[1, :]] = spectrum.float()
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


class FourierFTKind(AdapterKind):
    name = "fourierft"
    peft_type = "FOURIERFT"
    parts = ("fourierft_spectrum",)

    def check_config(self, path: Path) -> None:
        self.refuse_bias(path, "FourierFT")
        for key, default in (("n_frequency", 1000), ("scaling", 150.0)):
            if not is_number(self.config.get(key, default)):
                raise FormatError(f"{path}: {key!r} must be a number, not {self.config.get(key)!r}")
        seed = self.config.get("random_loc_seed", 777)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FormatError(f"{path}: 'random_loc_seed' must be an integer (peft draws the "
                              f"spectrum's positions from it), not {seed!r}")
        pattern = self.config.get("n_frequency_pattern") or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in pattern.items()):
            raise FormatError(f"{path}: 'n_frequency_pattern' must map module patterns to counts")

    def prepare_plan(self, modules: list[str]) -> None:
        """Each module's ``n_frequency``, as peft's ``_create_and_replace`` picks it."""
        self._n = suffix_pattern_values(self.folder / ADAPTER_CONFIG, "n_frequency_pattern",
                                        self.config.get("n_frequency_pattern") or {}, modules,
                                        self.config.get("n_frequency", 1000))

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, DenseDelta]:
        flip = self.transposed(spec.name)
        out_dim, in_dim = reversed(spec.shape) if flip else spec.shape
        n = self._n[module]
        got = self.shape(parts["fourierft_spectrum"])
        if got != (n,) or n > out_dim * in_dim:
            raise MismatchError(
                f"{self.weights}: tensor {parts['fourierft_spectrum']!r} is {list(got)} but peft "
                f"makes [{n}] (n_frequency) for {spec.name!r} {list(spec.shape)} and fails to load it"
            )
        seed, scaling = self.config.get("random_loc_seed", 777), self.config.get("scaling", 150.0)

        def build(t: dict[str, torch.Tensor]) -> torch.Tensor:
            return delta(t["fourierft_spectrum"], out_dim, in_dim, seed, scaling)
        return {spec.name: DenseDelta(self.source, parts, build, flip)}
