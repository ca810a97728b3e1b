"""Meta's original LLaMA layout (``params.json`` + ``consolidated.NN.pth``), read as Hugging Face.

The tensors a :class:`MetaCheckpoint` yields are those transformers'
``convert_llama_weights_to_hf.py`` writes, bit for bit in the same dtype: its conversion only joins
the model-parallel shards and reorders the rows of q and k, so a block of rows of any Hugging Face
tensor can be assembled straight from the mapped shards. That script loads every shard whole
(more RAM than the model); here a block of rows is the most ever copied, and the mapped pages read
are released.

LLaMA 1 and 2 (and Code Llama) are supported: Llama 3's tiktoken tokenizer and its different
embedding join are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, UnsupportedError, VerificationError
from ..formats.files import inside, read_json_object
from ..memory import drop_file_range, drop_mapped_range
from ..progress import step_bar
from ..tensor_spec import TensorSpec
from .checkpoint import Checkpoint, register, view_rows
from .folders import Layout, own_file
from .torch_bin import load_torch_file

PARAMS = "params.json"
CHECKLIST = "checklist.chk"
TOKENIZER = "tokenizer.model"
# Meta's downloads keep the tokenizer beside the size folders, with its own checklist.
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"
# A tokenizer's own settings beside tokenizer.model, as save_pretrained writes them (Chinese-LLaMA-
# Alpaca's .pth output has them, with its added [PAD]): they say what the tokenizer is.
TOKENIZER_SETTINGS = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
)
MD5_CHUNK = 16 * 1024 * 1024

_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
_CHECKLIST_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")
# Transformers' tokenizers save this as "no limit" (``VERY_LARGE_INTEGER``).
_NO_MAX_LENGTH = int(1e30)


@dataclass(frozen=True)
class MetaParams:
    """``params.json``, validated, with the Hugging Face values transformers derives from it."""

    dim: int
    n_heads: int
    n_layers: int
    norm_eps: float
    multiple_of: int
    n_kv_heads: int | None
    ffn_dim_multiplier: float | None
    rope_theta: float | None
    vocab_size: int | None  # -1 in Meta's files: the embedding says

    @classmethod
    def from_dict(cls, params: object, where: str | Path = PARAMS) -> MetaParams:
        """Check types and consistency: anything wrong is a FormatError naming ``where``."""
        if isinstance(params, dict) and isinstance(params.get("model"), dict):
            params = params["model"]  # some releases nest the values, as the script allows
        if not isinstance(params, dict):
            raise FormatError(f"{where}: expected a JSON object, found {type(params).__name__}")

        def integer(key: str, required: bool) -> int | None:
            value = params.get(key)
            if value is None and not required:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise FormatError(f"{where}: {key!r} must be an integer, found {value!r}")
            return value

        def number(key: str) -> float | None:
            value = params.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise FormatError(f"{where}: {key!r} must be a positive number, found {value!r}")
            return value

        for key in ("dim", "n_heads", "n_layers", "norm_eps"):
            if key not in params:
                raise FormatError(f"{where}: {key!r} is missing")
        dim, n_heads, n_layers = (integer(k, True) for k in ("dim", "n_heads", "n_layers"))
        multiple_of = integer("multiple_of", False)
        n_kv_heads = integer("n_kv_heads", False)
        vocab_size = integer("vocab_size", False)
        for key, value in (
            ("dim", dim),
            ("n_heads", n_heads),
            ("n_layers", n_layers),
            ("multiple_of", multiple_of),
            ("n_kv_heads", n_kv_heads),
        ):
            if value is not None and value <= 0:
                raise FormatError(f"{where}: {key!r} must be positive, found {value}")
        if dim % n_heads or (dim // n_heads) % 2:
            raise FormatError(f"{where}: dim {dim} is not n_heads {n_heads} heads of even size")
        if n_kv_heads is not None and n_heads % n_kv_heads:
            raise FormatError(f"{where}: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}")
        if vocab_size is not None and vocab_size >= 100_000:
            raise UnsupportedError(
                f"{where}: vocabulary of {vocab_size}: Llama 3 and later are not supported "
                "(their tokenizer and embedding layout differ from LLaMA 1/2)"
            )
        norm_eps = number("norm_eps")
        if norm_eps is None:
            raise FormatError(f"{where}: 'norm_eps' must be a positive number, found None")
        return cls(
            dim=dim,
            n_heads=n_heads,
            n_layers=n_layers,
            norm_eps=norm_eps,
            multiple_of=256 if multiple_of is None else multiple_of,
            n_kv_heads=n_kv_heads,
            ffn_dim_multiplier=number("ffn_dim_multiplier"),
            rope_theta=number("rope_theta"),
            vocab_size=vocab_size if vocab_size is not None and vocab_size > 0 else None,
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def intermediate_size(self) -> int:
        """Meta's FFN width rule (``model.py``), as the conversion script computes it."""
        hidden = int((self.ffn_dim_multiplier or 1) * int(8 * self.dim / 3))
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def max_position_embeddings(self) -> int:
        """The script's context length: 16384 when rope_theta > 10000 (Code Llama), else by version.

        The script is told the version; here it is inferred. LLaMA 2's 7B/13B ``params.json``
        differ from LLaMA 1's only in ``norm_eps`` (1e-5 against 1e-6); 70B adds ``n_kv_heads``
        and ``ffn_dim_multiplier``, later releases ``rope_theta``.
        """
        if self.rope_theta is not None and self.rope_theta > 10000.0:
            return 16384
        llama2 = (
            self.norm_eps >= 1e-5
            or self.n_kv_heads is not None
            or self.ffn_dim_multiplier is not None
            or self.rope_theta is not None
        )
        return 4096 if llama2 else 2048


