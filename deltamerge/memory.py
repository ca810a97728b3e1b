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
import resource
import sys

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
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


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
