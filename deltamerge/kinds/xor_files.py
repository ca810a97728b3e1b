"""OpenAssistant ``xor_codec.py`` deltas (``xor-files``): how such a folder is recognised.

Its files are the publisher's files XORed whole with the base's files of the same names
(``masks.FileMask``); ``deltamerge/decoders/xor_files.py`` decodes them, outside the tensor
stream.
"""

from __future__ import annotations

from pathlib import Path

from ..sources.folders import WEIGHT_SUFFIXES, is_weight_name

GZIP_DEFLATE = b"\x1f\x8b\x08"  # gzip's magic and the only compression method it defines


def looks_like_xor_files(folder: Path) -> bool:
    """A folder of XORed files, from the weight files' first bytes.

    XORing two zip archives (``torch.save``) zeroes their leading ``PK\\x03\\x04``; XORing two
    safetensors files zeroes the ``{`` that opens the header at byte 8. Neither happens in a
    real checkpoint, and gzip-compressed weight files are what ``--compress`` makes (named
    ``.gz`` by the user, or kept under the weights' own names as xor_codec.py does).
    """
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        name = path.name
        if not path.is_file():
            continue
        if name.endswith(".gz") and is_weight_name(name[:-3]):
            return True
        if name.endswith(WEIGHT_SUFFIXES):
            with open(path, "rb") as f:
                head = f.read(9)
            if head[:3] == GZIP_DEFLATE:
                return True
            if name.endswith(".safetensors") and len(head) == 9 and head[8] == 0:
                return True
            if not name.endswith(".safetensors") and head[:4] == b"\0\0\0\0":
                return True
    return False


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == GZIP_DEFLATE
