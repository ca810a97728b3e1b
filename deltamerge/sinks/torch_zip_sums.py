"""The checksums a streamed ``torch.save`` archive carries: CRC-32s, and torch's serialization id.

Storage bytes may be written in any order, so each record's CRC-32 is kept per written range
and ranges are combined as they meet (zlib's ``crc32_combine``, which Python does not expose).

torch writes ``.data/serialization_id``, meant as a unique, deterministic id: ``c10::hash_combine``
over the names of the records written (in the iteration order of the writer's
``std::unordered_set``) and over the CRC-32s its data descriptors carried. Reproducing it (for
libstdc++, which Linux builds of torch use) makes the archive byte for byte ``torch.save``'s.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Sequence

from ..errors import WorkError

_CRC_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, bits reflected as zlib keeps them; a is never 0."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B)."""
    power, k = 1 << 31, 3  # x^(8 * len2): shifting A's CRC past B's bytes
    while len2:
        if len2 & 1:
            power = _multmodp(_X2N[k & 31], power)
        len2 >>= 1
        k += 1
    return _multmodp(power, crc1) ^ crc2


class CrcRanges:
    """The byte ranges of one record written so far, merged as they meet, each with its CRC-32.

    Writes in order only extend one range, its CRC continued by ``zlib.crc32``; out of order
    there is one entry per gap still open. The first bytes are kept for :func:`serialization_id`.
    """

    HEAD = 8

    def __init__(self, size: int, what: str):
        self.size, self.what = size, what
        self._starts: list[int] = []
        self._ranges: dict[int, tuple[int, int]] = {}  # start -> (end, crc)
        self.head = bytearray(self.HEAD)

    def add(self, start: int, buffers: Sequence[memoryview]) -> None:
        """Account for ``buffers``, written one after another from byte ``start``."""
        end = start + sum(len(b) for b in buffers)
        if end == start:
            return
        i = bisect.bisect_right(self._starts, start)
        before = self._starts[i - 1] if i else None
        after = self._starts[i] if i < len(self._starts) else None
        if (before is not None and self._ranges[before][0] > start) or (after is not None and after < end):
            raise WorkError(f"internal error: {self.what}: bytes [{start}, {end}) written twice")
        if start < 0 or end > self.size:
            raise WorkError(f"internal error: {self.what}: bytes [{start}, {end}) past the end")
        joined = before is not None and self._ranges[before][0] == start
        crc, position = self._ranges[before][1] if joined else 0, start
        for buffer in buffers:
            crc = zlib.crc32(buffer, crc)
            if position < self.HEAD:
                take = min(self.HEAD - position, len(buffer))
                self.head[position : position + take] = buffer[:take]
            position += len(buffer)
        if joined:
            start = before
        else:
            self._starts.insert(i, start)
        if after == end:
            after_end, after_crc = self._ranges.pop(after)
            self._starts.remove(after)
            crc, end = crc32_combine(crc, after_crc, after_end - after), after_end
        self._ranges[start] = (end, crc)

    def adopt(self, crc: int, head: bytes) -> None:
        """The whole record, written by an earlier run and read back now: its CRC-32 and first bytes."""
        if self._ranges:
            raise WorkError(f"internal error: {self.what}: adopted after bytes were written")
        if self.size:
            self._starts, self._ranges = [0], {0: (self.size, crc)}
            self.head[: min(self.HEAD, len(head))] = head[: self.HEAD]

    def crc(self) -> int:
        """The record's CRC-32; a byte never written is an error (a bug in the caller)."""
        if not self.size:
            return 0
        end, crc = self._ranges.get(0, (0, 0))
        if end != self.size:
            raise WorkError(f"internal error: {self.what}: bytes from {end} never written")
        return crc


