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

The product is formed a block of rows at a time, so memory stays bounded. That alone would not be
bit-exact: on CPU the BLAS picks other kernels for matrices of a few rows (or a few columns per
thread), which sum the ``r`` terms in another order. Every product here is therefore computed in
windows of exactly :data:`WINDOW_ROWS` rows on a fixed grid (the last window ends at the last
row), or as the whole product when the tensor is smaller than a window: peft's own call. Measured
with MKL on x86 for 1 to 16 threads, windows of 16 rows and more give peft's bits; 256 leaves a
margin. A block of rows takes the rows it needs from the windows it overlaps; the last window is
kept, since the next block usually starts inside it.

With ``--qlora nf4`` or ``nf4-dq`` a QLoRA adapter is merged as it was trained: onto bitsandbytes'
NF4 round trip of each targeted Linear weight (``kinds/nf4.py``), not onto the weight itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, MismatchError, NotFoundError, UnsupportedError
from ..formats.files import read_json_object
from ..sources import Checkpoint, open_checkpoint
from ..sources.folders import aux_files
from ..tensor_spec import TensorSpec
from . import ApplyOptions, Kind, RowInput, Scratch, Step, nf4
from .add import VOCAB_TENSORS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
WINDOW_ROWS = 256
QLORA_MODES = {"nf4": False, "nf4-dq": True}  # --qlora: NF4, with double quantization or not
# Files the adapter's folder brings to the result: its tokenizer (an extended vocabulary), never
# its config, which is the base's (vocab_size is then set from the embedding's rows).
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
)
# Options that make peft use another formula (a LoRA "variant", biases, other layer types).
_OTHER_MATH = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
    "lora_bias": "lora_bias also changes the biases",
    "use_qalora": "QALoRA (use_qalora) merges into quantized layers",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) cannot be merged",
    "layer_replication": "layer_replication changes the model's layers",
    "target_parameters": "target_parameters puts LoRA on parameters, not modules",
    "trainable_token_indices": "trainable_token_indices trains single token rows",
    "velora_config": "VeLoRA is a LoRA variant",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "use_bdlora": "BD-LoRA is a LoRA variant",
    "arrow_config": "Arrow routes between several LoRAs",
    "kasa_config": "KaSA is a LoRA variant",
    "enable_lora": "enable_lora (merged qkv layers of early peft) splits the product",
}
_FACTOR = re.compile(r"(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_EMBEDDING_FACTOR = re.compile(r"(?P<module>.+)\.(?P<which>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?")
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json``, refused when it asks for arithmetic other than plain LoRA."""
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{path}: peft_type {peft_type!r}: only LORA adapters can be merged by deltamerge"
        )
    for key, why in _OTHER_MATH.items():
        if config.get(key):
            raise UnsupportedError(
                f"{path}: {why}; deltamerge merges plain LoRA only (merge with peft instead)"
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
    return config


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """peft's ``get_pattern_key``: the first key ``k`` such that ``(.*\\.)?(k)$`` matches."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_whole(ckpt: Checkpoint, name: str) -> torch.Tensor:
    spec = ckpt.specs[name]
    buf = torch.empty(max(spec.nbytes, 1), dtype=torch.uint8)
    return ckpt.read_rows(name, 0, spec.rows, buf).to(torch.float32)


class Factors:
    """One module's A and B, loaded at its tensor's first block, and the windows of B @ A."""

    def __init__(
        self, source: FactorSource, a: str, b: str, scale: float, transposed: bool, rows: int,
        round_to: torch.dtype | None = None,
    ):
        self.source, self.a_name, self.b_name = source, a, b
        self.scale = scale
        self.transposed = transposed  # rows of W are columns of B @ A (embeddings, fan_in_fan_out)
        self.rows = rows
        self.round_to = round_to  # the dtype the product is rounded to before the add, if any
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None
        self._window: torch.Tensor | None = None
        self._window_at = -1

    def _product(self, w0: int, w1: int) -> torch.Tensor:
        """Rows ``[w0, w1)`` of ``transpose(B @ A) * s``, always on the same window grid."""
        if self._window_at == w0 and self._window is not None:
            return self._window.T if self.transposed else self._window
        if self._a is None or self._b is None:
            self._a = _load_whole(self.source.checkpoint, self.a_name)
            self._b = _load_whole(self.source.checkpoint, self.b_name)
        if self.transposed:
            shape = (self._b.shape[0], w1 - w0)
        else:
            shape = (w1 - w0, self._a.shape[1])
        if self._window is None or tuple(self._window.shape) != shape:
            self._window = torch.empty(shape, dtype=torch.float32)
        if self.transposed:
            torch.mm(self._b, self._a[:, w0:w1], out=self._window)
        else:
            torch.mm(self._b[w0:w1], self._a, out=self._window)
        self._window.mul_(self.scale)
        if self.round_to is not None and self.round_to != torch.float32:
            self._window.copy_(self._window.to(self.round_to))
        self._window_at = w0
        return self._window.T if self.transposed else self._window

    def add_to(self, acc: torch.Tensor, r0: int) -> None:
        """``acc`` (fp32 rows ``[r0, r0 + len(acc))`` of W) += the same rows of the product."""
        r1 = r0 + acc.shape[0]
        if r1 <= r0:
            return
        size = min(WINDOW_ROWS, self.rows)
        k = r0 // size * size
        while k < r1:
            w0 = min(k, self.rows - size)
            prod = self._product(w0, w0 + size)
            lo, hi = max(r0, k), min(r1, k + size)
            acc[lo - r0 : hi - r0].add_(prod[lo - w0 : hi - w0])
            k += size

    def release(self) -> None:
        self._a = self._b = self._window = None
        self._window_at = -1


class Nf4Base:
    """QLoRA: the base rows become bitsandbytes' ``dequantize_4bit(quantize_4bit(W))`` first.

    peft's ``Linear4bit.merge`` computes ``dequantize_4bit(W4) + delta``: the dequantized weight
    (in the dtype the base was quantized from) plus the fp32 product, an fp32 sum that it then
    quantizes again. Here the sum is rounded once to the output dtype instead, as for a plain
    LoRA. With double quantization every row must be seen first (the offset is the mean of every
    block's absmax): the engine feeds them through the step's first pass.
    """

    def __init__(self, spec: TensorSpec, double_quant: bool, dtype: torch.dtype | None):
        self.spec = spec
        self.double_quant = double_quant
        self.dtype = dtype or spec.dtype
        self.row_multiple = nf4.row_multiple(spec.row_numel)
        self._prepare: nf4.Nf4Prepare | None = None
        self._state: nf4.Nf4State | None = None

    def feed(self, rows: torch.Tensor, r0: int) -> None:
        if self._prepare is None:
            self._prepare = nf4.Nf4Prepare(self.spec.shape, self.double_quant, self.spec.name)
        self._prepare.add(rows.to(self.dtype), r0)

    def end_first_pass(self) -> None:
        assert self._prepare is not None
        self._state, self._prepare = self._prepare.finish(), None

    def roundtrip(self, cur: torch.Tensor, r0: int, scratch: Scratch) -> torch.Tensor:
        if self._state is None:
            assert not self.double_quant, "double quantization without its first pass"
            self._state = nf4.Nf4State(self.spec.shape, False)
        out = scratch.get("lora-nf4", self.dtype, tuple(cur.shape))
        return nf4.nf4_roundtrip(cur.to(self.dtype), self._state, r0, out=out)

    def release(self) -> None:
        self._prepare = self._state = None


class LoraStep(Step):
    """Replace the tensor with the adapter's (if it stores one), then add the LoRA product."""

    def __init__(
        self, before: TensorSpec, after: TensorSpec, replace: RowInput | None,
        factors: Factors | None, nf4_base: Nf4Base | None = None,
    ):
        super().__init__(before, after)
        self.inputs = (replace,) if replace is not None else ()
        self.factors = factors
        self.nf4_base = nf4_base
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
        acc = scratch.get("lora-acc", torch.float32, shape)
        acc.copy_(cur)
        self.factors.add_to(acc, r0)
        out.copy_(acc)

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

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = open_checkpoint(self.path)
        return self._checkpoint

    def close(self) -> None:
        if self._checkpoint is not None:
            self._checkpoint.close()
            self._checkpoint = None


@dataclass
class _Module:
    a: str | None = None
    b: str | None = None
    embedding: bool = False


class LoraKind(Kind):
    name = "lora"

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.config = read_adapter_config(folder)
        found = [folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()]
        if not found:
            raise NotFoundError(
                f"{folder}: has {ADAPTER_CONFIG} but no {' or '.join(ADAPTER_WEIGHTS)}"
            )
        self.weights = found[0]
        self.checkpoint = open_checkpoint(self.weights)
        self.source = FactorSource(self.weights)

    def _classify(self) -> tuple[dict[str, str], dict[str, _Module]]:
        """Adapter keys as whole tensors (by base name) and factor pairs (by module name).

        peft 0.21 saves a ``modules_to_save`` module as ``<module>.weight``; when the vocabulary
        was resized it also saves the embedding layers' own state: ``<module>.modules_to_save.
        weight`` (the same trained copy, preferred here), ``<module>.original_module.weight``
        (the untrained original, which merge_and_unload drops) and ``<embedding>.base_layer.
        weight`` under embedding LoRA. The adapter name is stripped from saved keys.
        """
        whole: dict[str, str] = {}
        modules: dict[str, _Module] = {}
        for key in self.checkpoint.specs:
            short = key.removeprefix(PREFIX)
            m = _FACTOR.fullmatch(short) or _EMBEDDING_FACTOR.fullmatch(short)
            if m:
                mod = modules.setdefault(m["module"], _Module())
                mod.embedding = m["which"].startswith("lora_embedding")
                setattr(mod, "a" if m["which"].endswith("A") else "b", key)
            elif re.search(r"(^|\.)(lora_|trainable_tokens_)", short):
                raise UnsupportedError(
                    f"{self.weights}: tensor {key!r} is not a plain LoRA factor (DoRA magnitude, "
                    "LoRA bias or trainable tokens?): deltamerge merges plain LoRA only"
                )
            elif ".original_module." not in short:  # the untrained original: peft drops it
                explicit = ".modules_to_save." in short
                name = _BASE_LAYER.sub("", short).replace(".modules_to_save.", ".")
                if explicit or name not in whole:
                    whole[name] = key
        for name, mod in modules.items():
            if mod.a is None or mod.b is None:
                raise FormatError(f"{self.weights}: module {name!r} has only one of lora_A/lora_B")
        return whole, modules

    def _factors(self, module: str, mod: _Module, spec: TensorSpec) -> Factors:
        a, b = self.checkpoint.specs[mod.a], self.checkpoint.specs[mod.b]
        transposed = mod.embedding or bool(self.config.get("fan_in_fan_out"))
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise MismatchError(
                f"{self.weights}: module {module!r}: lora_A {list(a.shape)} and lora_B "
                f"{list(b.shape)} do not multiply"
            )
        product = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if product != spec.shape:
            raise MismatchError(
                f"{self.weights}: module {module!r}: the LoRA product is {list(product)} but "
                f"tensor {spec.name!r} is {list(spec.shape)}"
            )
        r = a.shape[0]
        declared = pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
        if declared != r:
            raise MismatchError(
                f"{self.weights}: module {module!r} has rank {r} but {ADAPTER_CONFIG} says "
                f"{declared}: peft would refuse to load it"
            )
        alpha = pattern_value(self.config.get("alpha_pattern") or {}, module,
                              self.config["lora_alpha"])
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        return Factors(self.source, mod.a, mod.b, scale, transposed, spec.rows,
                       spec.dtype if mod.embedding else None)

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        whole, modules = self._classify()
        after = dict(specs)
        for name, key in whole.items():
            cur, new = specs.get(name), self.checkpoint.specs[key]
            if cur is None:
                raise MismatchError(
                    f"{self.weights}: tensor {key!r} replaces {name!r}, which the base lacks"
                )
            if len(new.shape) != len(cur.shape) or new.shape[1:] != cur.shape[1:]:
                raise MismatchError(
                    f"{self.weights}: tensor {key!r} has shape {list(new.shape)} but {name!r} "
                    f"has {list(cur.shape)}"
                )
            after[name] = TensorSpec(name, cur.dtype, new.shape)
        factors: dict[str, Factors] = {}
        for module, mod in modules.items():
            name = f"{module}.weight"
            if name not in after:
                raise MismatchError(
                    f"{self.weights}: LoRA module {module!r} has no tensor {name!r} in the base"
                )
            factors[name] = self._factors(module, mod, after[name])
        self._check_vocab(specs, after)
        quantized = self._quantized(modules, whole, after, options)
        steps = {
            name: LoraStep(
                specs[name], after[name],
                RowInput(self.checkpoint, whole[name]) if name in whole else None,
                factors.get(name), quantized.get(name),
            )
            for name in after if name in whole or name in factors
        }
        return after, steps

    def _quantized(
        self, modules: dict[str, _Module], whole: dict[str, str], after: dict[str, TensorSpec],
        options: ApplyOptions,
    ) -> dict[str, Nf4Base]:
        """With ``--qlora``: the tensors bitsandbytes quantized, the LoRA-targeted Linear weights.

        Embeddings, the output layer (``lm_head``, which transformers leaves unquantized) and
        whole tensors the adapter stores are not quantized.
        """
        if options.qlora is None:
            return {}
        if self.config.get("fan_in_fan_out"):
            raise UnsupportedError(
                f"{self.folder / ADAPTER_CONFIG}: fan_in_fan_out (Conv1D) layers cannot be merged "
                "with --qlora"
            )
        quantized = {}
        for module, mod in modules.items():
            name = f"{module}.weight"
            if mod.embedding or name in whole or module.rsplit(".", 1)[-1] == "lm_head":
                continue
            spec = after[name]
            if spec.dtype not in nf4.DTYPES:
                raise UnsupportedError(
                    f"{self.weights}: tensor {name!r} is {spec.dtype}: NF4 quantizes float16, "
                    "bfloat16 or float32 weights"
                )
            quantized[name] = Nf4Base(spec, QLORA_MODES[options.qlora], options.qlora_dtype)
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
