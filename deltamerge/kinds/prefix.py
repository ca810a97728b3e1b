"""ChatGLM P-tuning v2 checkpoints: a prefix encoder added to the base, and the config it needs.

ChatGLM's ``ptuning/main.py`` trains with the base frozen and saves only the parameters that
require grad: ``transformer.prefix_encoder.embedding.weight`` of shape (``pre_seq_len``, layers
x 2 x the key/value width), and with ``prefix_projection`` also the two-layer MLP
``transformer.prefix_encoder.trans.{0,2}.{weight,bias}``. Users load the base with
``config.pre_seq_len`` and ``config.prefix_projection`` set, then load that state dict into
``model.transformer.prefix_encoder``. The result here is that in one folder: the base's tensors
unchanged, the prefix encoder's bit for bit (in its own dtype: P-tuning keeps it in fp32), and
``config.json`` with ``pre_seq_len`` (the embedding's rows) and ``prefix_projection`` (whether
the MLP is there), so ``from_pretrained(out, trust_remote_code=True)`` builds and fills it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import FormatError
from ..sources import open_checkpoint
from ..tensor_spec import TensorSpec
from . import ApplyOptions, Kind
from .overlay import overlay

ENCODER = "prefix_encoder"
_NAME = re.compile(rf"(?P<owner>(?:.+\.)?){ENCODER}\.(?P<rest>.+)")


def looks_like_prefix(names: Iterable[str]) -> bool:
    """Every tensor belongs to a prefix encoder: a P-tuning checkpoint, not a model or a delta."""
    names = list(names)
    return bool(names) and all(_NAME.fullmatch(n) for n in names)


class PrefixKind(Kind):
    name = "prefix"

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.checkpoint = open_checkpoint(folder)
        self._config: dict = {}

    def plan(self, specs: dict[str, TensorSpec], options: ApplyOptions):
        where = self.checkpoint.files[0]
        owners = {}
        for name in self.checkpoint.specs:
            m = _NAME.fullmatch(name)
            if m is None:
                raise FormatError(
                    f"{where}: tensor {name!r} is not part of a {ENCODER}: not a P-tuning checkpoint"
                )
            owners[m["owner"]] = name
        if len(owners) != 1:
            raise FormatError(f"{where}: holds {len(owners)} prefix encoders ({', '.join(owners)})")
        owner = next(iter(owners))
        embedding = self.checkpoint.specs.get(f"{owner}{ENCODER}.embedding.weight")
        if embedding is None or len(embedding.shape) != 2:
            raise FormatError(f"{where}: no 2-D tensor {owner}{ENCODER}.embedding.weight")
        # A prefix encoder the base already has is replaced whole, not merged with this one.
        kept = {n: s for n, s in specs.items() if not n.startswith(f"{owner}{ENCODER}.")}
        self._config = {
            "pre_seq_len": embedding.rows,
            "prefix_projection": any(
                n.startswith(f"{owner}{ENCODER}.trans.") for n in self.checkpoint.specs
            ),
        }
        return overlay(kept, self.checkpoint, {n: n for n in self.checkpoint.specs})

    def config_updates(self) -> dict:
        return dict(self._config)

    def close(self) -> None:
        self.checkpoint.close()
