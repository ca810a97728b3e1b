"""The arithmetic of the whole-file kinds: a payload XORed, byte by byte, with a mask.

OpenAssistant's XOR files (``xor-files``) are XORed with the base's file of the same name, a
:class:`FileMask`; OpenBuddy's ``.enc`` files (``enc``) with one key repeated from each chunk's
start, a :class:`RepeatingKey`. The decoders (``deltamerge/decoders``) stream the payloads
through them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path


class Mask(ABC):
    """The bytes a payload is XORed with, chunk after chunk."""

    bytes_read = 0

    @abstractmethod
    def take(self, n: int) -> memoryview:
        """The bytes the next ``n`` payload bytes are XORed with; fewer where the mask ends, the
        payload's bytes past them being XORed with zero (kept as they are)."""

    def finish(self) -> str | None:
        """Once the payload has ended: the md5 of every byte of the mask, where it keeps one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the mask's file."""


class FileMask(Mask):
    """Another file, read alongside the payload; with ``hash_all``, its md5 to the last byte."""

    def __init__(self, path: Path, buffer: bytearray, hash_all: bool):
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.buffer = memoryview(buffer)
        self.md5 = hashlib.md5() if hash_all else None

    def take(self, n: int) -> memoryview:
        got = read_full(self.file, self.buffer[:n])
        self.bytes_read += got
        if self.md5 is not None:
            self.md5.update(self.buffer[:got])
        return self.buffer[:got]

    def finish(self) -> str | None:
        if self.md5 is None:
            return None
        while got := read_full(self.file, self.buffer):
            self.md5.update(self.buffer[:got])
            self.bytes_read += got
        return self.md5.hexdigest()

    def close(self) -> None:
        self.file.close()


class RepeatingKey(Mask):
    """One key XORed with every chunk from its start: the chunk buffer is the key's size."""

    def __init__(self, key: bytearray):
        self.key = memoryview(key)

    def take(self, n: int) -> memoryview:
        assert n <= len(self.key), "payload chunks are at most the key's size"
        return self.key[:n]


def read_full(f, view: memoryview) -> int:
    """Read into ``view`` until it is full or the file ends; the bytes read."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            break
        done += got
    return done
