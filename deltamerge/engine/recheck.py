"""What a resumed run keeps, it checks again: every journaled shard is read back and hashed.

The journal says that a shard was once written, fsynced and hashed; it does not say that the file
is still those bytes (a disk error, another process, a hand edit). So on ``--resume`` each
journaled shard is read again front to back with the same reader the merge uses (its header
parsed and its tensor table compared with the plan's shard, its tensors hashed with streaming
reads that drop the pages behind them) and compared with the journal. Shards that hold are kept,
with the digests computed now; the others are deleted and redone, and the run's notes say which
and why. Anything else in the partial folder is removed: only what was checked is published.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError
from ..integrity.digest import TensorDigest, TensorHasher
from ..progress import make_progress
from ..sinks.folder import remove_entry
from ..sources.folders import Layout
from ..sources.safetensors import SafetensorsCheckpoint
from ..tensor_spec import TensorSpec
from .journal import JOURNAL_NAME, Entry, Journal
from .plan import Shard


@dataclass
class Rechecked:
    kept: dict[str, dict[str, TensorDigest]] = field(default_factory=dict)
    redone: dict[str, str] = field(default_factory=dict)  # shard -> why it is redone
    bytes_read: int = 0
    seconds: float = 0.0

    def note(self) -> str:
        """One line for the run's summary: what was kept, what was redone and why."""
        line = (f"resumed: {len(self.kept)} finished shard(s) re-checked and kept "
                f"({self.bytes_read / 1e6:.1f} MB read and hashed in {self.seconds:.1f} s)")
        for shard, why in self.redone.items():
            line += f"; {shard} redone: {why}"
        return line


class _Mismatch(Exception):
    """Why a shard is not kept."""


class _Stopped(Exception):
    """The run was interrupted while re-checking."""


def recheck(
    folder: Path,
    shards: list[Shard],
    journal: Journal,
    *,
    metadata: dict[str, str],
    block_bytes: int,
    workers: int = 1,
    progress: bool | Callable[[int, int], None] = False,
) -> Rechecked:
    """Keep the journaled shards of ``folder`` that still hold what the journal says."""
    start = time.monotonic()
    planned = {s.filename: s for s in shards}
    claims = {name: e for name, e in journal.recorded.items() if name in planned}
    for entry in os.scandir(folder):
        if entry.name != JOURNAL_NAME and entry.name not in claims:
            remove_entry(folder / entry.name)
    result = Rechecked()
    total = sum(min(e.size, _size(folder / n)) for n, e in claims.items())
    bar = make_progress(progress, total, "re-checking")
    lock, stop = threading.Lock(), threading.Event()

    def advance(n: int) -> None:
        if stop.is_set():
            raise _Stopped
        with lock:
            result.bytes_read += n
            bar.update(n)

    def check(name: str) -> tuple[str, dict[str, TensorDigest] | str]:
        try:
            return name, _check_shard(folder / name, planned[name], claims[name], metadata,
                                      block_bytes, advance)
        except _Mismatch as why:
            return name, str(why)

    pool = ThreadPoolExecutor(max(1, min(workers, len(claims) or 1)))
    try:
        outcomes = list(pool.map(check, sorted(claims)))
    except BaseException:
        stop.set()  # Ctrl-C: the threads stop at their next block, not after every shard
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    kept: dict[str, tuple[int, dict[str, TensorDigest]]] = {}
    for name, outcome in outcomes:
        if isinstance(outcome, str):
            result.redone[name] = outcome
            remove_entry(folder / name)
        else:
            kept[name] = (claims[name].size, outcome)
            result.kept[name] = outcome
    journal.restart(kept)
    result.seconds = time.monotonic() - start
    return result


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def _check_shard(
    path: Path, shard: Shard, claim: Entry, metadata: dict[str, str], block_bytes: int,
    advance: Callable[[int], None],
) -> dict[str, TensorDigest]:
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise _Mismatch("the file is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise _Mismatch("not a regular file (a symlink?)")
    if info.st_size != claim.size:
        raise _Mismatch(f"size {info.st_size} differs from the journal's {claim.size}")
    try:
        ckpt = SafetensorsCheckpoint(Layout(path.parent, "safetensors", (path,), None))
    except FormatError as exc:
        raise _Mismatch(str(exc).removeprefix(f"{path}: ")) from None
    try:
        return _check_tensors(ckpt, path, shard, claim, metadata, block_bytes, advance)
    except FormatError as exc:
        raise _Mismatch(str(exc).removeprefix(f"{path}: ")) from None
    except OSError as exc:
        raise _Mismatch(f"cannot read it: {exc.strerror or exc}") from None
    finally:
        ckpt.close()


def _check_tensors(
    ckpt: SafetensorsCheckpoint, path: Path, shard: Shard, claim: Entry,
    metadata: dict[str, str], block_bytes: int, advance: Callable[[int], None],
) -> dict[str, TensorDigest]:
    table = [(s.name, s.dtype, s.shape) for s in ckpt.specs.values()]
    if table != [(s.name, s.dtype, s.shape) for s in shard.specs]:
        raise _Mismatch("its tensor table differs from the plan's shard")
    if ckpt.headers[path].metadata != metadata:
        raise _Mismatch("its header metadata differs from what this run writes")
    if set(claim.digests) != {s.name for s in shard.specs}:
        raise _Mismatch("the journal does not list its tensors")
    digests = {}
    for spec in shard.specs:
        digest = _hash_tensor(ckpt, spec, block_bytes, advance)
        if digest != claim.digests[spec.name]:
            raise _Mismatch(f"tensor {spec.name!r} digest differs from the journal")
        digests[spec.name] = digest
    return digests


def _hash_tensor(
    ckpt: SafetensorsCheckpoint, spec: TensorSpec, block_bytes: int, advance: Callable[[int], None]
) -> TensorDigest:
    """The tensor's digest from blocks of rows, as the engine hashes what it writes."""
    hasher = TensorHasher(spec)
    row_bytes = spec.nbytes // spec.rows if spec.rows else 0
    step = max(1, block_bytes // row_bytes) if row_bytes else max(spec.rows, 1)
    buffer = torch.empty(max(1, min(spec.nbytes, step * row_bytes)), dtype=torch.uint8)
    for r0 in range(0, spec.rows, step):
        r1 = min(spec.rows, r0 + step)
        block = ckpt.read_rows(spec.name, r0, r1, buffer)
        hasher.update(block.contiguous())
        advance(block.nbytes)
    return hasher.digest()