_MASK = (1 << 64) - 1
_MURMUR_MUL = (0xC6A4A793 << 32) + 0x5BD1E995
_PRIMES = (
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
    97, 103, 109, 113, 127, 137, 139, 149, 157, 167, 179, 193, 199, 211, 227, 241, 257, 277, 293,
    313, 337, 359, 383, 409, 439, 467, 503, 541, 577, 619, 661, 709, 761, 823, 887, 953, 1031,
    1109, 1193, 1289, 1381, 1493, 1613, 1741, 1879, 2029, 2179, 2357, 2549, 2753, 2971, 3209,
    3469, 3739, 4027, 4349, 4703, 5087, 5503, 5953, 6427, 6949, 7517, 8123, 8783, 9497, 10273,
    11113, 12011, 12983, 14033, 15173, 16411, 17749, 19183, 20753, 22447, 24281, 26267, 28411,
    30727, 33223, 35933, 38873, 42043, 45481, 49201, 53201, 57557, 62233, 67307, 72817, 78779,
    85229, 92203, 99733,
)  # fmt: skip  # the start of libstdc++'s __prime_list: bucket counts for up to 100k records
_FAST_BUCKETS = (2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13)


def _std_hash(data: bytes) -> int:
    """libstdc++'s 64-bit ``std::hash<std::string>`` (``_Hash_bytes``, seed 0xc70f6907)."""

    def shift_mix(v: int) -> int:
        return v ^ (v >> 47)

    aligned = len(data) & ~7
    h = (0xC70F6907 ^ (len(data) * _MURMUR_MUL)) & _MASK
    for i in range(0, aligned, 8):
        word = int.from_bytes(data[i : i + 8], "little")
        mixed = shift_mix(word * _MURMUR_MUL & _MASK) * _MURMUR_MUL & _MASK
        h = (h ^ mixed) * _MURMUR_MUL & _MASK
    if len(data) & 7:
        h = (h ^ int.from_bytes(data[aligned:], "little")) * _MURMUR_MUL & _MASK
    return shift_mix(shift_mix(h) * _MURMUR_MUL & _MASK)


def _hash_combine(seed: int, value: int) -> int:
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK)) & _MASK


def _unordered_set_order(names: Sequence[str]) -> list[str]:
    """The iteration order of a libstdc++ ``unordered_set<string>`` after inserting ``names``.

    Its nodes form one list with each bucket's nodes together: a node goes first in its
    bucket's run, or first in the list when its bucket is empty. When the count would pass the
    bucket count (load factor 1), the buckets grow (11 at first, then at least double, to the
    next prime) and the list is redistributed front to back by the same rule.
    """
    codes = {name: _std_hash(name.encode()) for name in names}
    order: list[str] = []
    buckets, next_resize = 1, 0

    def insert(into: list[str], name: str) -> None:
        bucket = codes[name] % buckets
        into.insert(next((i for i, n in enumerate(into) if codes[n] % buckets == bucket), 0), name)

    for name in names:
        if len(order) + 1 > next_resize:
            wanted = max(len(order) + 1, 0 if next_resize else 11)
            if wanted >= buckets:
                grown = max(wanted + 1, 2 * buckets)
                if grown < len(_FAST_BUCKETS):
                    buckets = _FAST_BUCKETS[grown]
                else:
                    buckets = _PRIMES[bisect.bisect_left(_PRIMES, grown, 6)]
                rehashed: list[str] = []
                for node in order:
                    insert(rehashed, node)
                order = rehashed
            next_resize = buckets
        insert(order, name)
    return order


def serialization_id(names: Sequence[str], crcs: Sequence[int]) -> bytes:
    """torch's id from the records' names in the order written and the descriptors' CRC-32s."""
    combined_names = 0
    for name in _unordered_set_order(names):
        combined_names = _hash_combine(combined_names, _std_hash(name.encode()))
    combined_crcs = 0
    for crc in crcs:
        combined_crcs = _hash_combine(combined_crcs, crc)
    return f"{combined_names:020d}{combined_crcs:020d}".encode()
