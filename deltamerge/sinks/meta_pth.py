"""Meta's original LLaMA layout, written from Hugging Face tensors as they stream.

``consolidated.NN.pth`` (one per model-parallel shard) and ``params.json``: the inverse of
transformers' ``convert_llama_weights_to_hf.py`` and of deltamerge's Meta reader, whose join
rules this follows. Names go back to Meta's, the rows of q and k back to Meta's rotary order,
and each tensor is split as Meta's fairscale layers hold it: column-parallel ``wq``, ``wk``,
``wv``, ``w1``, ``w3`` and ``output`` along dim 0, row-parallel ``wo``, ``w2`` and the parallel
embedding along dim 1, the norms copied into every shard.

A block of rows goes straight to its place in every shard file (:mod:`.torch_zip` writes each
storage at its planned offset), so blocks may come in any size and order and nothing is
buffered: q and k only reorder rows within a head, and each reordered row is written where it
belongs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, UnsupportedError, WorkError
from ..memory import address_view
from .side_fields import positive_int, positive_number
from .torch_pickle import PthTensor, TensorLike
from .torch_zip import TorchZipWriter

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
DEFAULT_ROPE_THETA = 10000.0
# Meta's own FFN rules for LLaMA 1/2 (the 70B's second), tried before any other description.
_RELEASED_FFN_RULES = ((256, None), (4096, 1.3))

# HF suffix of a per-layer tensor -> (Meta suffix, split dim or None for a copy, rotary rows)
_LAYER = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0, True),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0, True),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0, False),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1, False),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0, False),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0, False),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1, False),
    "input_layernorm.weight": ("attention_norm.weight", None, False),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None, False),
}
_GLOBAL = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1, False),
    "model.norm.weight": ("norm.weight", None, False),
    "lm_head.weight": ("output.weight", 0, False),
}
# Buffers some conversions saved beside the weights; Meta's code computes them.
_DROPPED_SUFFIX = ".self_attn.rotary_emb.inv_freq"


def shard_name(index: int) -> str:
    return f"consolidated.{index:02d}.pth"


def ffn_width(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """Meta's ``FeedForward`` width (``model.py``), as transformers' conversion computes it."""
    hidden = int((multiplier or 1) * int(8 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_rule(dim: int, intermediate: int) -> tuple[int, float | None]:
    """The simplest ``multiple_of``/``ffn_dim_multiplier`` that give ``intermediate``.

    Meta's released rules first, then powers of two without a multiplier; any other width is
    still exact with ``multiple_of`` set to the width itself.
    """
    rules = [*_RELEASED_FFN_RULES, *((1 << k, None) for k in range(12, -1, -1))]
    for multiple_of, multiplier in rules:
        if ffn_width(dim, multiple_of, multiplier) == intermediate:
            return multiple_of, multiplier
    hidden = int(8 * dim / 3)
    multiplier = None if hidden <= intermediate else intermediate / hidden
    if ffn_width(dim, intermediate, multiplier) != intermediate:
        raise UnsupportedError(f"intermediate_size {intermediate}: no params.json gives it for dim {dim}")
    return intermediate, multiplier


def meta_params(config: Mapping[str, object], where: str | Path = "config.json") -> dict:
    """``params.json`` for a LLaMA 1/2 ``config.json``, which transformers' conversion maps back.

    ``vocab_size`` is -1, as in Meta's files (the tokenizer says). The context length has no
    place in ``params.json``: Meta's code takes it at run time.
    """

    def integer(key: str, default: int | None = None) -> int:
        return positive_int(config, key, where, default)

    def refuse(condition: object, what: str) -> None:
        if condition:
            raise UnsupportedError(f"{where}: {what}: Meta's LLaMA layout cannot hold it")

    refuse(config.get("model_type") != "llama", f"model_type {config.get('model_type')!r}")
    refuse(config.get("hidden_act", "silu") != "silu", f"hidden_act {config.get('hidden_act')!r}")
    refuse(config.get("tie_word_embeddings"), "tied input and output embeddings")
    refuse(config.get("attention_bias") or config.get("mlp_bias"), "bias terms")
    dim, heads, layers = (integer(k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers"))
    kv_heads = integer("num_key_value_heads", heads)
    intermediate = integer("intermediate_size")
    if dim % heads or (dim // heads) % 2 or heads % kv_heads:
        raise FormatError(f"{where}: {heads} heads ({kv_heads} key/value) do not fit hidden_size {dim}")
    refuse(config.get("head_dim", dim // heads) != dim // heads, f"head_dim {config.get('head_dim')}")
    vocab = config.get("vocab_size")
    refuse(isinstance(vocab, int) and vocab >= 100_000, f"vocabulary of {vocab} (Llama 3 and later)")
    rope = config.get("rope_parameters") or {}  # transformers 5; earlier: rope_theta, rope_scaling
    if not isinstance(rope, Mapping):
        raise FormatError(f"{where}: 'rope_parameters' must be an object, found {rope!r}")
    refuse(config.get("rope_scaling"), "rope scaling")
    refuse(rope.get("rope_type", "default") != "default", f"rope_type {rope.get('rope_type')!r}")
    theta = positive_number(rope if "rope_theta" in rope else config, "rope_theta", where,
                            DEFAULT_ROPE_THETA)
    eps = positive_number(config, "rms_norm_eps", where, 1e-6)  # transformers' default
    multiple_of, multiplier = _ffn_rule(dim, intermediate)
    params: dict[str, object] = {"dim": dim, "multiple_of": multiple_of}  # Meta's key order
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params["n_heads"] = heads
    if kv_heads != heads:
        params["n_kv_heads"] = kv_heads
    params |= {"n_layers": layers, "norm_eps": eps}
    if theta != DEFAULT_ROPE_THETA:
        params["rope_theta"] = int(theta) if float(theta).is_integer() else theta
    params["vocab_size"] = -1
    return params


@dataclass(frozen=True)
class _Placement:
    """Where one HF tensor goes: its Meta name, the dim it splits on, its rotary head size."""

    meta: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # the HF tensor's
    split: int | None  # None: every shard holds a copy
    head_dim: int | None  # q and k: rows are reordered within heads of this many rows

    def part_shape(self, shards: int) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.split is not None:
            shape[self.split] //= shards
        return tuple(shape)


class MetaLayout:
    """The shards, their tensors (in the order given) and ``params.json``, from the plan alone.

    ``tensors`` are the HF tensors (name, dtype, shape) in the order they will be written;
    ``rotary_emb.inv_freq`` buffers among them are dropped (:attr:`dropped`).
    """

    def __init__(
        self,
        config: Mapping[str, object],
        tensors: Sequence[TensorLike],
        mp: int = 1,
        where: str | Path = "config.json",
    ):
        self.params = meta_params(config, where)
        if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1:
            raise UnsupportedError(f"--mp {mp!r}: the number of model-parallel shards must be 1 or more")
        heads, kv_heads = self.params["n_heads"], self.params.get("n_kv_heads", self.params["n_heads"])
        if heads % mp or kv_heads % mp:
            raise UnsupportedError(
                f"--mp {mp}: {heads} heads and {kv_heads} key/value heads do not split evenly "
                "into that many model-parallel shards"
            )
        self.mp = mp
        self.filenames = [shard_name(i) for i in range(mp)]
        self.dropped = {t.name for t in tensors if t.name.endswith(_DROPPED_SUFFIX)}
        given = {t.name: t for t in tensors if t.name not in self.dropped}
        embedding = given.get("model.embed_tokens.weight")
        vocab = embedding.shape[0] if embedding is not None and embedding.shape else 0
        if vocab >= 100_000:
            raise UnsupportedError(f"tensor {embedding.name!r}: a vocabulary of {vocab} (Llama 3 and "
                                   "later): Meta's LLaMA layout cannot hold it")
        shapes = self._expected_shapes(vocab)
        self.placements: dict[str, _Placement] = {}
        for name, (meta, split, rotary) in self._targets().items():
            spec = given.pop(name, None)
            if spec is None:
                raise FormatError(f"tensor {name!r} is missing: Meta's layout needs it")
            suffix = meta.split(".", 2)[-1] if meta.startswith("layers.") else meta
            self.placements[name] = self._place(spec, meta, split, rotary, shapes[suffix])
        for name in given:
            raise UnsupportedError(f"tensor {name!r}: no place for it in Meta's LLaMA layout")
        order = [t.name for t in tensors if t.name in self.placements]
        self.shards: list[list[PthTensor]] = [
            [PthTensor(p.meta, p.dtype, p.part_shape(mp)) for p in map(self.placements.get, order)]
            for _ in range(mp)
        ]

    def _targets(self) -> dict[str, tuple[str, int | None, bool]]:
        targets = {"model.embed_tokens.weight": _GLOBAL["model.embed_tokens.weight"]}
        for i in range(self.params["n_layers"]):
            for hf, (meta, split, heads) in _LAYER.items():
                targets[f"model.layers.{i}.{hf}"] = (f"layers.{i}.{meta}", split, heads)
        targets["model.norm.weight"] = _GLOBAL["model.norm.weight"]
        targets["lm_head.weight"] = _GLOBAL["lm_head.weight"]
        return targets

    def _expected_shapes(self, vocab: int) -> dict[str, tuple[int, ...]]:
        """Meta suffix -> the HF shape the config implies, as the reader checks it."""
        p = self.params
        dim, head_dim = p["dim"], p["dim"] // p["n_heads"]
        kv_dim = p.get("n_kv_heads", p["n_heads"]) * head_dim
        ffn = ffn_width(dim, p["multiple_of"], p.get("ffn_dim_multiplier"))
        return {
            "tok_embeddings.weight": (vocab, dim),
            "output.weight": (vocab, dim),
            "norm.weight": (dim,),
            "attention.wq.weight": (dim, dim),
            "attention.wk.weight": (kv_dim, dim),
            "attention.wv.weight": (kv_dim, dim),
            "attention.wo.weight": (dim, dim),
            "feed_forward.w1.weight": (ffn, dim),
            "feed_forward.w3.weight": (ffn, dim),
            "feed_forward.w2.weight": (dim, ffn),
            "attention_norm.weight": (dim,),
            "ffn_norm.weight": (dim,),
        }

    def _place(
        self, spec: TensorLike, meta: str, split: int | None, rotary: bool, expected: tuple
    ) -> _Placement:
        if tuple(spec.shape) != expected:
            raise FormatError(
                f"tensor {spec.name!r} is {list(spec.shape)}, the config implies {list(expected)}"
            )
        if split is not None and spec.shape[split] % self.mp:
            raise UnsupportedError(
                f"tensor {spec.name!r}: {spec.shape[split]} {'rows' if split == 0 else 'columns'} "
                f"do not split into {self.mp} equal model-parallel shards"
            )
        head_dim = self.params["dim"] // self.params["n_heads"] if rotary else None
        return _Placement(meta, spec.dtype, tuple(spec.shape), split, head_dim)

    def params_json(self) -> bytes:
        """One line, as Meta's files are (LLaMA 1/2 7B and 13B come out byte for byte)."""
        return json.dumps(self.params).encode()

    def aux_files(self, source: Mapping[str, Path | bytes]) -> dict[str, Path | bytes]:
        """``params.json``, and the source's ``tokenizer.model`` when it has one."""
        files: dict[str, Path | bytes] = {PARAMS: self.params_json()}
        if TOKENIZER in source:
            files[TOKENIZER] = source[TOKENIZER]
        return files


