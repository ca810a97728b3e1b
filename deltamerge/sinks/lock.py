"""One writer per OUT: an exclusive lock beside OUT, held for a run's whole life.

The lock is ``flock`` on the file ``.OUT.deltamerge-lock`` in OUT's parent folder, the folder
that also holds the partial folder. The kernel releases it when the process dies however it
dies, so a killed run never blocks its own ``--resume``. The holder writes its pid and command
into the file, so a second run is refused naming it. docs/design.md ("One writer per OUT")
gives the protocol and why each step is there.
"""

from __future__ import annotations

import errno
import fcntl
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

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    os.pwrite(fd, f"{os.getpid()}\n{command}\n".encode(), 0)


def _read_holder(fd: int) -> str:
    """Who holds the lock, from what it wrote; a holder that has only just taken it gets a moment."""
    for _ in range(25):
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        pid, _, rest = text.partition("\n")
        if pid.strip().isdigit() and rest.endswith("\n"):
            return f"pid {pid.strip()}: {rest.strip()}"
        time.sleep(0.02)
    return "its pid is not recorded yet"
