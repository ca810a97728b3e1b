"""peft RandLoRA adapters: shared random bases, scaled per module, as one LoRA-shaped product.

peft's ``get_delta_weight`` slices the shared ``randlora_A`` ``(r, 1, min)`` and ``randlora_B``
``(max, bases, r)`` to the module (``nb = ceil(min(in, out) / r)`` bases, ``min``/``max`` its
sides), scales A by the module's ``randlora_lambda`` ``(r, nb)`` and ``randlora_gamma``
``(nb, min)`` (``lambda[:, :, None] * A * gamma[None]``), flattens both and multiplies them into
an ``(in, out)`` product whose transpose, times ``randlora_alpha / r``, is the delta; ``merge``
rounds it to the weight's dtype before adding it (``W += delta.to(W.dtype)``: two roundings).
That is ``lora.Factors`` with the flattened bases for factors, transposed, ``round_to`` the
weight's dtype: the same windows, each multiplying peft's own (strided) operands. The bases are
saved with every module (``save_projection``) or, when not, drawn again as peft draws them
(``projections``): ``kaiming_uniform_`` in bf16 (peft's choice wherever bf16 is available, CPU
included; an fp16 draw on a GPU without bf16 is not reproduced), or the sparse ``{-1, 0, 1}``
bases of ``sparse``/``very_sparse``, each divided by its std, then rounded through the layers'
dtype. peft adapts Linear and Conv1D layers; Linear ones are merged here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from .adapter import AdapterKind, is_number
from .lora import Factors
from .projections import WithProjections, layer_dtype
from .targets import stored_name

SHARED = ("randlora_A", "randlora_B")


def bases_of(a: int, r: int) -> int:
    """peft's ``num_bases``: enough bases of rank ``r`` for full rank on ``a``."""
    n = a / r
    return int(n) if n.is_integer() else int(n) + 1


def draw(config: dict, widest_out: int, widest_in: int) -> dict[str, torch.Tensor]:
    """peft's ``_init_randlora_A_randlora_B`` (or its ``_sparse`` variant), on CPU with bf16."""
    r, key = config.get("r", 32), config.get("projection_prng_key", 0)
    big, small = max(widest_out, widest_in), min(widest_out, widest_in)
    generator = torch.Generator(device="cpu").manual_seed(key)
    n = bases_of(small, r)
    if config.get("very_sparse") or config.get("sparse"):
        sparsity = math.sqrt(small) if config.get("very_sparse") else 3
        a = torch.rand((r, 1, small), generator=generator)
        b = torch.rand((big, n, r), generator=generator)
        a_sparse, b_sparse = torch.zeros(a.shape), torch.zeros(b.shape)
        for sparse, dense in ((b_sparse, b), (a_sparse, a)):
            sparse[dense < 1 / (2 * sparsity)] = -1
            sparse[dense > 1 - 1 / (2 * sparsity)] = 1
        return {"randlora_A": a_sparse / a_sparse.std(), "randlora_B": b_sparse / b_sparse.std()}

    def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    a = kaiming((r, 1, small))
    b = torch.cat([kaiming((big, 1, r)) for _ in range(n)], dim=1)
    return {"randlora_A": a / a.std(), "randlora_B": b / b.std()}


def scaled_bases(source, lambda_key: str, gamma_key: str, out_dim: int, in_dim: int, r: int):
    """The ``pick`` that turns the shared bases into peft's two operands ``(a, b)`` of
    ``b @ a = transpose(delta) / scale``, as ``get_scaled_bases`` and ``get_delta_weight`` make
    them (views and copies alike, so the product is the same call)."""
    small, big = min(out_dim, in_dim), max(out_dim, in_dim)
    nb = bases_of(small, r)

    def pick(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam, gamma = source.load(lambda_key), source.load(gamma_key)
        update_b = b[:big, :nb, :].flatten(start_dim=1)
        update_a = (lam[:, :, None] * a[:, :nb, :small] * gamma[None,]).flatten(end_dim=1)
        if small == in_dim:
            return update_b.T, update_a.T
        return update_a, update_b
    return pick


class RandLoraKind(AdapterKind):
    name = "randlora"
    peft_type = "RANDLORA"
    parts = ("randlora_lambda", "randlora_gamma", *SHARED)

    def check_config(self, path: Path) -> None:
        self.refuse_bias(path, "RandLoRA")
        for key, default in (("r", 32), ("randlora_alpha", 640)):
            if not is_number(self.config.get(key, default)):
                raise FormatError(f"{path}: {key!r} must be a number, not {self.config.get(key)!r}")
        key = self.integer_field(path, "projection_prng_key", 0)

    def modules(self) -> dict[str, dict[str, str]]:
        modules = super().modules()
        self.regenerate = self.config.get("save_projection", True) is False
        if self.regenerate:  # saved bases are unexpected keys to peft then: ignored
            modules = {m: {p: k for p, k in parts.items() if p not in SHARED}
                       for m, parts in modules.items()}
        return modules

    def check_selection(self, targeted: set[str], specs: dict[str, TensorSpec]) -> None:
        """peft draws the bases for the widest selected module (``_find_dim``)."""
        if not self.regenerate:
            return
        names = [n for m in targeted if (n := stored_name(f"{m}.weight", specs)) is not None
                 and len(specs[n].shape) == 2]
        if not names:
            return
        drawn = draw(self.config, max(specs[n].shape[0] for n in names),
                     max(specs[n].shape[1] for n in names))
        dtype = layer_dtype(self.weights, names, specs)
        self.source = WithProjections(self.source, {
            p: t.to(dtype).to(torch.float32) for p, t in drawn.items()})

    def shape(self, key: str) -> tuple[int, ...]:
        if isinstance(self.source, WithProjections) and key in self.source.tensors:
            return tuple(self.source.tensors[key].shape)
        return super().shape(key)

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, Factors]:
        self.refuse_conv1d(module, spec.name, "deltamerge merges RandLoRA into Linear layers only")
        out_dim, in_dim = spec.shape
        r = self.config.get("r", 32)
        small, big, nb = min(spec.shape), max(spec.shape), bases_of(min(spec.shape), r)
        shared = {p: self.source.name(p) if self.regenerate else parts.get(p) for p in SHARED}
        got = {p: self.shape(k) if k is not None else None
               for p, k in ({**parts, **shared}).items()}
        a, b = got["randlora_A"], got["randlora_B"]
        if (got.get("randlora_lambda") != (r, nb) or got.get("randlora_gamma") != (nb, small)
                or a is None or b is None or len(a) != 3 or len(b) != 3 or a[:2] != (r, 1)
                or a[2] < small or b[0] < big or b[1] < nb or b[2] != r):
            raise MismatchError(
                f"{self.weights}: RandLoRA module {module!r}: {got} do not make {spec.name!r} "
                f"{list(spec.shape)} with r {r} ({nb} bases): peft fails to load it"
            )
        pick = scaled_bases(self.source, parts["randlora_lambda"], parts["randlora_gamma"],
                            out_dim, in_dim, r)
        scale = self.config.get("randlora_alpha", 640) / r
        return {spec.name: Factors(self.source, shared["randlora_A"], shared["randlora_B"], scale,
                                   True, spec.rows, round_to=spec.dtype, pick=pick)}
