"""PEFT LoRA adapters, merged while streaming, bit for bit as peft's ``merge_and_unload`` on CPU.

peft computes ``W' = cast_W(fp32(W) + transpose(fp32(B) @ fp32(A)) * s)``, ``s = alpha / r``
(``alpha / sqrt(r)`` with ``use_rslora``), with ``r`` and ``alpha`` per module from
``rank_pattern`` / ``alpha_pattern``. (peft loads fp16/bf16 factors as fp32, its default
``autocast_adapter_dtype``, so the product is an fp32 matmul; the scale multiplies the product,
not a factor.) One exception, measured against peft 0.21 and matched here: for embedding LoRA
(``lora_embedding_A/B``) peft's ``Embedding.merge`` rounds the product to the weight's dtype
before adding it (``W += delta.to(W.dtype)``), so an fp16/bf16 embedding is rounded twice where
Linear layers are rounded once. Whole tensors an adapter stores (``modules_to_save``, or the
``base_layer`` of an embedding that peft saves with embedding LoRA) replace the base's, entering
the model in its dtype as ``load_state_dict`` puts them there, before any LoRA product is added.

A LoRA on a parameter rather than a module (peft's ``target_parameters``, its ``ParamWrapper``:
how peft adapts Mixtral's fused experts in transformers 5) rounds the product to the weight's
dtype before adding it, as embeddings do. A 3-D parameter of E experts has factors
``A`` (E*r, in) and ``B`` (out, r*E) whose expert ``e`` is ``A[e*r:(e+1)*r]`` and ``B[:, e::E]``
(peft's ``einsum("o r e, e r i -> e o i")``); ``targets.py`` finds where the base stores it.
A state dict without ``adapter_config.json`` (PandaGPT's ``pytorch_model.pt``: peft's names under
``llama_model.``, next to tensors of its own) is merged the same way, with its alpha given by
the user; its tensors that are not factors and not the base's are kept under their own names.
An adapter with a config has no such tensors (peft would drop them): one is refused. Its config
selects the modules peft merges (``kinds/peft_targets.py``), and the factors of any other module
are dropped, as peft drops them; a layer's type (Linear or GPT-2's Conv1D), not the config's
``fan_in_fan_out``, says whether the product is transposed, as in peft.

The product is formed a block of rows at a time, so memory stays bounded. That alone would not be
bit-exact: on CPU the BLAS picks other kernels for matrices of a few rows (or a few columns per
thread), which sum the ``r`` terms in another order. Every product here is therefore computed in
windows of a fixed number of rows on a fixed grid (the last window ends at the last row), or as
the whole product when the tensor is smaller than a window: peft's own call. Measured with MKL on
x86 for 1 to 16 threads, windows of 16 rows and more give peft's bits; a window holds
:data:`WINDOW_ROWS` rows, fewer (in multiples of 16) where that would pass :data:`WINDOW_BYTES`,
so memory does not grow with the model's width. A block of rows takes the rows it needs from the
windows it overlaps; the last window is kept, since the next block usually starts inside it.
Every tensor's windows are computed in one buffer per adapter, allocated once.

With ``--qlora nf4`` or ``nf4-dq`` a QLoRA adapter is merged as it was trained: onto bitsandbytes'
NF4 round trip (``kinds/nf4.py``) of every Linear weight transformers quantized, targeted or not
(or, with ``--qlora-scope targets``, of each targeted one), not onto the weights themselves.
With ``--safe-merge`` a Linear layer's product is rounded to the weight's dtype before the add,
as peft's ``safe_merge=True`` adds ``delta.to(W.dtype)``; peft's default adds the fp32 product.
A DoRA adapter (``use_dora``) is merged through the same windows, each row's fp32 sum rescaled
to its magnitude before it is rounded (``kinds/dora.py``).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import names
from ..compute_pool import ComputePool
from ..errors import FormatError, InputError, MismatchError, NotFoundError, UnsupportedError
from ..formats.files import read_json_object
from ..kind_registry import PEFT_KINDS
from ..sources import Checkpoint, open_checkpoint
from ..sources.folders import aux_files
from ..tensor_spec import TensorSpec
from . import ApplyOptions, Kind, RowInput, Scratch, Step, is_non_weight, nf4
from .add import VOCAB_TENSORS
from .dora import DoraFactors
from .overlay import overlay
from .patterns import check_patterns, match_patterns
from .peft_targets import base_modules, check_saved_modules, check_targeting, select_targets
from .targets import LayerTypes, Stored, linear_weights, stored_name, stored_parameter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
WINDOW_ROWS = 256
WINDOW_BYTES = 8 * 1024 * 1024  # a window's fp32 product at most (65B's 22016-wide rows: 80 rows)
MERGE_ROWS = 64  # rows of fp32 work at a time when a product is added to the base's rows
# --qlora: NF4, with double quantization (the "-dq") or not.
QLORA_MODES = {mode: mode.endswith("-dq") for mode in names.QLORA_MODES}
# Files the adapter's folder brings to the result: its tokenizer (an extended vocabulary), never
# its config, which is the base's (vocab_size is then set from the embedding's rows).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)
# Options that make peft use another formula (a LoRA "variant", biases, other layer types).
_OTHER_MATH = {
    "lora_bias": "lora_bias also changes the biases",
    "layer_replication": "layer_replication changes the model's layers",
    "trainable_token_indices": "trainable_token_indices trains single token rows",
    "velora_config": "VeLoRA is a LoRA variant",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "use_bdlora": "BD-LoRA is a LoRA variant",
    "kasa_config": "KaSA is a LoRA variant",
    "enable_lora": "enable_lora (merged qkv layers of early peft) splits the product",
}
# LoRA types that no merged weight reproduces: peft refuses to merge them too.
_UNMERGEABLE = {
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) adapts only the tokens after its "
                               "invocation sequence, which no merged weight can do",
    "arrow_config": "Arrow (arrow_config) routes each token among several LoRAs, which no single "
                    "merged weight can do",
    "use_qalora": "QALoRA (use_qalora) pools each input over groups of columns into a "
                  "GPTQ-quantized layer and has no delta weight to merge",
}
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_EMBEDDING_FACTOR = re.compile(r"(?P<module>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?")
_MAGNITUDE = re.compile(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+\.weight)?")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")
# A raw state dict (named_parameters) keeps the adapter's name: modules_to_save.default.weight.
_SAVED_COPY = re.compile(r"\.modules_to_save\.(?:[^.]+\.)?(?=[^.]+$)")
FACTOR_CACHE = 4  # factors kept loaded for per-expert pieces, which slice a layer's few factors


def looks_like_lora_state(names: Iterable[str]) -> bool:
    """Whether a state dict holds LoRA factors (with no adapter_config.json beside it)."""
    return any(_FACTOR.fullmatch(n) or _EMBEDDING_FACTOR.fullmatch(n) for n in names)


def _unwrap(module: str) -> tuple[str, int]:
    """peft nests one ParamWrapper per parameter of a module: ``experts.base_layer.lora_A``."""
    depth = 0
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
        depth += 1
    return module, depth


def _pattern_keys(config: dict, modules: dict) -> list[str]:
    """Every name ``rank_pattern``/``alpha_pattern`` may be asked about: each module, and each
    ``module.param`` that ``target_parameters`` could name on it."""
    params = [str(e).rpartition(".")[2] for e in config.get("target_parameters") or ()]
    keys = []
    for raw in modules:
        module = _unwrap(raw)[0]
        keys += [module, *(f"{module}.{p}" for p in params)]
    return list(dict.fromkeys(keys))


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json``, refused when it asks for arithmetic other than plain LoRA."""
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{path}: peft_type {peft_type!r}: deltamerge merges {', '.join(PEFT_KINDS)} "
            "adapters only"
        )
    for key, why in _UNMERGEABLE.items():
        if config.get(key):
            raise UnsupportedError(f"{path}: {why}; peft refuses to merge it too (use it unmerged)")
    for key, why in _OTHER_MATH.items():
        if config.get(key):
            raise UnsupportedError(
                f"{path}: {why}; deltamerge merges plain LoRA and DoRA only (merge with peft instead)"
            )
    if config.get("init_lora_weights") == "mica":
        raise UnsupportedError(f"{path}: MiCA (init_lora_weights='mica') is a LoRA variant")
    if config.get("bias", "none") != "none":
        raise UnsupportedError(
            f"{path}: bias={config['bias']!r} trains the biases too; deltamerge merges adapters "
            "with bias='none' only"
        )
    for key in ("r", "lora_alpha"):
        if not _is_number(config.get(key)):
            raise FormatError(f"{path}: {key!r} must be a number, not {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and _is_number(v) for k, v in pattern.items()
        ):
            raise FormatError(f"{path}: {key!r} must map module patterns to numbers")
        check_patterns(path, key, pattern)
    check_targeting(path, config)
    if config.get("use_dora") and config.get("target_parameters"):
        raise UnsupportedError(f"{path}: use_dora with target_parameters: peft's ParamWrapper "
                               "does not support DoRA")
    return config


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def window_rows(rows: int, width: int) -> int:
    """Rows of a product's window for a tensor of ``rows`` rows of ``width``: a fixed grid."""
    fits = WINDOW_BYTES // (4 * max(width, 1)) // 16 * 16
    return min(WINDOW_ROWS, rows, max(16, fits))


