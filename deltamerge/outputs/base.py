"""What an output format is: the options it takes and their checks, what a run records of it,
and the sink that writes it.

A format is one module of this package (``hf``, ``gguf``, ``meta``), registered in
``outputs/__init__.py``; its sink lives in ``sinks/``, named by ``sink`` and imported only when a
run opens it, so the CLI reads a format's name and choices without loading torch. apply asks the format what
it needs to know (``shard_files``, ``whole_files``, ``plan_shard_bytes``) instead of comparing
names. docs/design.md, *Adding an output format*, says what a new one implements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..registry import load
from ..sizes import DEFAULT_BLOCK_BYTES

if TYPE_CHECKING:
    from ..compute_pool import ComputePool
    from ..sinks import ShardLayout, Sink


@dataclass(frozen=True)
class FormatOptions:
    """The format options as the user gave them (None: not given), before any format checks them."""

    outtype: str | None = None
    mp: int | None = None
    max_shard_size: str | int | None = None
    threads: int | None = None


@dataclass(frozen=True)
class OutputFormat(ABC):
    """One output format, its options checked (:meth:`configure`)."""

    name: ClassVar[str]
    # What --format's help says of it.
    summary: ClassVar[str]
    # ``"module:function"`` in sinks/ that opens its sink: ``sink_for(fmt, shards, aux, *,
    # vocab_rows, dtype, out, folder, where, config_updates)``, ``where`` being the folder its
    # messages name for config.json. Imported when a run opens it: sinks load torch.
    sink: ClassVar[str]
    # The plan's shards are this format's own files (hf's safetensors shards, which an index
    # lists); otherwise they are only the journal's units, named ``tensors-0000N-of-0000M``.
    shard_files: ClassVar[bool] = False
    # A whole-file decode (xor-files, enc) can write it: it writes the publisher's files as they are.
    whole_files: ClassVar[bool] = False
    # Its files hold the vocabulary (GGUF): a result without tokenizer.model lacks nothing.
    holds_vocab: ClassVar[bool] = False

    @classmethod  # noqa: B027 - optional hook
    def check_options(cls, chosen: str, given: FormatOptions) -> None:
        """Refuse this format's own options given with ``chosen``, another format (or given
        wrongly whatever the format), and options ``chosen`` being this format rules out. Every
        format's check runs, in the registry's order, before the chosen one is configured."""

    @classmethod
    @abstractmethod
    def configure(cls, given: FormatOptions) -> OutputFormat:
        """This format with ``given`` checked and its defaults filled in."""

    @abstractmethod
    def options(self) -> dict:
        """What the result record and the journal's fingerprint say of it."""

    def block_bytes(self) -> int:
        """The row blocks' buffer size when the run does not give one (``--block-size``)."""
        return DEFAULT_BLOCK_BYTES

    def plan_shard_bytes(self, default: int) -> int:
        """The size the plan's shards are laid out at (the journal's unit, and the order
        llama.cpp's converter writes GGUF tensors in): the hf result's ``default`` shard size,
        unless the shards are this format's own files."""
        return default

    def open_sink(
        self, shards: Sequence[ShardLayout], aux: Mapping[str, Path | bytes], *,
        vocab_rows: int | None, dtype: str | None, out: Path, folder: Path,
        config_updates: dict | None = None, pool: ComputePool | None = None,
    ) -> Sink:
        """The sink for this format (its module's ``sink_for``), planned from the shards and the
        result's non-weight files ``aux`` (``config.json`` made to describe the result, as the
        ``hf`` result's would be); ``folder`` is where its files go (the partial folder), ``out``
        the result's final place; ``config_updates`` are the fields a delta's tensors need in
        config.json (see :func:`~deltamerge.sinks.aux.fixed_config`); ``pool``, the run's threads,
        which quantize GGUF rows."""
        return load(self.sink)(self, shards, aux, vocab_rows=vocab_rows, dtype=dtype, out=out,
                               folder=folder, where=config_place(aux, out),
                               config_updates=config_updates, pool=pool)


def config_place(aux: Mapping[str, Path | bytes], out: Path) -> Path:
    """The folder a converting format names in its messages about config.json: the one it
    comes from, else OUT."""
    source = aux.get("config.json")
    return source.parent if isinstance(source, Path) else out
