"""``--format hf``: sharded safetensors with the model's non-weight files (``sinks/safetensors``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..sizes import DEFAULT_SHARD_SIZE, parse_size
from .base import FormatOptions, OutputFormat


@dataclass(frozen=True)
class HfFormat(OutputFormat):
    """``shard_bytes``: the largest shard file (``--max-shard-size``)."""

    name = "hf"
    sink = "deltamerge.sinks.safetensors:sink_for"
    summary = "safetensors shards and the model's files"
    shard_files = True
    whole_files = True

    shard_bytes: int = parse_size(DEFAULT_SHARD_SIZE)

    @classmethod
    def configure(cls, given: FormatOptions) -> HfFormat:
        return cls(shard_bytes=parse_size(given.max_shard_size or DEFAULT_SHARD_SIZE))

    def options(self) -> dict:
        return {"format": "hf"}

    def plan_shard_bytes(self, default: int) -> int:
        return self.shard_bytes
