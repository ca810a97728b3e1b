"""``--format meta``: Meta's ``consolidated.NN.pth`` layout with ``params.json`` and
``tokenizer.model`` (``sinks/meta_sink``), in ``--mp`` model-parallel shards."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .base import FormatOptions, OutputFormat

# --mp: the model-parallel shard counts Meta's checkpoints come in.
MP_SHARDS = (1, 2, 4, 8)


@dataclass(frozen=True)
class MetaFormat(OutputFormat):
    """``mp``: the model-parallel shards (``consolidated.00.pth``...)."""

    name = "meta"
    sink = "deltamerge.sinks.meta_sink:sink_for"
    summary = "Meta's consolidated.NN.pth, params.json, tokenizer.model"

    mp: int = 1

    @classmethod
    def check_options(cls, chosen: str, given: FormatOptions) -> None:
        if given.mp is not None and chosen != cls.name:
            raise InputError("--mp is the number of Meta model-parallel shards: it needs --format meta")
        if chosen == cls.name and given.max_shard_size is not None:
            raise InputError("--max-shard-size does not apply to --format meta: its shards are the "
                             "model-parallel ones (--mp)")

    @classmethod
    def configure(cls, given: FormatOptions) -> MetaFormat:
        mp = 1 if given.mp is None else given.mp
        if mp not in MP_SHARDS:
            raise InputError(f"--mp must be one of {', '.join(map(str, MP_SHARDS))}, not {mp!r}")
        return cls(mp=mp)

    def options(self) -> dict:
        return {"format": "meta", "mp": self.mp}
