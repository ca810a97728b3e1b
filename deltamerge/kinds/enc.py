"""OpenBuddy's encrypted releases (``enc``): how such a folder is recognised, and its key.

Each file ``X`` of a release is published as ``X.enc``, ``X`` XORed with one repeating key
(``masks.RepeatingKey``): the first 16 MiB of Meta's original LLaMA-7B ``consolidated.00.pth``,
whose md5 the release fixes. ``deltamerge/decoders/enc.py`` decodes them, outside the tensor
stream.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import MismatchError, NotFoundError
from ..memory import drop_file_range
from .masks import read_full

SUFFIX = ".enc"
KEY_SIZE = 16 * 1024 * 1024  # decrypt.py's SEED_SIZE; also the decode's chunk, so keys align
KEY_FILE = "consolidated.00.pth"
OPENBUDDY_KEY_MD5 = "08cf0f43451cc4ae056e0b19e56c1fcf"


def listed(folder: Path) -> list[Path]:
    """The folder's files as ``glob("*")`` sees them: top level, hidden names aside."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def looks_like_enc(folder: Path) -> bool:
    """A folder holding ``*.enc`` files (decrypt.py's ``glob("*.enc")``)."""
    return folder.is_dir() and any(p.name.endswith(SUFFIX) for p in listed(folder))


def key_file(base: Path) -> Path:
    """``consolidated.00.pth``: BASE itself, or in the folder BASE names (``LLaMA/7B``)."""
    if base.is_file():
        return base
    if (base / KEY_FILE).is_file():
        return base / KEY_FILE
    hint = f": pass {base / '7B'}" if (base / "7B" / KEY_FILE).is_file() else ""
    raise NotFoundError(
        f"{base}: no {KEY_FILE}{hint} (OpenBuddy's key is the first 16 MiB of Meta's original "
        f"LLaMA-7B {KEY_FILE}: BASE is that file, or the folder holding it, e.g. LLaMA/7B)"
    )


def read_key(path: Path, expected_md5: str) -> bytearray:
    """The first 16 MiB of ``path``, refused unless their md5 is ``expected_md5``."""
    key = bytearray(KEY_SIZE)
    with open(path, "rb", buffering=0) as f:
        got = read_full(f, memoryview(key))
        drop_file_range(f.fileno(), 0, got)
    md5 = hashlib.md5(memoryview(key)[:got]).hexdigest()
    if got < KEY_SIZE or md5 != expected_md5.lower():
        size = f"it has only {got} bytes, " if got < KEY_SIZE else ""
        raise MismatchError(
            f"{path}: not the key: {size}its first 16 MiB have md5 {md5}, the key's is "
            f"{expected_md5.lower()}: BASE must be Meta's original LLaMA-7B {KEY_FILE} (not a "
            f"Hugging Face conversion, nor another size's)"
        )
    return key
