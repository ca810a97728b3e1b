"""``--format gguf``: the GGUF file set llama.cpp's converter would write for the ``hf`` result
(``sinks/gguf_sink``), at an ``--outtype`` the converter writes itself or one llama-quantize
writes from it; ``--max-shard-size`` splits as llama.cpp's ``--split-max-size`` does."""

from __future__ import annotations

from dataclasses import dataclass

from ..cores import machine_cores
from ..errors import InputError
from ..registry import load
from ..sizes import parse_size
from .base import FormatOptions, OutputFormat

# llama-quantize's types (sinks/gguf_types.py, each file type ``MOSTLY_`` + its name in
# capitals), after the types the converter writes itself (sinks/gguf.py).
QUANTIZED_OUTTYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_0", "q4_1", "q5_0",
                      "q5_1")
OUTTYPES = ("f32", "f16", "bf16", "q8_0", *QUANTIZED_OUTTYPES)
# Their runs load numba's compiler for the k-quants (about 100 MiB; every one of them writes some
# tensors in a k-type), so their row blocks are smaller unless --block-size says otherwise: at 13B
# widths with two workers, q4_k_m peaked at 515 MiB with 24 MiB blocks and 468 MiB with 16 MiB.
QUANTIZED_BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class GgufFormat(OutputFormat):
    """``shard_bytes``: llama.cpp's split size (0: one file). ``threads``: the threads that
    quantize (the bytes do not depend on them, so neither the record nor the journal says how
    many)."""

    name = "gguf"
    sink = "deltamerge.sinks.gguf_sink:sink_for"
    summary = "the file llama.cpp's convert_hf_to_gguf.py would write from that"
    holds_vocab = True

    outtype: str | None = None
    shard_bytes: int = 0
    threads: int = 1

    @classmethod
    def check_options(cls, chosen: str, given: FormatOptions) -> None:
        if given.outtype is not None and chosen != cls.name:
            raise InputError("--outtype is GGUF's tensor type: it needs --format gguf")
        if given.threads is not None and given.threads < 1:
            raise InputError(f"--threads must be 1 or more, not {given.threads}")

    @classmethod
    def configure(cls, given: FormatOptions) -> GgufFormat:
        """``threads`` defaults to the cores this process may run on. Without the gguf package
        (an optional extra) the sink's own check says how to get it, before any work."""
        load("deltamerge.sinks.gguf_kv:require_gguf")()
        outtype = given.outtype
        if outtype is not None and outtype not in OUTTYPES:
            raise InputError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
        split = parse_size(given.max_shard_size) if given.max_shard_size is not None else 0
        if split and outtype in QUANTIZED_OUTTYPES:
            raise InputError(f"--outtype {outtype} writes one file, as llama-quantize does: leave out "
                             "--max-shard-size")
        return cls(outtype=outtype, shard_bytes=split, threads=given.threads or machine_cores())

    def block_bytes(self) -> int:
        return QUANTIZED_BLOCK_BYTES if self.outtype in QUANTIZED_OUTTYPES else super().block_bytes()

    def options(self) -> dict:
        return {"format": "gguf", "outtype": self.outtype, "split_max_size": self.shard_bytes}

