"""One writer per OUT: an exclusive lock beside OUT, held for a run's whole life.

The lock is ``flock`` on the file ``.OUT.deltamerge-lock`` in OUT's parent folder, the folder
that also holds the partial folder. The kernel releases it when the process dies however it
dies, so a killed run never blocks its own ``--resume``. Where there is no ``fcntl`` (Windows)
the same file is locked with the platform's own call, ``msvcrt.locking``, which the system also
releases when the process ends; ``os.lockf`` serves a POSIX Python built without ``fcntl``.
The holder writes its pid and command into the file, so a second run is refused naming it.
docs/design.md ("One writer per OUT") gives the protocol and why each step is there.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import faults
from ..errors import InputError, OutputBusyError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # everywhere but Windows
    msvcrt = None  # type: ignore[assignment]

# Windows has neither flag: its files are not inherited by children anyway, and a symlink there
# needs privileges to create.
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
# msvcrt.locking forbids reading the bytes it locks; one byte far past the holder's text leaves
# that text readable to the run that is refused.
_LOCKED_BYTE = 1 << 30


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.deltamerge-lock"


@contextmanager
def hold(out: Path) -> Iterator[None]:
    """Hold OUT's lock for the ``with`` body; refuse at once when another run holds it."""
    path = lock_path(out)
    fd = _acquire(path, out)
    try:
        _write_holder(fd)
        faults.reached("locked")
        yield
    finally:
        # Unlinked while still held: a run that opened this inode meanwhile sees, once it gets
        # the flock, that the path no longer names it, and starts over on a fresh file.
        try:
            if _still_named(fd, path):
                os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InputError(f"{path}: a symlink, not deltamerge's lock file: delete it") from None
            raise InputError(f"{path}: cannot create the lock file for {out}: "
                             f"{exc.strerror or exc}") from None
        try:
            _lock(fd)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"{out}: another deltamerge run is writing it ({holder}); wait for it to finish "
                f"or stop it, then run again (with --resume if it was stopped part way)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise InputError(f"{path}: cannot lock: {exc.strerror or exc}") from None
        if _still_named(fd, path):
            return fd
        os.close(fd)  # a finishing run removed the file between our open and our flock


def _lock(fd: int) -> None:
    """Take the exclusive lock without waiting; BlockingIOError when another process holds it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    elif msvcrt is not None:
        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EDEADLOCK):
                raise BlockingIOError(exc.errno, "locked") from None
            raise
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            os.lockf(fd, os.F_TLOCK, 0)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise BlockingIOError(exc.errno, "locked") from None
            raise


def _still_named(fd: int, path: Path) -> bool:
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return stat.S_ISREG(named.st_mode) and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _write_holder(fd: int) -> None:
    argv = list(sys.argv) or ["deltamerge"]
    if argv[0].endswith("__main__.py") or Path(argv[0]).name == "deltamerge":
        argv[0] = "deltamerge"
    command = shlex.join(argv)[:500].replace("\n", " ")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)  # not os.pwrite: Windows has none
    os.write(fd, f"{os.getpid()}\n{command}\n".encode())


def _read_holder(fd: int) -> str:
    """Who holds the lock, from what it wrote; a holder that has only just taken it gets a moment."""
    for _ in range(25):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
        pid, _, rest = text.partition("\n")
        if pid.strip().isdigit() and rest.endswith("\n"):
            return f"pid {pid.strip()}: {rest.strip()}"
        time.sleep(0.02)
    return "its pid is not recorded yet"
