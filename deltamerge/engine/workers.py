"""The one way a run puts work on threads, and the one way it stops them.

Every run that works on several threads (the engine's pipeline stages, the re-check of a
resumed run's shards, the whole-file decoders' files) starts them here and stops them alike: one
``stop`` event, set by the first failure or by a signal in the main thread; each thread looks at
it between chunks (:meth:`Workers.check`, which raises :class:`Stopped`) and ends within one; the
main thread waits for them with events, not ``Thread.join`` (see :func:`wait_out`), then raises
the failure (never a :class:`Stopped`, which only ends the other threads' work).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Stopped(Exception):
    """Ends a thread's work when its run is stopping; never reaches the caller."""


def run_threads(bodies: Sequence[tuple[str, Callable[[], None]]], stop: threading.Event) -> None:
    """Run each ``(name, body)`` on a daemon thread of its own and wait until all have ended.

    A signal in the main thread sets ``stop`` (each body looks at it and returns) and is raised
    once every thread that began has ended, even through a second Ctrl-C; a body reports its own
    errors (this returns normally once they end).
    """
    began = [threading.Event() for _ in bodies]
    ended = [threading.Event() for _ in bodies]

    def run(k: int) -> None:
        began[k].set()
        try:
            bodies[k][1]()
        finally:
            ended[k].set()

    try:
        for k, (name, _) in enumerate(bodies):
            threading.Thread(target=run, args=(k,), name=f"deltamerge-{name}", daemon=True).start()
        for done in ended:
            done.wait()
    except BaseException:
        stop.set()
        wait_out([done for started, done in zip(began, ended) if started.is_set()])
        raise


def wait_out(ended: list[threading.Event]) -> None:
    """Wait until each of the run's threads has ended, even through a second Ctrl-C.

    Not ``Thread.join``: up to Python 3.12, a KeyboardInterrupt raised inside ``join`` marks the
    thread stopped while it still runs (the bpo-45274 handler releases the lock the live thread
    holds), so the next ``join`` returns at once. The process then exits with a daemon thread
    inside torch, which the interpreter ends where it stands at exit, unwinding C++ frames that
    may not unwind: "terminate called without an active exception", SIGABRT. A thread that has
    not begun is not waited for: with ``stop`` set it returns before any work.
    """
    for done in ended:
        while not done.is_set():
            try:
                done.wait()
            except KeyboardInterrupt:
                continue  # the first stop is being handled; the threads end within a chunk


class Workers:
    """``count`` threads taking items in turn; the first failure or a signal stops them all."""

    def __init__(self, count: int, name: str):
        self.count = max(1, count)
        self.name = name
        self.stop = threading.Event()

    def check(self) -> None:
        """Called by a task between chunks of its work: ends it once the run is stopping."""
        if self.stop.is_set():
            raise Stopped

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` of each item, in the items' order; one thread runs them in turn in this one.

        On a failure the other tasks stop at their next :meth:`check` and the failure of the
        earliest item that failed is raised.
        """
        if self.count == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(items)):
            todo.put(i)
        results: dict[int, R] = {}
        errors: dict[int, BaseException] = {}

        def body() -> None:
            while not self.stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    results[i] = fn(items[i])
                except Stopped:
                    return
                except BaseException as exc:  # noqa: BLE001 - raised by the caller's thread
                    errors[i] = exc
                    self.stop.set()
                    return

        run_threads([(self.name, body)] * min(self.count, len(items)), self.stop)
        if errors:
            raise errors[min(errors)]
        return [results[i] for i in range(len(items))]
