"""Where results go: a temporary folder beside OUT, renamed into place only when complete.

OUT is either absent or finished: a run that fails or is interrupted leaves nothing at OUT.
The temporary folder has a fixed name derived from OUT so that a later run can find it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import DiskSpaceError, InputError, OutputExistsError, OutputTakenError  # also importable here


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.deltamerge-partial"


def claim_partial(out: Path, resume: bool) -> tuple[Path, bool]:
    """OUT's partial folder, and whether an earlier run left it: one is only taken up with
    ``resume``, and never when it is a symlink or a file."""
    tmp = partial_dir(out)
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        raise InputError(f"{tmp}: not a folder an interrupted run left (a symlink or a file): "
                         f"delete it")
    if tmp.exists():
        if not resume:
            raise InputError(
                f"{out}: an interrupted run left {tmp}: run the same command with --resume to "
                f"finish it, or delete that folder"
            )
        return tmp, True
    tmp.mkdir(parents=True)
    return tmp, False


def missing_journal(folder: Path, name: str) -> InputError:
    """A partial folder whose journal is gone: nothing in it says what its files are, or which
    run made them, so it is not resumed (what it holds would be taken on trust)."""
    return InputError(
        f"{folder}: its journal {name} is missing, so what it holds cannot be checked: delete "
        "the folder and run the command again without --resume"
    )


def append_line(path: Path, obj: dict) -> None:
    """One JSON line added to a journal, durable before the call returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless ``force``: overwriting a model by accident costs hours."""
    if out.name in ("", ".."):  # ".", "..", "/": the folder is renamed into place at the end
        raise InputError(f"{out}: OUT must name the folder to create, not . or .. (e.g. ./merged)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: exists and is not empty (use --force to replace it)")
    if not out.parent.is_dir():
        if out.parent.exists():
            raise InputError(f"{out.parent}: a file, not a folder: {out.name} cannot go in it")
        raise InputError(f"{out.parent}: no such folder to write {out.name} into")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only(out.parent) else "permission denied"
        raise InputError(f"{out.parent}: cannot write {out.name} there ({why}): choose another OUT")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before any work when the result cannot fit, naming both numbers."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"{folder}: not enough free space: the result needs {needed:,} bytes "
            f"({needed / 1e9:.2f} GB), {free:,} bytes ({free / 1e9:.2f} GB) are free"
        )


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder to OUT, replacing what ``force`` allowed to be replaced.

    OUT is checked again here: something another program put there during the run (OUT was
    absent or empty at the start) is not replaced without ``force``; the finished folder is then
    kept where it is, for ``--resume`` to publish once OUT is moved away (its shards are hashed
    again, not recomputed). A symlink at OUT is itself replaced by the result: its target is
    never written or deleted.
    """
    if not force and (any(out.iterdir()) if out.is_dir() else out.exists()):  # as check_out
        raise OutputTakenError(
            f"{out}: appeared during the run (not empty; not replaced without --force): the "
            f"finished result is kept in {tmp}: move {out.name} away and run the same command "
            "with --resume (or add --force to replace it)"
        )
    _fsync_dir(tmp)
    if os.path.lexists(out):
        trash = out.parent / f".{out.name}.deltamerge-old"
        remove_entry(trash)
        os.rename(out, trash)
        os.rename(tmp, out)
        remove_entry(trash)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)


def remove_entry(path: Path) -> None:
    """Remove a file, folder or symlink; a symlink is unlinked, never followed."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
