"""peft AdaLoRA adapters: a LoRA in SVD form whose rank training prunes, bit for bit as peft.

peft 0.21's ``SVDLinear.get_delta_weight`` is ``transpose(B @ (A * E), fan_in_fan_out) *
scaling / (ranknum + 1e-5)`` in fp32 (peft's autocast), ``scaling`` being ``lora_alpha`` (or,
when it is not positive, the module's rank) and ``ranknum`` a one-element fp32 tensor; ``merge``
adds it to the weight in the weight's dtype. That is a LoRA product of ``A * E`` and ``B``
(``lora.Factors``, the same windows) scaled by a product and a quotient, in that order.

Every module starts at ``init_r``; ``rank_pattern`` (written by training's budget allocation,
``"<module>.lora_E"`` to one boolean per initial rank) says which ranks a module kept: its saved
tensors have that many, and on loading peft resizes the module to them but keeps ``ranknum`` at
``init_r`` (it copies the old one back), except for a module that kept none (``ranknum`` 0: its
product is zero). The resized module's new parameters are in the base's dtype when the saved
tensors are copied in, so a pattern's modules merge their tensors rounded to the base's dtype
(fp16, bf16), then widened again by the autocast. ``r`` and ``alpha_pattern`` are not used by
AdaLoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FormatError, MismatchError, UnsupportedError
from ..tensor_spec import TensorSpec
from .adapter import AdapterKind, is_number
from .lora import _OTHER_MATH, Factors, FactorSource

PARTS = ("lora_A", "lora_B", "lora_E")


class AdaloraFactors(Factors):
    """``lora.Factors`` of ``A * E`` and ``B``, each window times ``scaling`` then divided by
    ``ranknum + 1e-5``, as peft's two operations (not one product of their quotient)."""

    def __init__(self, source: FactorSource, parts: dict[str, str], scaling: float, ranknum: float,
                 transposed: bool, rows: int, through: torch.dtype | None):
        def loaded(t: torch.Tensor) -> torch.Tensor:
            return t if through is None else t.to(through).to(torch.float32)

        def pick(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return loaded(a) * loaded(source.load(parts["lora_E"])), loaded(b)
        super().__init__(source, parts["lora_A"], parts["lora_B"], scaling, transposed, rows,
                         pick=pick)
        self.divisor = torch.tensor([ranknum]) + 1e-5

    def scale_window(self, window: torch.Tensor) -> None:
        window.mul_(self.scale).div_(self.divisor)


class AdaloraKind(AdapterKind):
    name = "adalora"
    peft_type = "ADALORA"
    parts = PARTS

    def check_config(self, path: Path) -> None:
        for key, why in _OTHER_MATH.items():
            if self.config.get(key):
                raise UnsupportedError(f"{path}: {why}; deltamerge merges AdaLoRA without it")
        if self.config.get("use_dora"):
            raise FormatError(f"{path}: use_dora in an AdaLoRA adapter (peft refuses this config)")
        self.refuse_bias(path, "AdaLoRA")
        init_r, alpha = self.config.get("init_r", 12), self.config.get("lora_alpha", 8)
        if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 0:
            raise FormatError(f"{path}: 'init_r' must be a whole number, not {init_r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise FormatError(f"{path}: 'lora_alpha' must be a number, not {alpha!r}")
        if not is_number(self.config.get("total_step")):
            raise FormatError(f"{path}: 'total_step' must be a positive number (peft refuses "
                              f"{self.config.get('total_step')!r})")
        pattern = self.config.get("rank_pattern") or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, bool) for x in v)
            for k, v in pattern.items()
        ):
            raise FormatError(f"{path}: AdaLoRA's 'rank_pattern' must map '<module>.lora_E' to "
                              "lists of true/false")

    def prepare_plan(self, modules: list[str]) -> None:
        """Each pattern entry's module, as peft's ``resize_modules_by_rank_pattern`` finds it."""
        self._kept: dict[str, list[bool]] = {}
        for key, kept in (self.config.get("rank_pattern") or {}).items():
            parts = key.split(".")
            module = ".".join(parts[:-2] if "default" in key else parts[:-1])
            if module not in modules:
                raise MismatchError(f"{self.weights}: AdaLoRA's rank_pattern names {key!r}, which "
                                    "is no module the adapter adapts: peft fails to load it")
            self._kept[module] = kept

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, AdaloraFactors]:
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise MismatchError(f"{self.weights}: AdaLoRA module {module!r} lacks {', '.join(missing)}")
        flip = self.transposed(spec.name)
        out_dim, in_dim = reversed(spec.shape) if flip else spec.shape
        init_r = self.config.get("init_r", 12)
        kept = self._kept.get(module)
        r = sum(kept) if kept is not None else init_r
        want = {"lora_A": (r, in_dim), "lora_B": (out_dim, r), "lora_E": (r, 1)}
        for p, shape in want.items():
            if self.shape(parts[p]) != shape:
                raise MismatchError(
                    f"{self.weights}: tensor {parts[p]!r} is {list(self.shape(parts[p]))}, not "
                    f"{list(shape)} (rank {r} for {spec.name!r} {list(spec.shape)})"
                )
        alpha = self.config.get("lora_alpha", 8)
        scaling = alpha if alpha > 0 else float(r)
        ranknum = float(init_r) if r > 0 else 0.0
        through = spec.dtype if kept is not None else None  # resized on loading: see above
        return {spec.name: AdaloraFactors(self.source, parts, scaling, ranknum, flip, spec.rows,
                                          through)}
