"""What a resumed run keeps, it checks again: every journaled shard is read back and hashed.

The journal says that a shard was once written, fsynced and hashed; it does not say that the file
is still those bytes (a disk error, another process, a hand edit). So on ``--resume`` each
journaled shard is read again by its sink (``Sink.recheck``: for safetensors the same reader the
merge uses, its header parsed and its tensor table compared with the plan's shard; for GGUF and
Meta's layout each tensor's bytes at their planned place), hashed with streaming reads that drop
the pages behind them, and compared with the journal. Shards that hold are kept, with the digests
computed now; the others are redone, and the run's notes say which and why. Anything else in the
partial folder is removed: only what was checked is published. Where a unit is a whole file
whose digest the journal holds (make-delta's shards, the decoders' files), :func:`recheck_files`
hashes each file whole instead (byte identity, one read).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from ..integrity.digest import TensorDigest
from ..progress import make_progress, step_bar
from ..sinks import Mismatch, Sink
from ..sinks.folder import remove_entry
from .journal import JOURNAL_NAME, Entry, Journal
from .plan import Shard
from .workers import Workers


@dataclass
class Rechecked:
    """``kept``: the plan's tensors' digests of each kept shard (for a sink that converts, the
    journal's: they cannot be computed from the converted bytes; those bytes were re-checked
    against the same journal line); ``written``: the digests of what it wrote, computed now."""

    kept: dict[str, dict[str, TensorDigest]] = field(default_factory=dict)
    written: dict[str, dict[str, TensorDigest]] = field(default_factory=dict)
    redone: dict[str, str] = field(default_factory=dict)  # shard -> why it is redone
    bytes_read: int = 0
    seconds: float = 0.0
    unit: str = "shard"

    def note(self) -> str:
        """One line for the run's summary: what was kept, what was redone and why."""
        line = (f"resumed: {len(self.kept)} finished {self.unit}(s) re-checked and kept "
                f"({self.bytes_read / 1e6:.1f} MB read and hashed in {self.seconds:.1f} s)")
        for shard, why in self.redone.items():
            line += f"; {shard} redone: {why}"
        return line


def recheck(
    folder: Path,
    shards: list[Shard],
    journal: Journal,
    *,
    sink: Sink,
    block_bytes: int,
    workers: int = 1,
    progress: bool | Callable[[int, int], None] = False,
) -> Rechecked:
    """Keep the journaled shards of ``folder`` that still hold what the journal says."""
    start = time.monotonic()
    planned = {s.filename: s for s in shards}
    claims = {name: e for name, e in journal.recorded.items() if name in planned}
    keep = {JOURNAL_NAME, *claims, *(sink.outputs() if claims else ())}
    for entry in os.scandir(folder):
        if entry.name not in keep:
            remove_entry(folder / entry.name)
    result = Rechecked(unit=sink.unit)
    total = sum(e.size for e in claims.values())
    bar = make_progress(progress, total, "re-checking")
    lock = threading.Lock()
    pool = Workers(min(workers, len(claims)), "recheck")

    def advance(n: int) -> None:
        pool.check()  # Ctrl-C: the threads stop at their next block, not after every shard
        with lock:
            result.bytes_read += n
            bar.update(n)

    def check(name: str) -> tuple[str, dict[str, TensorDigest] | str]:
        e = claims[name]
        try:
            return name, sink.recheck(folder, planned[name], e.size, e.digests, e.written,
                                      block_bytes, advance)
        except Mismatch as why:
            return name, str(why)

    try:
        outcomes = pool.map(check, sorted(claims))
    finally:
        bar.close()
    kept = {}
    for name, outcome in outcomes:
        if isinstance(outcome, str):
            result.redone[name] = outcome
            if not sink.converts:
                remove_entry(folder / name)
            continue
        e = claims[name]
        if sink.converts:
            result.kept[name], result.written[name] = dict(e.digests), outcome
        else:
            result.kept[name], result.written[name] = outcome, {}
        kept[name] = Entry(e.size, result.kept[name], result.written[name])
    journal.restart(kept)
    sink.resume(folder, result.written)
    result.seconds = time.monotonic() - start
    return result


def recheck_files(
    folder: Path,
    journal: Journal,
    planned: Collection[str],
    holds: Callable[[str, Entry, Path, Callable[[int], None]], bool],
    desc: str,
) -> dict[str, Entry]:
    """Keep the journaled files of ``folder`` that ``holds`` finds still hold what the journal
    says, read whole (make-delta's shards, a decoder's files: byte identity, one read each).

    ``holds(name, entry, path, advance)`` reads the file, reporting the bytes read through
    ``advance``. Everything else in the folder, and each file that fails, is removed; the journal
    is rewritten with the files kept (``journal.done``).
    """
    claims = {n: e for n, e in journal.recorded.items() if n in planned}
    for entry in os.scandir(folder):
        if entry.name != JOURNAL_NAME and entry.name not in claims:
            remove_entry(folder / entry.name)
    files = {n: folder / n for n in claims
             if (folder / n).is_file() and not (folder / n).is_symlink()}
    bar = step_bar(sum(p.stat().st_size for p in files.values()), desc)
    kept = {}
    try:
        for name, path in files.items():
            bar.at(name)
            if holds(name, claims[name], path, bar.update):
                kept[name] = claims[name]
    finally:
        bar.close()
    for name in set(claims) - set(kept):
        remove_entry(folder / name)
    journal.restart(kept)
    return kept
