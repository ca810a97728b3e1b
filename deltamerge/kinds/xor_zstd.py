"""Compressed XOR deltas (``make-delta --kind xor --compress``): a XOR delta stored as zstd
frames of byte planes (``formats/xor_zstd.py``). Applied exactly as a XOR delta is: only the
reading differs, and ``sources/xor_zstd.py`` decompresses the rows the engine asks for."""

from __future__ import annotations

from pathlib import Path

from ..formats.xor_zstd import KIND
from ..sources import open_checkpoint
from ..sources.xor_zstd import ZstdXorCheckpoint
from .xor import XorKind


class XorZstdKind(XorKind):
    name = KIND

    def __init__(self, folder: Path):
        super().__init__(folder, ZstdXorCheckpoint(open_checkpoint(folder)))
