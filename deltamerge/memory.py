"""Keeping memory bounded: dropping consumed file ranges from the page cache and from mappings.

Streaming a model through reused buffers is only half the job: pages of files already read stay
cached (and, for mapped files, count as resident memory) unless they are dropped explicitly.
Every call here is advice; where the platform lacks it, it silently does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections import deque

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def drop_file_range(fd: int, offset: int, length: int) -> None:
    """Tell the kernel a range of a file will not be read again (clean pages are freed)."""
    if hasattr(os, "posix_fadvise") and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def will_need(fd: int, offset: int, length: int) -> None:
    """Read-ahead: start fetching a range the job will read next."""
    if hasattr(os, "posix_fadvise") and length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass


def drop_mapped_range(address: int, length: int) -> None:
    """Release the whole pages inside [address, address+length) of a private, unmodified mapping.

    Used for ``torch.load(mmap=True)`` tensors, whose touched pages otherwise count as resident
    memory until the whole file is unmapped.
    """
    if _LIBC is None or length <= 0:
        return
    start = (address + _PAGE - 1) // _PAGE * _PAGE
    end = (address + length) // _PAGE * _PAGE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4


class WriteBehind:
    """Streams written bytes to disk behind the writer and drops them from the page cache.

    Each range just written is queued for writeback at once (``sync_file_range``, which does not
    wait); the range before it is then waited for and dropped. Dirty pages stay at about two
    ranges instead of a whole shard, and the final fsync has little left to do.
    """

    def __init__(self, fd: int, chunk: int = 64 * 1024 * 1024):
        self.fd = fd
        self.chunk = chunk
        self._flushed = 0  # everything before this is on its way to disk
        self._dropped = 0  # everything before this has been waited for and dropped

    def advance(self, position: int) -> None:
        if _LIBC is None or position - self._flushed < self.chunk:
            return
        try:
            _LIBC.sync_file_range(self.fd, self._flushed, position - self._flushed, _SYNC_WRITE)
            if self._flushed > self._dropped:
                flags = _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER
                _LIBC.sync_file_range(self.fd, self._dropped, self._flushed - self._dropped, flags)
                drop_file_range(self.fd, self._dropped, self._flushed - self._dropped)
                self._dropped = self._flushed
        except (OSError, AttributeError):
            return
        self._flushed = position


class RangeWriteBehind:
    """:class:`WriteBehind` for a file written at any offsets (a tensor's planned place).

    Each range is queued for writeback as soon as it is written; once more than ``chunk`` bytes
    are in flight, the oldest ranges are waited for and dropped from the page cache. A range
    ``kept`` (one its writer reads back soon, and drops once read) is queued only.
    """

    def __init__(self, fd: int, chunk: int = 64 * 1024 * 1024):
        self.fd = fd
        self.chunk = chunk
        self._in_flight: deque[tuple[int, int]] = deque()
        self._bytes = 0

    def written(self, offset: int, length: int, *, kept: bool = False) -> None:
        if _LIBC is None or length <= 0:
            return
        try:
            _LIBC.sync_file_range(self.fd, offset, length, _SYNC_WRITE)
            if kept:
                return
            self._in_flight.append((offset, length))
            self._bytes += length
            while self._bytes - self._in_flight[0][1] >= self.chunk:
                start, n = self._in_flight.popleft()
                self._bytes -= n
                _LIBC.sync_file_range(self.fd, start, n, _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER)
                drop_file_range(self.fd, start, n)
        except (OSError, AttributeError):
            return


def address_view(address: int, nbytes: int, owner: object) -> memoryview:
    """A writable byte view of memory that ``owner`` keeps alive (a tensor's storage, say).

    What ``tensor.numpy()`` gives, without numpy, which is not a dependency: ``os.preadv`` and
    hashlib take it and release the GIL while they work on it.
    """
    array = (ctypes.c_ubyte * nbytes).from_address(address)
    array._owner = owner  # type: ignore[attr-defined]  # the memory lives as long as the view
    return memoryview(array).cast("B")


def peak_rss_bytes() -> int | None:
    """This process's own peak resident set size so far, or None where the platform has no
    measure of it (Windows: no ``resource`` module).

    ``VmHWM`` where the kernel reports it: it starts afresh at ``exec``, whereas ``getrusage``'s
    ``ru_maxrss`` keeps the peak of the image before it, so a run started from a large parent
    (a notebook, a training job) would report the parent's peak as its own.
    """
    own = vmhwm_bytes()
    if own is not None:
        return own
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def vmhwm_bytes() -> int | None:
    """``VmHWM`` of ``/proc/self/status``, or None where the kernel has no such line."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    return None
