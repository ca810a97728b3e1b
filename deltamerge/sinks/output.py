"""Which sink writes the result: ``--format hf|gguf|meta`` and its options, checked before any work.

``hf`` is sharded safetensors with the model's non-weight files (``safetensors``); ``gguf`` the
GGUF file set llama.cpp's converter would write for that ``hf`` result (``gguf_sink``); ``meta``
Meta's ``consolidated.NN.pth`` layout with ``params.json`` and ``tokenizer.model`` (``meta_sink``).
The plan's shards are the ``hf`` result's files in every format: GGUF's tensor order follows
them, and the journal records them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..compute_pool import ComputePool, machine_cores
from ..errors import InputError
from ..names import FORMATS, MP_SHARDS
from ..sizes import DEFAULT_SHARD_SIZE, parse_size
from . import ShardLayout, Sink
from .aux import fixed_config, load_config
from .gguf import OUTTYPES
from .gguf_kv import require_gguf
from .gguf_sink import GGUFSink, plan_gguf_output
from .gguf_types import OUTTYPES as QUANTIZED
from .meta_pth import MetaLayout
from .meta_sink import MetaSink
from .safetensors import SafetensorsSink


@dataclass(frozen=True)
class OutputFormat:
    """``shard_bytes``: hf, the largest shard file; gguf, llama.cpp's split size (0: one file).
    ``threads``: the compute pool's, which compute LoRA products and quantize GGUF rows (the
    bytes do not depend on them, so neither the record nor the journal says how many)."""

    name: str = "hf"
    outtype: str | None = None
    mp: int = 1
    shard_bytes: int = parse_size(DEFAULT_SHARD_SIZE)
    threads: int = 1

    def options(self) -> dict:
        """What the result record and the journal's fingerprint say of it."""
        if self.name == "gguf":
            return {"format": "gguf", "outtype": self.outtype, "split_max_size": self.shard_bytes}
        if self.name == "meta":
            return {"format": "meta", "mp": self.mp}
        return {"format": "hf"}


def output_format(
    name: str = "hf", *, outtype: str | None = None, mp: int | None = None,
    max_shard_size: str | int | None = None, threads: int | None = None,
) -> OutputFormat:
    """The options checked together: each applies to one format only. ``threads`` defaults to
    the cores this process may run on."""
    if name not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {name!r}")
    if outtype is not None and name != "gguf":
        raise InputError("--outtype is GGUF's tensor type: it needs --format gguf")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be 1 or more, not {threads}")
    if mp is not None and name != "meta":
        raise InputError("--mp is the number of Meta model-parallel shards: it needs --format meta")
    if name == "meta" and max_shard_size is not None:
        raise InputError("--max-shard-size does not apply to --format meta: its shards are the "
                         "model-parallel ones (--mp)")
    if name == "gguf":
        require_gguf()
        if outtype is not None and outtype not in OUTTYPES:
            raise InputError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
        split = parse_size(max_shard_size) if max_shard_size is not None else 0
        if split and outtype in QUANTIZED:
            raise InputError(f"--outtype {outtype} writes one file, as llama-quantize does: leave out "
                             "--max-shard-size")
        return OutputFormat("gguf", outtype=outtype, shard_bytes=split, threads=threads or machine_cores())
    if name == "meta":
        if mp is None:
            mp = 1
        if mp not in MP_SHARDS:
            raise InputError(f"--mp must be one of {', '.join(map(str, MP_SHARDS))}, not {mp!r}")
        return OutputFormat("meta", mp=mp, threads=threads or machine_cores())
    return OutputFormat("hf", shard_bytes=parse_size(max_shard_size or DEFAULT_SHARD_SIZE),
                        threads=threads or machine_cores())


def open_sink(
    fmt: OutputFormat, shards: Sequence[ShardLayout], aux: Mapping[str, Path | bytes], *,
    vocab_rows: int | None, dtype: str | None, out: Path, folder: Path,
    config_updates: dict | None = None, pool: ComputePool | None = None,
) -> Sink:
    """The sink for ``fmt``, planned from the shards and the result's non-weight files ``aux``
    (``config.json`` made to describe the result, as the ``hf`` result's would be); ``folder``
    is where its files go (the partial folder), ``out`` the result's final place, whose name
    names a GGUF model when nothing else does; ``config_updates`` are the fields a delta's
    tensors need in config.json (see :func:`~.aux.fixed_config`); ``pool``, the run's threads
    (else ``fmt.threads`` of the sink's own), quantizes GGUF rows."""
    if fmt.name == "hf":
        return SafetensorsSink()
    source = aux.get("config.json")
    where = source.parent if isinstance(source, Path) else out
    if fmt.name == "gguf":
        plan = plan_gguf_output(aux, shards, vocab_rows=vocab_rows, dtype=dtype, outtype=fmt.outtype,
                                dir_name=out.name, split_max_size=fmt.shard_bytes, where=where,
                                config_updates=config_updates)
        return GGUFSink(plan, shards, pool=pool or ComputePool(fmt.threads))
    config = load_config(source)
    if config is None:
        raise InputError(f"{where}: no config.json the result can be described by; Meta's layout "
                         "needs it (its params.json is made from it)")
    layout = MetaLayout(fixed_config(config, vocab_rows, dtype, config_updates),
                        [spec for shard in shards for spec in shard.specs], fmt.mp,
                        where=where / "config.json")
    return MetaSink(layout, shards, folder)