class Factors:
    """One module's A and B, loaded at its tensor's first block, and the windows of B @ A."""

    def __init__(
        self, source: FactorSource, a: str, b: str, scale: float, transposed: bool, rows: int,
        round_to: torch.dtype | None = None, pick: Pick | None = None,
    ):
        self.source, self.a_name, self.b_name = source, a, b
        self.pick = pick  # the slices of A and B this tensor uses (one expert's), if not all
        self.scale = scale
        self.transposed = transposed  # rows of W are columns of B @ A (embeddings, fan_in_fan_out)
        self.rows = rows
        self.round_to = round_to  # the dtype the product is rounded to before the add, if any
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._a is None or self._b is None:
            keep = self.pick is not None  # the other experts' tensors slice the same factors
            a, b = self.source.load(self.a_name, keep), self.source.load(self.b_name, keep)
            self._a, self._b = self.pick(a, b) if self.pick is not None else (a, b)
        return self._a, self._b

    def _size(self) -> int:
        """Rows a window holds: fixed for the tensor, so its grid is."""
        a, b = self._load()
        return window_rows(self.rows, b.shape[0] if self.transposed else a.shape[1])

    def _product(self, window: torch.Tensor, w0: int, size: int) -> torch.Tensor:
        """Rows ``[w0, w0 + size)`` of ``transpose(B @ A) * s`` into ``window``, on the grid."""
        a, b = self._load()
        if self.transposed:
            torch.mm(b, a[:, w0 : w0 + size], out=window)
        else:
            torch.mm(b[w0 : w0 + size], a, out=window)
        self.scale_window(window)
        if self.round_to is not None and self.round_to != torch.float32:
            window.copy_(window.to(self.round_to))
        return window

    def scale_window(self, window: torch.Tensor) -> None:
        """Scale a window of the product in place, as the type's ``get_delta_weight`` does."""
        window.mul_(self.scale)

    def merge(
        self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch,
        rescale: Callable[[torch.Tensor, int], None] | None = None,
    ) -> None:
        """``out = round(fp32(cur) + product)`` for rows ``[r0, r0 + len(out))``, window by window.

        The windows a block overlaps are computed and added on the run's pool (``--threads``),
        each on one thread in a buffer of its own, as many at a time as the pool has threads
        (the last one stays, since the next block usually starts inside it). Each adds its rows a
        few at a time through one small fp32 buffer (an fp32 copy of the whole block was the
        merge's largest buffer; mixed-dtype arithmetic straight into ``out`` would save the copies
        but is several times slower on CPU). ``rescale(sum, first_row)`` changes the fp32 sum in
        place before it is rounded (DoRA's magnitude)."""
        r1 = r0 + out.shape[0]
        if r1 <= r0:
            return
        a, b = self._load()  # here, not in the pool's threads: the source reads through one buffer
        size = self._size()
        shape = (b.shape[0], size) if self.transposed else (size, a.shape[1])
        windows = [(min(k, self.rows - size), k) for k in range(r0 // size * size, r1, size)]
        pool = self.source.pool

        def piece(job: tuple[int, int, torch.Tensor, bool, torch.Tensor]) -> None:
            w0, k, window, held, acc = job
            prod = window if held else self._product(window, w0, size)
            prod = prod.T if self.transposed else prod
            lo, hi = max(r0, k), min(r1, k + size)
            for x in range(lo, hi, MERGE_ROWS):
                y = min(hi, x + MERGE_ROWS)
                part = acc[: y - x]
                part.copy_(cur[x - r0 : y - r0])
                part.add_(prod[x - w0 : y - w0])
                if rescale is not None:
                    rescale(part, x)
                out[x - r0 : y - r0].copy_(part)

        for i in range(0, len(windows), pool.threads):
            batch = windows[i : i + pool.threads]
            buffers = self.source.windows(self, shape, [w0 for w0, _ in batch])
            acc_shape = (MERGE_ROWS, *out.shape[1:])
            pool.map(piece, [
                (w0, k, window, held, scratch.get(f"lora-acc{j}", torch.float32, acc_shape))
                for j, ((w0, k), (window, held)) in enumerate(zip(batch, buffers))
            ])

    def release(self) -> None:
        self._a = self._b = None


Pick = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def expert_pick(e: int, experts: int, r: int, rows: tuple[int, int] | None = None) -> Pick:
    """Expert ``e``'s factors, as peft's reshapes see them: A's rows ``e*r..``, B's columns ``e::E``.

    ``rows`` keeps only those rows of the expert's product (its gate or up half, stored apart).
    Copies are contiguous, so the products are the ones peft's einsum computes, bit for bit.
    """
    def pick(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = b[:, e::experts]
        if rows is not None:
            b = b[rows[0]:rows[1]]
        return a[e * r:(e + 1) * r].contiguous(), b.contiguous()
    return pick


class ExpertFactors:
    """A fused 3-D expert tensor: each of its rows is an expert with its own product."""

    def __init__(self, experts: list[Factors]):
        self.experts = experts

    def merge(self, cur: torch.Tensor, out: torch.Tensor, r0: int, scratch: Scratch) -> None:
        for j in range(out.shape[0]):
            self.experts[r0 + j].merge(cur[j], out[j], 0, scratch)
            self.experts[r0 + j].release()  # blocks hold whole experts: this one is done

    def release(self) -> None:
        for f in self.experts:
            f.release()


class Nf4Base:
    """QLoRA: the base rows become bitsandbytes' ``dequantize_4bit(quantize_4bit(W))`` first.

    peft's ``Linear4bit.merge`` computes ``dequantize_4bit(W4) + delta``: the dequantized weight
    (in the dtype the base was quantized from) plus the fp32 product, an fp32 sum that it then
    quantizes again. Here the sum is rounded once to the output dtype instead, as for a plain
    LoRA. With double quantization every row must be seen first (the offset is the mean of every
    block's absmax): the engine feeds them through the step's first pass.
    """

    def __init__(
        self, spec: TensorSpec, double_quant: bool, dtype: torch.dtype | None, cuda: bool = False
    ):
        self.spec = spec
        self.double_quant = double_quant
        self.cuda = cuda
        self.dtype = dtype or spec.dtype
        self.row_multiple = nf4.row_multiple(spec.row_numel)
        self._prepare: nf4.Nf4Prepare | None = None
        self._state: nf4.Nf4State | None = None

    def feed(self, rows: torch.Tensor, r0: int) -> None:
        if self._prepare is None:
            self._prepare = nf4.Nf4Prepare(self.spec.shape, self.double_quant, self.spec.name,
                                           self.cuda)
        self._prepare.add(rows.to(self.dtype), r0)

    def end_first_pass(self) -> None:
        assert self._prepare is not None
        self._state, self._prepare = self._prepare.finish(), None

    def roundtrip(self, cur: torch.Tensor, r0: int, scratch: Scratch) -> torch.Tensor:
        if self._state is None:
            assert not self.double_quant, "double quantization without its first pass"
            self._state = nf4.Nf4State(self.spec.shape, False, self.cuda)
        out = scratch.get("lora-nf4", self.dtype, tuple(cur.shape))
        return nf4.nf4_roundtrip(cur.to(self.dtype), self._state, r0, out=out)

    def release(self) -> None:
        self._prepare = self._state = None


class LoraStep(Step):
    """Replace the tensor with the adapter's (if it stores one), then add the LoRA product."""

    def __init__(
        self, before: TensorSpec, after: TensorSpec, replace: RowInput | None,
        factors: Factors | DoraFactors | ExpertFactors | None, nf4_base: Nf4Base | None = None,
        finite_in: Path | None = None,
    ):
        super().__init__(before, after)
        self.inputs = (replace,) if replace is not None else ()
        self.factors = factors
        self.nf4_base = nf4_base
        self.finite_in = finite_in  # peft's safe_merge: a merged weight must be finite
        if nf4_base is not None:
            self.row_multiple = nf4_base.row_multiple
            self.first_pass = nf4_base.double_quant

    def feed(self, rows: torch.Tensor, r0: int) -> None:
        assert self.nf4_base is not None
        self.nf4_base.feed(rows, r0)

    def end_first_pass(self) -> None:
        assert self.nf4_base is not None
        self.nf4_base.end_first_pass()

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        shape = tuple(out.shape)
        if self.inputs:
            loaded = scratch.get("lora-loaded", self.after.dtype, shape)
            loaded.copy_(inputs[0])
            cur = loaded
        if self.nf4_base is not None:
            cur = self.nf4_base.roundtrip(cur, r0, scratch)
        if self.factors is None:
            out.copy_(cur)
            return
        self.factors.merge(cur, out, r0, scratch)
        if self.finite_in is not None and not torch.isfinite(out).all():
            row = r0 + int((~torch.isfinite(out)).view(out.shape[0], -1).any(dim=1).nonzero()[0])
            raise MismatchError(
                f"{self.finite_in}: tensor {self.after.name!r}: the merged weight is not finite "
                f"(row {row}): peft's safe_merge refuses it (the adapter seems to be broken)"
            )

    def close(self) -> None:
        if self.factors is not None:
            self.factors.release()
        if self.nf4_base is not None:
            self.nf4_base.release()


class FactorSource:
    """A second handle on the adapter's weights, read from the compute stage only.

    The engine's read stage reads whole tensors through the kind's own handle at the same time;
    a ``.bin`` reader keeps per-handle state, so the two stages never share one.
    """

    def __init__(self, path: Path):
        self.path = path
        self._checkpoint: Checkpoint | None = None
        self._loaded: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._raw = torch.empty(0, dtype=torch.uint8)  # a factor's bytes as read, reused
        self._window = torch.empty(0, dtype=torch.float32)
        self._window_owner: object = None
        self._windows: list[torch.Tensor] = []  # LoRA's, one per window computed at once
        self._held: list[tuple[object, int] | None] = []  # which (owner, first row) each holds
        self.pool = ComputePool()  # the run's, set by the kind's plan

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = open_checkpoint(self.path)
        return self._checkpoint

    def load(self, name: str, keep: bool = False) -> torch.Tensor:
        """A factor, whole, in fp32 (peft's autocast); with ``keep``, the last few stay loaded."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        spec = self.checkpoint.specs[name]
        if self._raw.numel() < spec.nbytes:
            self._raw = torch.empty(spec.nbytes, dtype=torch.uint8)
        tensor = self.checkpoint.read_rows(name, 0, spec.rows, self._raw).to(torch.float32, copy=True)
        if keep:
            self._loaded[name] = tensor
            while len(self._loaded) > FACTOR_CACHE:
                self._loaded.popitem(last=False)
        return tensor

    def window(self, owner: object, shape: tuple[int, int]) -> tuple[torch.Tensor, bool]:
        """The buffer every tensor's products are computed in (one, grown to the largest window:
        allocating one per tensor left the allocator holding tens of MiB), and whether
        ``owner`` used it last, so that it still holds ``owner``'s last window."""
        mine = self._window_owner is owner
        self._window_owner = owner
        n = shape[0] * shape[1]
        if self._window.numel() < n:
            self._window = torch.empty(n, dtype=torch.float32)
            mine = False
        return self._window[:n].view(shape), mine

    def windows(
        self, owner: object, shape: tuple[int, int], starts: list[int]
    ) -> list[tuple[torch.Tensor, bool]]:
        """A buffer for each of ``owner``'s windows starting at rows ``starts``, and whether it
        holds that window already (the previous block's last, usually): as many buffers as
        windows are computed at once, each grown to the largest window and reused."""
        n = shape[0] * shape[1]
        while len(self._windows) < len(starts):
            self._windows.append(torch.empty(0, dtype=torch.float32))
            self._held.append(None)
        free = [j for j in range(len(self._windows)) if self._held[j] not in {(owner, s) for s in starts}]
        given: list[tuple[torch.Tensor, bool]] = []
        for s in starts:
            j = next((j for j, h in enumerate(self._held) if h == (owner, s)), None)
            held = j is not None and self._windows[j].numel() >= n
            if j is None:
                j = free.pop(0)
            if self._windows[j].numel() < n:
                self._windows[j] = torch.empty(n, dtype=torch.float32)
            self._held[j] = (owner, s)
            given.append((self._windows[j][:n].view(shape), held))
        return given

    def close(self) -> None:
        self._loaded.clear()
        self._window = torch.empty(0, dtype=torch.float32)
        self._window_owner = None
        self._windows.clear()
        self._held.clear()
        if self._checkpoint is not None:
            self._checkpoint.close()
            self._checkpoint = None


@dataclass
class _Module:
    a: str | None = None
    b: str | None = None
    embedding: bool = False
    magnitude: str | None = None  # DoRA's lora_magnitude_vector


def _check_multiply(where: Path, module: str, a: TensorSpec, b: TensorSpec) -> None:
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise MismatchError(
            f"{where}: module {module!r}: lora_A {list(a.shape)} and lora_B "
            f"{list(b.shape)} do not multiply"
        )


def _orientation(stored: Stored, a: TensorSpec, b: TensorSpec) -> bool | None:
    """Whether factors A (r*E, in) and B (out, r*E) fit a parameter, and transposed or not.

    ``None``: they do not fit. A 2-D parameter is (out, in). A 3-D one is (experts, out, in),
    or (experts, in, out) for experts that peft sees as transposed (``is_transposed``), which
    only the shapes tell apart here; experts stored apart are Linear weights, never transposed.
    """
    experts = stored.shape[0] if len(stored.shape) == 3 else 1
    if len(stored.shape) not in (2, 3) or a.shape[0] % experts:
        return None
    d1, d2 = stored.shape[-2:]
    plain = a.shape[1] == d2 and b.shape[0] == d1
    flipped = len(stored.shape) == 3 and not stored.pieces and a.shape[1] == d1 and b.shape[0] == d2
    if plain and flipped:
        raise UnsupportedError(
            f"factors {a.name!r}: square experts ({d1} x {d2}): cannot tell from the shapes "
            "whether peft saw them transposed"
        )
    return None if not (plain or flipped) else flipped


class LoraKind(Kind):
    name = "lora"

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.config: dict | None = None  # None: a bare state dict, its config from the options
        if (folder / ADAPTER_CONFIG).is_file():
            self.config = read_adapter_config(folder)
            found = [folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()]
            if not found:
                raise NotFoundError(
                    f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}"
                )
            self.checkpoint = open_checkpoint(found[0])
        else:
            self.checkpoint = open_checkpoint(folder)
        files = self.checkpoint.files
        self.weights = files[0] if len(files) == 1 else folder
        self.source = FactorSource(self.weights)
        self.prefix = PREFIX
        # rank_pattern/alpha_pattern values by module, matched once per plan (kinds/patterns.py)
        self._patterns: dict[str, dict[str, float]] = {"rank_pattern": {}, "alpha_pattern": {}}

    @property
    def bare(self) -> bool:
        """A state dict without adapter_config.json, merged with the user's --lora-* options."""
        return self.config is None

    def _short(self, key: str) -> str | None:
        """The key without what precedes the model's names; None for a key outside the prefix."""
        if not key.startswith(self.prefix):
            return None
        return key[len(self.prefix):].removeprefix(PREFIX)

    def _classify(self) -> tuple[dict[str, str], dict[str, _Module], dict[str, str]]:
        """Adapter keys as whole tensors (by base name), factor pairs (by module name) and, in a
        bare state dict, tensors outside the model (by their own name).

        peft 0.21 saves a ``modules_to_save`` module as ``<module>.weight``; when the vocabulary
        was resized it also saves the embedding layers' own state: ``<module>.modules_to_save.
        weight`` (the same trained copy, preferred here), ``<module>.original_module.weight``
        (the untrained original, which merge_and_unload drops) and ``<embedding>.base_layer.
        weight`` under embedding LoRA. The adapter name is stripped from saved keys; a raw state
        dict keeps it (``lora_A.default.weight``, ``modules_to_save.default.weight``).
        """
        whole: dict[str, str] = {}
        modules: dict[str, _Module] = {}
        extra: dict[str, str] = {}
        for key in self.checkpoint.specs:
            short = self._short(key)
            if short is None and not self.bare:
                raise MismatchError(
                    f"{self.weights}: tensor {key!r} is neither a LoRA factor nor a saved module: "
                    f"peft loads only names under {PREFIX!r} and would drop it"
                )
            if short is None:
                extra[key] = key
                continue
            m = _FACTOR.fullmatch(short) or _EMBEDDING_FACTOR.fullmatch(short)
            dora = _MAGNITUDE.fullmatch(short)
            if dora and self.config is not None and self.config.get("use_dora"):
                modules.setdefault(dora["module"], _Module()).magnitude = key
            elif m:
                mod = modules.setdefault(m["module"], _Module())
                mod.embedding = m["which"].startswith("lora_embedding")
                setattr(mod, "a" if m["which"].endswith("A") else "b", key)
            elif re.search(r"(^|\.)(lora_|trainable_tokens_)", short):
                raise UnsupportedError(
                    f"{self.weights}: tensor {key!r} is not a LoRA factor (a DoRA magnitude "
                    "without use_dora, LoRA bias or trainable tokens?): deltamerge merges LoRA and "
                    "DoRA only"
                )
            elif ".original_module." not in short:  # the untrained original: peft drops it
                explicit = ".modules_to_save." in short
                name = _SAVED_COPY.sub(".", _BASE_LAYER.sub("", short))
                if explicit or name not in whole:
                    whole[name] = key
        for name, mod in modules.items():
            if mod.a is None and mod.b is None:
                raise FormatError(f"{self.weights}: module {name!r} has a DoRA magnitude but no "
                                  "lora_A/lora_B")
            if mod.a is None or mod.b is None:
                raise FormatError(f"{self.weights}: module {name!r} has only one of lora_A/lora_B")
        return whole, modules, extra

    def _bare_config(self, options: ApplyOptions, specs: dict[str, TensorSpec]) -> dict:
        """What adapter_config.json would say, from the options: alpha is required."""
        if options.lora_alpha is None:
            raise InputError(
                f"{self.weights}: a LoRA state dict without {ADAPTER_CONFIG}: its alpha is not in "
                "the file: give it with --lora-alpha (and --lora-r to check the rank)"
            )
        for name, value in (("--lora-alpha", options.lora_alpha), ("--lora-r", options.lora_r)):
            if value is not None and not _is_number(value):
                raise InputError(f"{name} must be a positive number, not {value!r}")
        self.prefix = options.lora_prefix if options.lora_prefix is not None else (
            self._detect_prefix(specs))
        if not any(k.startswith(self.prefix) for k in self.checkpoint.specs):
            raise MismatchError(f"{self.weights}: no tensor name starts with --lora-prefix "
                                f"{self.prefix!r}")
        return {"r": options.lora_r, "lora_alpha": options.lora_alpha}

    def _detect_prefix(self, specs: dict[str, TensorSpec]) -> str:
        """What precedes the base's names in every factor's key (``llama_model.`` for PandaGPT)."""
        candidates: set[str] | None = None
        first = None
        for key in self.checkpoint.specs:
            m = _FACTOR.fullmatch(key) or _EMBEDDING_FACTOR.fullmatch(key)
            if m is None:
                continue
            first = first or key
            parts = m["module"].split(".")
            found = {
                ".".join(parts[:i] + [""]) if i else ""
                for i in range(len(parts))
                if stored_name(".".join(parts[i:]) + ".weight", specs)
            }
            candidates = found if candidates is None else candidates & found
        if not candidates:
            raise MismatchError(
                f"{self.weights}: the LoRA factors' names (e.g. {first!r}) do not end in the "
                "names of the base's tensors: give what precedes them with --lora-prefix"
            )
        if len(candidates) > 1:
            raise InputError(
                f"{self.weights}: the factors' names fit the base's under several prefixes "
                f"({', '.join(repr(c) for c in sorted(candidates))}): choose with --lora-prefix"
            )
        return candidates.pop()

    def _factors(
        self, config: dict, module: str, mod: _Module, spec: TensorSpec, layers: LayerTypes
    ) -> Factors:
        """The factors of one module: an embedding's and a Conv1D layer's product is transposed.

        peft reads ``fan_in_fan_out`` off the layer, not the config: it resets the option to false
        on an ``nn.Linear`` and to true on a ``Conv1D`` (with a warning), so the layer type the
        base's tensors show (``targets.LayerTypes``) decides here too.
        """
        a, b = self.checkpoint.specs[mod.a], self.checkpoint.specs[mod.b]
        transposed = mod.embedding or layers.conv1d(spec.name)
        _check_multiply(self.weights, module, a, b)
        product = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if product != spec.shape:
            raise MismatchError(
                f"{self.weights}: module {module!r}: the LoRA product is {list(product)} but "
                f"tensor {spec.name!r} is {list(spec.shape)}"
            )
        scale = self._scale(config, module, a.shape[0])
        factors = Factors(self.source, mod.a, mod.b, scale, transposed, spec.rows,
                          spec.dtype if mod.embedding else None)
        return self._dora(config, module, mod, spec, factors) if config.get("use_dora") else factors

    def _dora(
        self, config: dict, module: str, mod: _Module, spec: TensorSpec, factors: Factors
    ) -> DoraFactors:
        """A Linear module's DoRA: its magnitude has one entry per row of the weight."""
        if factors.transposed:
            layer = "an embedding" if mod.embedding else "a Conv1D layer (fan_in_fan_out)"
            raise UnsupportedError(
                f"{self.weights}: module {module!r} is {layer}: DoRA rescales its columns, a norm "
                "over every row; deltamerge merges DoRA on Linear layers only"
            )
        if mod.magnitude is None:
            raise MismatchError(
                f"{self.weights}: module {module!r} has no lora_magnitude_vector though "
                f"{ADAPTER_CONFIG} sets use_dora (peft would start it from the base's norms)"
            )
        shape = self.checkpoint.specs[mod.magnitude].shape
        if shape != (spec.rows,):
            raise MismatchError(
                f"{self.weights}: tensor {mod.magnitude!r} has shape {list(shape)} but "
                f"{spec.name!r} has {spec.rows} rows"
            )
        return DoraFactors(factors, mod.magnitude)

    def _scale(self, config: dict, key: str, r: int) -> float:
        """``alpha / r`` for this module (or parameter), after checking its rank is declared."""
        declared = self._patterns["rank_pattern"].get(key, config["r"] or r)
        if declared != r:
            where = ADAPTER_CONFIG if not self.bare else "--lora-r"
            raise MismatchError(
                f"{self.weights}: module {key!r} has rank {r} but {where} says "
                f"{declared}: peft would refuse to load it"
            )
        alpha = self._patterns["alpha_pattern"].get(key, config["lora_alpha"])
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    def _targeted(self, config: dict, module: str, specs: dict[str, TensorSpec]) -> dict[str, Stored]:
        """The parameters of ``module`` that ``target_parameters`` names and the base stores.

        peft's rule: ``<module>.<param>`` is the entry, or ends with ``.<entry>``.
        """
        found = {}
        for entry in config.get("target_parameters") or ():
            param = str(entry).rpartition(".")[2]
            key = f"{module}.{param}"
            if key == entry or key.endswith(f".{entry}"):
                stored = stored_parameter(module, param, specs)
                if stored is not None:
                    found[param] = stored
        return found

    def _param_factors(
        self, config: dict, module: str, wrappers: list[_Module], params: dict[str, Stored],
        specs: dict[str, TensorSpec],
    ) -> dict[str, Factors | DoraFactors | ExpertFactors]:
        """Each ParamWrapper's factors matched to the parameter their shapes fit, per stored tensor."""
        out: dict[str, Factors | ExpertFactors] = {}
        used: set[str] = set()
        for mod in wrappers:
            a, b = self.checkpoint.specs[mod.a], self.checkpoint.specs[mod.b]
            _check_multiply(self.weights, module, a, b)
            fits = {p: t for p, s in params.items() if (t := _orientation(s, a, b)) is not None}
            if len(fits) != 1 or next(iter(fits)) in used:
                which = "none" if not fits else " and ".join(sorted(fits))
                raise UnsupportedError(
                    f"{self.weights}: LoRA factors {mod.a!r} fit {which} of the parameters "
                    f"target_parameters names on {module!r} ({', '.join(sorted(params))})"
                    + (", adapted by other factors too" if fits.keys() <= used and fits else "")
                )
            (param, transposed), = fits.items()
            used.add(param)
            stored = params[param]
            experts = stored.shape[0] if len(stored.shape) == 3 else 1
            r = a.shape[0] // experts
            scale = self._scale(config, f"{module}.{param}", r)
            if stored.pieces:
                for piece in stored.pieces:
                    pick = expert_pick(piece.expert, experts, r, (piece.r0, piece.r1))
                    out[piece.name] = Factors(self.source, mod.a, mod.b, scale, False,
                                              piece.r1 - piece.r0, specs[piece.name].dtype, pick)
            elif len(stored.shape) == 3:
                dtype = specs[stored.name].dtype
                out[stored.name] = ExpertFactors([
                    Factors(self.source, mod.a, mod.b, scale, transposed, stored.shape[1], dtype,
                            expert_pick(e, experts, r))
                    for e in range(experts)
                ])
            else:
                out[stored.name] = Factors(self.source, mod.a, mod.b, scale, False,
                                           stored.shape[0], specs[stored.name].dtype)
        return out

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        config = self.config if self.config is not None else self._bare_config(options, specs)
        self.source.pool = options.pool
        whole, modules, extra = self._classify()
        self._patterns = match_patterns(self.folder / ADAPTER_CONFIG, {
            key: config.get(key) or {} for key in ("rank_pattern", "alpha_pattern")
        }, _pattern_keys(config, modules))
        whole = {stored_name(n, specs) or n: k for n, k in whole.items()}
        after = dict(specs)
        for name, key in whole.items():
            cur, new = specs.get(name), self.checkpoint.specs[key]
            if cur is None and self.bare and not self.prefix:
                extra[key] = name  # a plain state dict: a tensor the model lacks is kept as it is
                continue
            if cur is None:
                raise MismatchError(
                    f"{self.weights}: tensor {key!r} replaces {name!r}, which the base lacks"
                )
            # A vocabulary tensor may gain rows: the adapter's vocabulary, which peft loads into
            # a base resized to it (a resize is what changes its rows, and only its rows).
            resized = name.endswith(VOCAB_TENSORS) and len(new.shape) == len(cur.shape)
            if new.shape != cur.shape and not (resized and new.shape[1:] == cur.shape[1:]):
                raise MismatchError(
                    f"{self.weights}: tensor {key!r} has shape {list(new.shape)} but {name!r} "
                    f"has {list(cur.shape)}: peft refuses to load it"
                )
            after[name] = TensorSpec(name, cur.dtype, new.shape)
        whole = {n: k for n, k in whole.items() if k not in extra}
        if not self.bare:
            check_saved_modules(self.folder / ADAPTER_CONFIG, self.weights, config,
                                (n for n in specs if not is_non_weight(n)), set(whole))
        factors: dict[str, Factors | DoraFactors | ExpertFactors] = {}
        modules_of: dict[str, str] = {}  # stored name -> the module whose LoRA it gets
        wrapped: dict[str, list[_Module]] = {}
        targeted = self._select(config, modules, specs, after)
        layers = LayerTypes(self.weights, after)
        for raw, mod in modules.items():
            module, depth = _unwrap(raw)
            if self._targeted(config, module, after):
                wrapped.setdefault(module, []).append(mod)
                continue
            name = stored_name(f"{module}.weight", after) if not depth else None
            if name is None:
                raise MismatchError(
                    f"{self.weights}: LoRA module {raw!r} has no tensor {module + '.weight'!r} "
                    f"in the base (factor {mod.a!r})"
                )
            if raw not in targeted:
                continue  # peft wraps only the modules its config selects, and drops these keys
            factors[name] = self._factors(config, module, mod, after[name], layers)
            modules_of[name] = raw
        for module, wrappers in wrapped.items():
            params = self._targeted(config, module, after)
            for name, f in self._param_factors(config, module, wrappers, params, after).items():
                if name in factors:
                    raise UnsupportedError(f"{self.weights}: tensor {name!r} is adapted twice")
                factors[name] = f
        self._check_vocab(specs, after)
        linear = {n: m for n, m in modules_of.items() if not modules[m].embedding}
        quantized = self._quantized(linear, whole, after, layers, options)
        if options.safe_merge:
            for name, f in factors.items():
                # peft's safe_merge adds ``delta.to(W.dtype)`` to a Linear (or Conv1D) weight;
                # embeddings and parameters round so anyway, DoRA and 4-bit layers never do.
                if isinstance(f, Factors) and name not in quantized:
                    f.round_to = after[name].dtype
        steps: dict[str, Step] = {
            name: LoraStep(
                specs[name], after[name],
                RowInput(self.checkpoint, whole[name]) if name in whole else None,
                factors.get(name), quantized.get(name),
                self.weights if options.safe_merge else None,
            )
            for name in after if name in whole or name in factors or name in quantized
        }
        clash = [n for n in extra.values() if n in after]
        if clash:
            raise MismatchError(
                f"{self.weights}: tensor {clash[0]!r}, outside --lora-prefix {self.prefix!r}, "
                "has the name of one of the base's tensors"
            )
        after, kept = overlay(after, self.checkpoint, {n: k for k, n in extra.items()})
        steps.update(kept)
        return after, steps

    def _select(
        self, config: dict, modules: dict[str, _Module], specs: dict[str, TensorSpec],
        after: dict[str, TensorSpec],
    ) -> set[str]:
        """The factor modules peft merges: those its config selects (all, for a bare state dict,
        which has no config). Modules adapted through ``target_parameters`` are not among them."""
        factored = {raw: not mod.embedding for raw, mod in modules.items()
                    if not _unwrap(raw)[1] and not self._targeted(config, raw, after)}
        if self.bare:
            return set(factored)
        params = any(self._targeted(config, _unwrap(raw)[0], after) for raw in modules)
        base = base_modules((n, len(s.shape)) for n, s in specs.items())
        return select_targets(self.folder / ADAPTER_CONFIG, config, factored, base, params)

    def _quantized(
        self, linear: dict[str, str], whole: dict[str, str], after: dict[str, TensorSpec],
        layers: LayerTypes, options: ApplyOptions,
    ) -> dict[str, Nf4Base]:
        """With ``--qlora``: the tensors bitsandbytes quantized in training.

        By default (``--qlora-scope all-linear``) every Linear layer transformers replaced by a
        4-bit one (``targets.linear_weights``: all but the output layer and the embeddings),
        targeted or not; with ``targets``, the LoRA-targeted Linear weights only (``linear``:
        stored name to module, modules only, embeddings left out). The output layer (``lm_head``,
        which transformers leaves unquantized), whole tensors the adapter stores and parameters
        adapted through ``target_parameters`` (no Linear layer: bitsandbytes leaves them as they
        are) are not quantized.
        """
        if options.qlora is None:
            return {}
        if self.config is not None and self.config.get("use_dora"):
            raise UnsupportedError(
                f"{self.weights}: a DoRA adapter (use_dora) cannot be merged with --qlora"
            )
        if options.qlora_scope == "targets":
            names = [n for n, m in linear.items() if m.rsplit(".", 1)[-1] != "lm_head"]
        else:
            names, experts = linear_weights(after)
            if experts is not None:
                raise UnsupportedError(
                    f"{self.weights}: tensor {experts!r} belongs to a mixture of experts, which "
                    "transformers 4 quantized for training and transformers 5 does not: "
                    "merge with --qlora-scope targets"
                )
        quantized = {}
        for name in names:
            if name in whole:
                continue
            if layers.conv1d(name):
                raise UnsupportedError(
                    f"{self.weights}: tensor {name!r} is a Conv1D layer (fan_in_fan_out): it "
                    "cannot be merged with --qlora"
                )
            spec = after[name]
            if spec.dtype not in nf4.DTYPES:
                raise UnsupportedError(
                    f"{self.weights}: tensor {name!r} is {spec.dtype}: NF4 quantizes float16, "
                    "bfloat16 or float32 weights"
                )
            quantized[name] = Nf4Base(spec, QLORA_MODES[options.qlora], options.qlora_dtype,
                                      options.qlora_kernel == "cuda")
        return quantized

    def _check_vocab(self, before: dict[str, TensorSpec], after: dict[str, TensorSpec]) -> None:
        """An extended vocabulary must extend every vocabulary tensor, or peft's resize is random."""
        vocab = {n: s.rows for n, s in after.items() if n.endswith(VOCAB_TENSORS)}
        changed = [n for n in vocab if after[n].shape != before[n].shape]
        if changed and len(set(vocab.values())) > 1:
            rows = ", ".join(f"{n} {r}" for n, r in vocab.items())
            raise MismatchError(
                f"{self.weights}: the adapter resizes {changed[0]!r} but the vocabulary tensors "
                f"would disagree ({rows} rows): it must store all of them (modules_to_save)"
            )

    def aux_files(self):
        return {n: p for n, p in aux_files(self.folder).items() if n in TOKENIZER_FILES}

    def close(self) -> None:
        self.checkpoint.close()
        self.source.close()
