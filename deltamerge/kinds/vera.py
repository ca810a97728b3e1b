"""peft VeRA adapters: LoRA with frozen shared random factors and trained per-row scales.

peft's ``get_delta_weight`` is ``transpose((lambda_b * B[:out]) @ (lambda_d * A[:, :in]),
fan_in_fan_out)`` in fp32 (the layer's ``fan_in_fan_out``: ``AdapterKind.transposed``), ``A``
(``vera_A``, r x widest in) and ``B`` (``vera_B``, widest out x r) shared by every module and
saved once with the adapter (``save_projection``) or, when not, drawn again as peft draws them
(``projections``: ``_kaiming_init`` of ``A`` then ``B`` from one generator seeded with
``projection_prng_key``, rounded through the layers' dtype); ``merge`` adds it to the weight in
the weight's dtype. That is a LoRA product with ``lambda_d * A[:, :in]`` for A,
``lambda_b * B[:out]`` for B and no scale, so ``lora.Factors`` forms it in the same windows, the
scaled factors computed when its tensor's first block needs them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import MismatchError
from ..tensor_spec import TensorSpec
from .adapter import AdapterKind
from .lora import Factors, FactorSource
from .projections import WithProjections, layer_dtype
from .targets import stored_name

SHARED = ("vera_A", "vera_B")


def scaled(source: FactorSource, lambda_b: str, lambda_d: str, rows: int, cols: int):
    """The ``pick`` that turns the shared A and B into this module's scaled factors."""
    def pick(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, s = source.load(lambda_d), source.load(lambda_b)
        return d.unsqueeze(-1) * a[:, :cols], s.unsqueeze(-1) * b[:rows]
    return pick


class VeraKind(AdapterKind):
    name = "vera"
    peft_type = "VERA"
    parts = ("vera_lambda_b", "vera_lambda_d", *SHARED)

    def check_config(self, path: Path) -> None:
        self.refuse_bias(path, "VeRA")
        self.integer_field(path, "projection_prng_key", 0)

    def modules(self) -> dict[str, dict[str, str]]:
        modules = super().modules()
        shared = {p: k for parts in modules.values() for p, k in parts.items() if p in SHARED}
        self.regenerate = self.config.get("save_projection", True) is False
        if self.regenerate:  # saved ones are unexpected keys to peft then: ignored
            shared = {}
        elif sorted(shared) != sorted(SHARED):
            raise MismatchError(f"{self.weights}: a VeRA adapter without vera_A and vera_B")
        self.shared = shared
        return {m: parts for m, parts in modules.items() if not set(parts) & set(SHARED)}

    def check_selection(self, targeted: set[str], specs: dict[str, TensorSpec]) -> None:
        """peft sizes vera_A and vera_B by the widest selected module (``_find_dim``) and fails
        to load saved ones of another size."""
        shapes, names = [], []
        for module in targeted:
            name = stored_name(f"{module}.weight", specs)
            if name is not None and len(specs[name].shape) == 2:
                flip = self.transposed(name)
                shapes.append(tuple(reversed(specs[name].shape)) if flip else specs[name].shape)
                names.append(name)
        if self.regenerate:
            if not shapes:
                return  # nothing selected (dummy-target-modules): nothing drawn
            self.draw(max(s[0] for s in shapes), max(s[1] for s in shapes),
                      layer_dtype(self.weights, names, specs))
        (r, widest_in), (widest_out, _) = (self.shape(self.shared[p]) for p in SHARED)
        if self.config.get("r", 256) != r:
            raise MismatchError(f"{self.weights}: vera_A has rank {r} but the config's r is "
                                f"{self.config.get('r', 256)!r}: peft fails to load it")
        if not shapes:
            return
        want = (max(s[0] for s in shapes), max(s[1] for s in shapes))
        if (widest_out, widest_in) != want:
            raise MismatchError(
                f"{self.weights}: vera_A and vera_B fit modules up to [{widest_out}, {widest_in}] "
                f"but the modules the config selects are up to {list(want)}: peft sizes them by "
                "those and fails to load this adapter"
            )

    def draw(self, widest_out: int, widest_in: int, dtype: torch.dtype) -> None:
        """peft's ``_init_vera_A_vera_B``: ``vera_A`` then ``vera_B`` from one generator, each
        ``uniform(-bound, bound)`` with peft's ``_kaiming_init`` bound, then the layers' cast."""
        r = self.config.get("r", 256)
        generator = torch.Generator(device="cpu").manual_seed(self.config.get("projection_prng_key", 0))
        drawn = {}
        for part, shape in (("vera_A", (r, widest_in)), ("vera_B", (widest_out, r))):
            bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
            drawn[part] = torch.empty(shape).uniform_(-bound, bound, generator=generator)
            drawn[part] = drawn[part].to(dtype).to(torch.float32)
        self.source = WithProjections(self.source, drawn)
        self.shared = {p: self.source.name(p) for p in SHARED}

    def shape(self, key: str) -> tuple[int, ...]:
        if isinstance(self.source, WithProjections) and key in self.source.tensors:
            return tuple(self.source.tensors[key].shape)
        return super().shape(key)

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, Factors]:
        flip = self.transposed(spec.name)
        out_dim, in_dim = reversed(spec.shape) if flip else spec.shape
        (r, widest_in), (widest_out, r_b) = (self.shape(self.shared[p]) for p in SHARED)
        lambda_b, lambda_d = (self.shape(parts[p]) if p in parts else None
                              for p in ("vera_lambda_b", "vera_lambda_d"))
        if (lambda_b != (out_dim,) or lambda_d != (r,) or r_b != r or widest_in < in_dim
                or widest_out < out_dim):
            raise MismatchError(
                f"{self.weights}: VeRA module {module!r}: lambda_b {lambda_b}, lambda_d {lambda_d}, "
                f"vera_A [{r}, {widest_in}] and vera_B [{widest_out}, {r_b}] do not make "
                f"{spec.name!r} {list(spec.shape)}"
            )
        pick = scaled(self.source, parts["vera_lambda_b"], parts["vera_lambda_d"], out_dim, in_dim)
        return {spec.name: Factors(self.source, self.shared["vera_A"], self.shared["vera_B"], 1.0,
                                   flip, spec.rows, pick=pick)}