def _rotary_runs(lo: int, hi: int, head_dim: int) -> list[tuple[int, list[int]]]:
    """HF rows ``[lo, hi)`` of q or k as runs of consecutive Meta rows: (first, HF rows in order).

    HF row ``j * half + t`` of a head is Meta row ``2 * t + j`` of it (transformers' ``permute``
    undone), so a block of whole heads is one run.
    """
    half = head_dim // 2
    by_meta = {}
    for row in range(lo, hi):
        head, within = divmod(row, head_dim)
        by_meta[head * head_dim + within % half * 2 + within // half] = row
    runs: list[tuple[int, list[int]]] = []
    for meta in sorted(by_meta):
        if runs and meta == runs[-1][0] + len(runs[-1][1]):
            runs[-1][1].append(by_meta[meta])
        else:
            runs.append((meta, [by_meta[meta]]))
    return runs


# What one write put in a shard: (shard index, Meta tensor name, byte offset in its storage, bytes).
Piece = tuple[int, str, int, list[memoryview]]


class MetaWriter:
    """Writes a :class:`MetaLayout`'s shards into ``folder`` from blocks of HF rows.

    Every row of every HF tensor must be written exactly once (:meth:`close` refuses a missing
    byte); blocks may have any number of rows and come in any order, across tensors too.
    ``params.json`` and ``tokenizer.model`` are not written here: see :meth:`MetaLayout.aux_files`.
    ``kept`` resumes: per shard, the storages an earlier run wrote (see :class:`TorchZipWriter`).
    """

    def __init__(
        self, folder: Path, layout: MetaLayout,
        kept: Sequence[Mapping[str, tuple[int, bytes]]] | None = None,
    ):
        self.layout = layout
        self.writers: list[TorchZipWriter] = []
        try:
            for k, (filename, tensors) in enumerate(zip(layout.filenames, layout.shards, strict=True)):
                own = kept[k] if kept else None
                self.writers.append(TorchZipWriter(folder / filename, tensors, kept=own))
        except BaseException:
            self.abort()
            raise

    def write_rows(
        self, name: str, start: int, stop: int, rows: torch.Tensor, checksum: bool = True
    ) -> list[Piece]:
        """Rows ``[start, stop)`` of HF tensor ``name``, in its dtype (a dropped buffer: ignored).

        Returns what went where, in the order written: a block of whole heads (any block, for
        tensors other than q and k) makes one run per shard, following the previous block's.
        ``checksum=False``: the pieces' CRC-32s are left to :meth:`checksum`, while ``rows`` live.
        """
        if name in self.layout.dropped:
            return []
        p = self.layout.placements.get(name)
        if p is None or rows.dtype != p.dtype or tuple(rows.shape) != (stop - start, *p.shape[1:]):
            raise WorkError(
                f"internal error: tensor {name!r}: rows [{start}, {stop}) of {rows.dtype} "
                f"{list(rows.shape)} do not fit the layout"
            )
        rows = rows.contiguous()
        if not rows.numel():
            return []
        data = address_view(rows.data_ptr(), rows.nbytes, rows)
        row_bytes = rows.nbytes // (stop - start)
        mp = self.layout.mp
        pieces: list[Piece] = []
        if p.split is None or (mp == 1 and p.head_dim is None):
            pieces = [(k, p.meta, start * row_bytes, [data]) for k in range(mp)]
        elif p.split == 1:
            part = row_bytes // mp
            for k in range(mp):
                columns = [data[r + k * part : r + (k + 1) * part] for r in range(0, len(data), row_bytes)]
                pieces.append((k, p.meta, start * part, columns))
        else:
            per_shard = p.shape[0] // mp
            for k in range(mp):
                lo, hi = max(start, k * per_shard), min(stop, (k + 1) * per_shard)
                if lo >= hi:
                    continue
                if p.head_dim is None:
                    part = data[(lo - start) * row_bytes : (hi - start) * row_bytes]
                    pieces.append((k, p.meta, (lo - k * per_shard) * row_bytes, [part]))
                    continue
                for first, sources in _rotary_runs(lo, hi, p.head_dim):
                    gathered = [data[(s - start) * row_bytes : (s - start + 1) * row_bytes] for s in sources]
                    pieces.append((k, p.meta, (first - k * per_shard) * row_bytes, gathered))
        for k, meta, offset, buffers in pieces:
            self.writers[k].write(meta, offset, buffers, checksum)
        return pieces

    def checksum(self, k: int, meta: str, offset: int, buffers: list[memoryview]) -> None:
        """The CRC-32 of a piece :meth:`write_rows` wrote with ``checksum=False``."""
        self.writers[k].checksum(meta, offset, buffers)

    def close(self, sync: bool = True) -> None:
        """Finish every shard; if one fails, the others are abandoned (the folder is partial)."""
        try:
            for writer in self.writers:
                writer.close(sync)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()