def hf_config(params: dict, vocab_size: int, dtype: torch.dtype) -> dict:
    """The ``config.json`` transformers' conversion writes for these params (LLaMA 1/2).

    ``vocab_size`` comes from the embedding (the script takes it from the tokenizer, which agrees
    for LLaMA 1/2), ``torch_dtype`` from the weights, since they are written as stored.
    """
    p = MetaParams.from_dict(params)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": p.dim,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "max_position_embeddings": p.max_position_embeddings,
        "num_attention_heads": p.n_heads,
        "num_hidden_layers": p.n_layers,
        "num_key_value_heads": p.kv_heads,
        "rms_norm_eps": p.norm_eps,
        "rope_theta": float(p.rope_theta or 10000.0),
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _special_token(content: str) -> dict:
    flags = ("lstrip", "normalized", "rstrip", "single_word")
    return {"content": content, **dict.fromkeys(flags, False)}


def tokenizer_files() -> dict[str, dict]:
    """The slow ``LlamaTokenizer``'s saved settings (beside ``tokenizer.model``), by file name.

    ``legacy`` is written as the script's tokenizer behaved (it left the default, legacy
    handling), so the result tokenizes as a conversion with the script does.
    """
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    special = {key: _special_token(text) for key, text in tokens.items()}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        **{key: {"__type": "AddedToken", **value} for key, value in special.items()},
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": _NO_MAX_LENGTH,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def file_md5(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """md5 of a file read sequentially in 16 MiB chunks, dropping each from the page cache."""
    digest = hashlib.md5(usedforsecurity=False)
    buffer = memoryview(bytearray(MD5_CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while got := os.preadv(fd, [buffer], offset):
            digest.update(buffer[:got])
            drop_file_range(fd, offset, got)
            offset += got
            if progress is not None:
                progress(got)
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_checklist(path: Path) -> dict[str, str]:
    """``md5  filename`` lines (md5sum's format) as {filename: md5}."""
    entries: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not a text file of md5 sums") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        match = _CHECKLIST_LINE.fullmatch(line.rstrip("\r"))
        if match is None:
            raise FormatError(f"{path}: line {number} is not `md5  filename`: {line[:80]!r}")
        entries[match.group(2)] = match.group(1).lower()
    return entries


@dataclass(frozen=True)
class _Source:
    """Where an HF tensor comes from: the Meta name, how shards join, rotary heads if permuted."""

    key: str
    join: int | None  # 0 or 1: concatenated on that dim; None: identical in every shard, take 0
    heads: int | None = None  # q and k: rows are reordered within each of this many heads


class MetaCheckpoint(Checkpoint):
    """A Meta LLaMA folder read as the Hugging Face model the conversion script would write.

    All shards stay mapped (``torch.load(mmap=True)``): one HF tensor needs every shard. A read
    copies only the requested rows from each shard into the caller's buffer (q and k with one
    ``index_select`` straight into it), then releases the mapped pages it read, so resident
    memory stays at the caller's buffer plus a few pages.

    When ``checklist.chk`` is present, every file it lists is checked in ``__init__`` by
    :meth:`verify_checklist`, before any weight is used: md5 needs each file in order, while
    reading is by row blocks in HF order, so the check is one extra sequential pass of the input.
    """

    format = "meta"

    def __init__(self, layout: Layout, verify_checklist: bool = True):
        super().__init__(layout)
        self.shard_files = self._shard_files(layout)
        tokenizer = self.path / TOKENIZER
        if not tokenizer.is_file() and (self.path.parent / TOKENIZER).is_file():
            tokenizer = self.path.parent / TOKENIZER
        # Copied into the result: it must be its folder's own file, not a symlink leading out.
        self.tokenizer = own_file(tokenizer.parent, tokenizer) if tokenizer.is_file() else None
        beside = self.tokenizer.parent if self.tokenizer is not None else self.path
        self.tokenizer_settings = {name: own_file(beside, beside / name) for name in
                                   TOKENIZER_SETTINGS if (beside / name).is_file()}
        if verify_checklist:
            self.verify_checklist()
        params_path = self.path / PARAMS
        self.params_json = read_json_object(params_path)
        self.params = MetaParams.from_dict(self.params_json, params_path)
        self._states: list[dict[str, torch.Tensor]] = []
        self._sources: dict[str, _Source] = {}
        self._offsets: dict[str, list[int]] = {}
        try:
            for path in self.shard_files:
                if not zipfile.is_zipfile(path):
                    raise FormatError(
                        f"{path}: not a zip torch archive: it cannot be mapped, only loaded whole"
                    )
                self._states.append(load_torch_file(path)[0])
            self._build_specs()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _shard_files(layout: Layout) -> tuple[Path, ...]:
        """The shards in order, refusing gaps: a missing one is named."""
        numbered: dict[int, Path] = {}
        for path in layout.files:
            match = _SHARD_NAME.fullmatch(path.name)
            if match is None:
                raise FormatError(f"{path}: not a shard name (expected consolidated.NN.pth)")
            numbered[int(match.group(1))] = path
        if not numbered:
            raise FormatError(f"{layout.folder}: no consolidated.NN.pth shards")
        for index in range(max(numbered) + 1):
            if index not in numbered:
                raise FormatError(f"{layout.folder}: shard consolidated.{index:02d}.pth is missing")
        return tuple(numbered[i] for i in sorted(numbered))

    def verify_checklist(self) -> None:
        """Check ``checklist.chk`` (and the tokenizer's, when it is taken from the parent folder).

        Every listed file must exist and match; every shard must be listed. A mismatch is a
        :class:`VerificationError` naming the file and both md5s.
        """
        checklist = self.path / CHECKLIST
        if checklist.is_file():
            entries = read_checklist(checklist)
            paths = {name: inside(self.path, name, checklist) for name in entries}
            for path in paths.values():
                if not path.is_file():
                    raise FormatError(f"{path}: listed in {checklist} but missing")
            bar = step_bar(sum(p.stat().st_size for p in paths.values()), f"md5 ({CHECKLIST})")
            try:
                for name, expected in entries.items():
                    bar.at(name)
                    self._check_md5(paths[name], expected, checklist, bar.update)
            finally:
                bar.close()
            listed = {(self.path / name).resolve() for name in entries}
            for shard in self.shard_files:
                if shard.resolve() not in listed:
                    raise VerificationError(f"{shard}: not listed in {checklist}: cannot verify")
        if self.tokenizer is not None and self.tokenizer.parent != self.path:
            tokenizer_checklist = self.tokenizer.parent / TOKENIZER_CHECKLIST
            if tokenizer_checklist.is_file():
                expected = read_checklist(tokenizer_checklist).get(TOKENIZER)
                if expected is not None:
                    self._check_md5(self.tokenizer, expected, tokenizer_checklist)

    @staticmethod
    def _check_md5(
        path: Path, expected: str, checklist: Path, progress: Callable[[int], None] | None = None
    ) -> None:
        actual = file_md5(path, progress)
        if actual != expected:
            raise VerificationError(
                f"{path}: md5 {actual} does not match {expected} listed in {checklist.name}"
            )

    def _layer_sources(self, i: int) -> dict[str, _Source]:
        p, meta, hf = self.params, f"layers.{i}.", f"model.layers.{i}."
        return {
            f"{hf}self_attn.q_proj.weight": _Source(f"{meta}attention.wq.weight", 0, p.n_heads),
            f"{hf}self_attn.k_proj.weight": _Source(f"{meta}attention.wk.weight", 0, p.kv_heads),
            f"{hf}self_attn.v_proj.weight": _Source(f"{meta}attention.wv.weight", 0),
            f"{hf}self_attn.o_proj.weight": _Source(f"{meta}attention.wo.weight", 1),
            f"{hf}mlp.gate_proj.weight": _Source(f"{meta}feed_forward.w1.weight", 0),
            f"{hf}mlp.up_proj.weight": _Source(f"{meta}feed_forward.w3.weight", 0),
            f"{hf}mlp.down_proj.weight": _Source(f"{meta}feed_forward.w2.weight", 1),
            f"{hf}input_layernorm.weight": _Source(f"{meta}attention_norm.weight", None),
            f"{hf}post_attention_layernorm.weight": _Source(f"{meta}ffn_norm.weight", None),
        }

    def _build_specs(self) -> None:
        p, shards = self.params, len(self._states)
        sources = {"model.embed_tokens.weight": _Source("tok_embeddings.weight", 1)}
        for i in range(p.n_layers):
            sources.update(self._layer_sources(i))
        sources["model.norm.weight"] = _Source("norm.weight", None)
        sources["lm_head.weight"] = _Source("output.weight", 0)
        self._check_names(sources)
        self._check_shard_count()
        if p.n_heads % shards or p.kv_heads % shards:
            raise UnsupportedError(
                f"{self.path}: {shards} shards do not divide {p.n_heads} heads and {p.kv_heads} "
                "key/value heads evenly, which transformers' conversion requires"
            )
        for name, source in sources.items():
            self.specs[name] = self._join_spec(name, source)
            self._sources[name] = source
        vocab = self.specs["model.embed_tokens.weight"].shape[0]
        kv_dim, ffn = p.kv_heads * p.head_dim, p.intermediate_size
        expected = {"model.embed_tokens.weight": (vocab, p.dim), "lm_head.weight": (vocab, p.dim)}
        expected["model.norm.weight"] = (p.dim,)
        for i in range(p.n_layers):
            for suffix, shape in (
                ("self_attn.q_proj", (p.dim, p.dim)),
                ("self_attn.k_proj", (kv_dim, p.dim)),
                ("self_attn.v_proj", (kv_dim, p.dim)),
                ("self_attn.o_proj", (p.dim, p.dim)),
                ("mlp.gate_proj", (ffn, p.dim)),
                ("mlp.up_proj", (ffn, p.dim)),
                ("mlp.down_proj", (p.dim, ffn)),
                ("input_layernorm", (p.dim,)),
                ("post_attention_layernorm", (p.dim,)),
            ):
                expected[f"model.layers.{i}.{suffix}.weight"] = shape
        for name, shape in expected.items():
            if self.specs[name].shape != shape:
                raise FormatError(
                    f"{self.path}: {self._sources[name].key} joins to "
                    f"{list(self.specs[name].shape)} but {PARAMS} implies {list(shape)}"
                )
        if p.vocab_size is not None and p.vocab_size != vocab:
            raise FormatError(
                f"{self.path / PARAMS}: vocab_size {p.vocab_size}, but the embedding has {vocab}"
            )

    def _check_names(self, sources: dict[str, _Source]) -> None:
        wanted = {source.key for source in sources.values()}
        for path, state in zip(self.shard_files, self._states, strict=True):
            for key in wanted - state.keys():
                raise FormatError(f"{path}: tensor {key!r} is missing")
            for key in state.keys() - wanted - {"rope.freqs"}:
                raise FormatError(f"{path}: unexpected tensor {key!r} for LLaMA with {PARAMS}")

    def _check_shard_count(self) -> None:
        """Missing shards past the last one present show as q rows that fall short of ``dim``."""
        if not self.params.n_layers:
            return
        rows = self._states[0]["layers.0.attention.wq.weight"].shape[0]
        total = self.params.dim // rows if rows and self.params.dim % rows == 0 else 0
        if total > len(self._states):
            raise FormatError(
                f"{self.path}: shard consolidated.{len(self._states):02d}.pth is missing "
                f"(the shards hold 1/{total} of the model each)"
            )

    def _join_spec(self, name: str, source: _Source) -> TensorSpec:
        parts = [state[source.key] for state in self._states]
        first = parts[0]
        for path, part in zip(self.shard_files, parts, strict=True):
            if part.dtype != first.dtype or part.dim() != first.dim() or part.dim() not in (1, 2):
                raise FormatError(f"{path}: tensor {source.key!r} is {part.dtype} {list(part.shape)}")
        if source.join is None:
            self._offsets[name] = [0]
            return TensorSpec(name, first.dtype, tuple(first.shape))
        other = 1 - source.join
        for path, part in zip(self.shard_files, parts, strict=True):
            if part.dim() != 2 or part.shape[other] != first.shape[other]:
                raise FormatError(
                    f"{path}: tensor {source.key!r} is {list(part.shape)}, shard 0 has {list(first.shape)}"
                )
        sizes = [part.shape[source.join] for part in parts]
        self._offsets[name] = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        shape = list(first.shape)
        shape[source.join] = sum(sizes)
        if source.heads is not None and any(size % (shape[0] // source.heads) for size in sizes):
            raise FormatError(f"{self.shard_files[0]}: tensor {source.key!r} splits a head across shards")
        return TensorSpec(name, first.dtype, tuple(shape))

    def file_of(self, name: str) -> Path:
        """The first shard: every shard holds a part of each tensor (or a copy of the norms)."""
        return self.shard_files[0]

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        spec, source = self.specs[name], self._sources[name]
        out = view_rows(buffer, spec, stop - start)
        offsets = self._offsets[name]
        if source.join == 0:
            for shard, state in enumerate(self._states):
                lo, hi = max(start, offsets[shard]), min(stop, offsets[shard + 1])
                if lo < hi:
                    target = out[lo - start : hi - start]
                    self._gather(state[source.key], source, spec, lo, hi, offsets[shard], target)
        elif source.join == 1:
            for shard, state in enumerate(self._states):
                part = state[source.key][start:stop]
                out[:, offsets[shard] : offsets[shard + 1]].copy_(part)
                _release(part)
        else:
            part = self._states[0][source.key][start:stop]
            out.copy_(part)
            _release(part)
        return out

    @staticmethod
    def _gather(
        part: torch.Tensor,
        source: _Source,
        spec: TensorSpec,
        lo: int,
        hi: int,
        offset: int,
        out: torch.Tensor,
    ) -> None:
        """HF rows ``[lo, hi)`` from the shard holding Meta rows ``offset...``, into ``out``.

        A shard holds whole heads, and q/k's reordering stays within a head, so the HF rows of a
        shard are the reordered Meta rows of that same shard. The pages released span the Meta rows
        read, which include rows a later block reads: those fault back in from the page cache.
        """
        if source.heads is None:
            rows = part[lo - offset : hi - offset]
            out.copy_(rows)
            _release(rows)
            return
        index = meta_rows(torch.arange(lo, hi), spec.shape[0] // source.heads) - offset
        torch.index_select(part, 0, index, out=out)
        _release(part[int(index.min()) : int(index.max()) + 1])

    def aux_files(self) -> dict[str, Path | bytes]:
        """Generated ``config.json``/``generation_config.json`` and the LLaMA tokenizer's files.

        Values are bytes to write, or a path to copy (``tokenizer.model``, taken from this folder
        or, as Meta's downloads place it, the parent). The tokenizer's settings are the ones
        beside ``tokenizer.model`` when there are any (added tokens, a pad token), copied as they
        are so the result's tokenizer is the source's; else those the conversion script writes.
        Without ``tokenizer.model`` no tokenizer settings are written: they would describe a
        tokenizer that is not there.
        """
        spec = self.specs["model.embed_tokens.weight"]
        config = hf_config(self.params_json, spec.shape[0], spec.dtype)
        files: dict[str, Path | bytes] = {
            "config.json": _json_bytes(config),
            "generation_config.json": _json_bytes(
                {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
            ),
        }
        if self.tokenizer is not None:
            files[TOKENIZER] = self.tokenizer
            files.update(self.tokenizer_settings or {
                name: _json_bytes(obj) for name, obj in tokenizer_files().items()})
        return files

    def close(self) -> None:
        """Unmap the shards (the mappings go with the last reference to their tensors)."""
        self._states = []


def meta_rows(hf_rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The Meta row each HF row of q or k comes from.

    Transformers' ``permute`` views each head's rows as (head_dim/2, 2) pairs and transposes them:
    HF row ``j * half + t`` of a head is Meta row ``2 * t + j`` of that head.
    """
    half = head_dim // 2
    head, within = hf_rows // head_dim, hf_rows % head_dim
    return head * head_dim + (within % half) * 2 + within // half


def _release(rows: torch.Tensor) -> None:
    """Drop the mapped pages of rows already copied out, so they stop counting as resident."""
    if rows.is_contiguous() and rows.numel():
        drop_mapped_range(rows.data_ptr(), rows.nbytes)


register("meta", MetaCheckpoint)
