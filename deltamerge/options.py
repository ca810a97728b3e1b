"""What a run was asked to do, checked once: the options objects of the entry points.

``apply_delta`` and ``convert`` build a :class:`RunOptions`, ``make_delta`` a :class:`MakeOptions`,
from their keyword arguments (each checked, an :class:`~deltamerge.errors.InputError` naming the
one that is wrong). The object then yields what the run's journal fingerprints
(:meth:`RunOptions.fingerprint`, :meth:`MakeOptions.fingerprint`) and what the result record
says of the options (:meth:`RunOptions.record`), each built here and nowhere else, so that a
resume is refused for the same options the record names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import arguments as args
from .compute_pool import ComputePool
from .cores import machine_cores
from .dtypes import parse_user_dtype, short_name
from .engine.journal import Fingerprint, fingerprint, shard_layout
from .engine.plan import Shard
from .errors import InputError
from .formats.xor_zstd import DEFAULT_LEVEL
from .formats.xor_zstd import KIND as XOR_ZSTD
from .integrity.signing import SignerPin, SigningKey, check_signing_key
from .kinds import ApplyOptions
from .kinds.lora import QLORA_MODES
from .kinds.marks import MARKED_KINDS
from .names import NEW_ROWS, QLORA_KERNELS, QLORA_SCOPES
from .outputs import OutputFormat, output_format
from .sizes import DEFAULT_BLOCK_BYTES, DEFAULT_SHARD_SIZE, parse_size
from .version import __version__

Progress = bool | Callable[[int, int], None]
LORA = "lora"  # the kind make-delta extracts as a peft adapter (extract.py)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return short_name(dtype) if dtype is not None else None


@dataclass(frozen=True)
class RunOptions:
    """apply's and convert's options (``apply_delta``'s arguments, checked)."""

    kind: str | None = None
    dtype: torch.dtype | None = None
    new_rows: str = "zero"
    fmt: OutputFormat = field(default_factory=lambda: output_format("hf"))
    block_size: int = DEFAULT_BLOCK_BYTES
    force: bool = False
    verify: bool = True
    workers: int = 1
    progress: Progress = False
    extra_files: dict[str, Path | bytes] | None = None
    hub: dict | None = None
    expect_md5: str | Path | None = None
    key_md5: str | None = None
    resume: bool = False
    qlora: str | None = None
    qlora_dtype: torch.dtype | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_prefix: str | None = None
    allow_repeat: bool = False
    signer: SignerPin | None = None
    qlora_scope: str = QLORA_SCOPES[0]
    qlora_kernel: str = QLORA_KERNELS[0]
    safe_merge: bool = False
    threads: int = 1  # the compute pool's (LoRA products, GGUF quantization): not in the bytes

    @classmethod
    def of(
        cls, *, kind: str | None = None, dtype: str | torch.dtype | None = None,
        new_rows: str = "zero", max_shard_size: str | int | None = None,
        block_size: int | str | None = None, force: bool = False, verify: bool = True,
        workers: int | None = None, progress: Progress = False,
        extra_files: dict[str, Path | bytes] | None = None, hub: dict | None = None,
        expect_md5: str | Path | None = None, key_md5: str | None = None, resume: bool = False,
        qlora: str | None = None, qlora_dtype: str | torch.dtype | None = None,
        lora_r: int | None = None, lora_alpha: float | None = None, lora_prefix: str | None = None,
        format: str = "hf", outtype: str | None = None, mp: int | None = None,
        allow_repeat: bool = False, signer: SignerPin | None = None, threads: int | None = None,
        qlora_scope: str | None = None, qlora_kernel: str | None = None, safe_merge: bool = False,
    ) -> RunOptions:
        """``apply_delta``'s keyword arguments, each checked (its docstring says what they do)."""
        out_dtype = parse_user_dtype(dtype, "dtype")
        args.text("kind", kind)
        args.text("new_rows", new_rows)
        if new_rows not in NEW_ROWS:
            raise InputError(f"--new-rows must be {' or '.join(map(repr, NEW_ROWS))}, not {new_rows!r}")
        args.text("qlora", qlora)
        if qlora is not None and qlora not in QLORA_MODES:
            raise InputError(f"--qlora must be one of {', '.join(QLORA_MODES)}, not {qlora!r}")
        if qlora_dtype is not None and qlora is None:
            raise InputError("--qlora-dtype is the dtype the base was quantized from: it needs --qlora")
        quant_dtype = parse_user_dtype(qlora_dtype, "qlora_dtype")
        for name, value, allowed in (("qlora_scope", qlora_scope, QLORA_SCOPES),
                                     ("qlora_kernel", qlora_kernel, QLORA_KERNELS)):
            args.text(name, value)
            flag = "--" + name.replace("_", "-")
            if value is not None and value not in allowed:
                raise InputError(f"{flag} must be one of {', '.join(allowed)}, not {value!r}")
            if value is not None and qlora is None:
                raise InputError(f"{flag} says how the base was quantized in training: it needs --qlora")
        args.flag("safe_merge", safe_merge)
        args.size("max_shard_size", max_shard_size)
        block_bytes = args.size("block_size", block_size)
        args.flag("force", force)
        args.flag("verify", verify)
        args.flag("resume", resume)
        args.flag("allow_repeat", allow_repeat)
        workers = args.integer("workers", workers)
        progress = args.progress(progress)
        extra_files = args.extra_files(extra_files)
        hub = args.hub(hub)
        expect_md5 = args.optional_path("expect_md5", expect_md5)
        args.text("key_md5", key_md5)
        lora_r = args.integer("lora_r", lora_r)
        lora_alpha = args.number("lora_alpha", lora_alpha)
        args.text("lora_prefix", lora_prefix)
        args.text("format", format)
        args.text("outtype", outtype)
        mp = args.integer("mp", mp)
        threads = args.integer("threads", threads)
        if threads is not None and threads < 1:
            raise InputError(f"--threads must be 1 or more, not {threads}")
        fmt = output_format(format, outtype=outtype, mp=mp, max_shard_size=max_shard_size,
                            threads=threads)
        return cls(
            kind, out_dtype, new_rows, fmt, block_bytes or fmt.block_bytes(), force, verify,
            workers or 1, progress,
            extra_files, hub, expect_md5, key_md5, resume, qlora, quant_dtype, lora_r, lora_alpha,
            lora_prefix, allow_repeat, signer, qlora_scope or QLORA_SCOPES[0],
            qlora_kernel or QLORA_KERNELS[0], safe_merge, threads or machine_cores(),
        )

    def kind_options(self, pool: ComputePool | None = None) -> ApplyOptions:
        """The options as every kind sees them; ``pool``, the run's threads."""
        return ApplyOptions(pool=pool or ComputePool(1), new_rows=self.new_rows, qlora=self.qlora,
                            qlora_dtype=self.qlora_dtype,
                            qlora_scope=self.qlora_scope, qlora_kernel=self.qlora_kernel,
                            safe_merge=self.safe_merge, lora_r=self.lora_r,
                            lora_alpha=self.lora_alpha, lora_prefix=self.lora_prefix)

    def record(self) -> dict:
        """What the result record says of the options (its ``options``)."""
        record: dict = {"dtype": _dtype_name(self.dtype), "new_rows": self.new_rows,
                        **self.fmt.options()}
        if self.qlora is not None:
            record.update(qlora=self.qlora, qlora_dtype=_dtype_name(self.qlora_dtype),
                          qlora_scope=self.qlora_scope, qlora_kernel=self.qlora_kernel)
        if self.safe_merge:
            record["safe_merge"] = True
        return record

    def fingerprint(
        self, inputs: list[Path], kinds: list[str], algorithm: str, shards: list[Shard]
    ) -> Fingerprint:
        """The run's fingerprint: its inputs, the options the record names and those that decide
        the bytes without being recorded (the deltas' kinds, verification, the --lora-* values,
        the digest algorithm, the version), the shard layout."""
        lora = {k: v for k, v in (("lora_r", self.lora_r), ("lora_alpha", self.lora_alpha),
                                  ("lora_prefix", self.lora_prefix)) if v is not None}
        options = {**self.record(), "kind": kinds, "verify": self.verify,
                   "version": __version__, "algorithm": algorithm, **lora}
        return fingerprint(inputs, options, shard_layout(shards))


@dataclass(frozen=True)
class MakeOptions:
    """make-delta's options (``make_delta``'s arguments, checked); ``kind`` is the delta's kind
    as its manifest names it (``xor-zstd`` for a compressed XOR delta)."""

    kind: str = "add"
    shard_bytes: int = parse_size(DEFAULT_SHARD_SIZE)
    block_size: int = DEFAULT_BLOCK_BYTES
    force: bool = False
    workers: int = 1
    progress: Progress = False
    hub: dict = field(default_factory=dict)
    resume: bool = False
    level: int = DEFAULT_LEVEL
    sign: SigningKey | None = None
    rank: int = 0  # --kind lora: the adapter's rank

    @classmethod
    def of(
        cls, *, kind: str = "add", max_shard_size: str | int | None = None,
        block_size: int | str = DEFAULT_BLOCK_BYTES, force: bool = False,
        workers: int | None = None, progress: Progress = False, hub: dict | None = None,
        resume: bool = False, compress: bool = False, compress_level: int = DEFAULT_LEVEL,
        sign: SigningKey | None = None, rank: int | None = None,
    ) -> MakeOptions:
        """``make_delta``'s keyword arguments but ``kind``'s type, each checked."""
        args.flag("compress", compress)
        level = args.integer("compress_level", compress_level, minimum=-(2**31))  # range: below
        if compress:
            kind = _compressed_kind(kind, level)
        if kind not in MARKED_KINDS:
            raise InputError(f"make-delta --kind must be one of {', '.join(MARKED_KINDS)}, not {kind!r}")
        rank = _rank(kind, rank)
        shard_bytes = args.size("max_shard_size", max_shard_size) or parse_size(DEFAULT_SHARD_SIZE)
        block_bytes = args.size("block_size", block_size) or DEFAULT_BLOCK_BYTES
        args.flag("force", force)
        args.flag("resume", resume)
        workers = args.integer("workers", workers)
        progress = args.progress(progress)
        hub = args.hub(hub)
        if sign is not None:
            check_signing_key(sign)  # a missing package or key fails before the long run
        return cls(kind, shard_bytes, block_bytes, force, workers or 1, progress, hub or {},
                   resume, level, sign, rank)

    def fingerprint(self, inputs: list[Path], shards: list[Shard]) -> Fingerprint:
        """The run's fingerprint (and so the delta's id): inputs, kind, level, shard layout."""
        options: dict = {"make_delta": self.kind, "version": __version__}
        if self.kind == XOR_ZSTD:
            options["compress_level"] = self.level
        return fingerprint(inputs, options, shard_layout(shards))


def _rank(kind: str, rank: int | None) -> int:
    """``--rank`` goes with ``--kind lora`` only, and that kind needs one."""
    if kind != LORA:
        if rank is not None:
            raise InputError(f"make-delta --rank applies to --kind lora only, not {kind!r}")
        return 0
    rank = args.integer("rank", rank)
    if rank is None:
        raise InputError("make-delta --kind lora needs --rank R, the adapter's rank")
    return rank


def _compressed_kind(kind: str, level: int) -> str:
    if kind != "xor":
        raise InputError(f"make-delta --compress applies to --kind xor only, not {kind!r}")
    if not 1 <= level <= 22:
        raise InputError(f"make-delta --compress-level must be a zstd level from 1 to 22, not {level}")
    return XOR_ZSTD
