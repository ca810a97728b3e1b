"""A run's life around its work, the same for every command that writes OUT.

apply (the tensor stream, and the whole-file decoders), convert (apply with no delta) and
make-delta all go through it, in two steps (docs/design.md, "Crashes, signals, resume" and
"One writer per OUT"):

1. :func:`locked_out`: the inputs' overlap with OUT is refused and OUT is checked, read-only;
   then OUT's lock is taken and OUT checked again under it (a run that held the lock may have
   published meanwhile). Nothing is created before the lock is held.
2. :func:`partial_run`: the partial folder beside OUT and its journal (``journal.py``: one
   fingerprint of the inputs, options and layout, then one line per finished unit: a shard, or a
   decoded file), fresh, or an earlier run's of the same fingerprint with ``resume``. The run
   works in it; on leaving, it is published by one rename; or kept for ``--resume`` with
   :class:`~deltamerge.errors.InterruptedRun` (a signal, or a failure while working, or OUT filled
   by another program meanwhile); or discarded (any other failure, and a lack of space found
   before anything was journaled).

What a resumed run keeps, it checks again first (``recheck.py``); the threads a run works on
start and stop one way (``workers.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .. import faults
from ..errors import DiskSpaceError, InterruptedRun, WorkError
from ..sinks.folder import OutputTakenError, check_out, discard, publish
from ..sinks.lock import hold
from ..sinks.overlap import refuse_overlap
from ..sources.resolve import input_region
from .journal import Fingerprint, Journal, open_partial

T = TypeVar("T")


@contextmanager
def locked_out(
    out: Path, inputs: list[tuple[str | Path, str]], force: bool,
    finished: Callable[[], T | None] = lambda: None,
) -> Iterator[T | None]:
    """OUT, checked and locked for the block; ``inputs`` are ``(given, role)`` pairs.

    ``finished`` finds an OUT that this same command already finished (apply's record); such an
    OUT is not refused here but handed to the block, under the lock, to be told apart by its
    fingerprint once the run is planned.
    """
    refuse_overlap(out, [(str(given), input_region(given, role)) for given, role in inputs])
    if finished() is None:
        check_out(out, force)
    with hold(out):
        found = finished()  # again under the lock: a run that held it may have published
        if found is None:
            check_out(out, force)
        yield found


@dataclass(frozen=True)
class Partial:
    """The folder a run builds OUT in, and its journal."""

    folder: Path
    journal: Journal


@contextmanager
def partial_run(
    out: Path, fp: Fingerprint, *, resume: bool, force: bool, kept: str,
    rerun_finds_it: bool = False,
) -> Iterator[Partial]:
    """The partial folder for the block's work, published when the block ends.

    ``kept`` names what an interrupted run keeps there ("the partial result"), for its message;
    ``rerun_finds_it``: the command run again recognises a published OUT as its own (apply's
    record holds the fingerprint), which a stop just after publishing says.
    """
    folder, journal = open_partial(out, fp, resume)
    try:
        yield Partial(folder, journal)
        faults.reached("publish")
        publish(folder, out, force)
    except OutputTakenError:
        raise  # the finished partial folder stays, for --resume once OUT is moved away
    except (KeyboardInterrupt, WorkError) as exc:
        if isinstance(exc, DiskSpaceError):
            if not journal.done:
                discard(folder)
            raise
        raise InterruptedRun.after(
            exc, f"{kept} is kept in {folder}: run the same command with --resume to finish it",
        ) from exc
    except BaseException:
        discard(folder)
        raise
    try:
        faults.reached("published")
        (out / journal.path.name).unlink(missing_ok=True)
    except KeyboardInterrupt as exc:
        again = (": the same command run again finds it finished" if rerun_finds_it
                 else ": nothing is left to do")
        raise InterruptedRun.after(exc, f"{out} was published, complete, just before{again}") from exc
