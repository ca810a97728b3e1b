"""The compute stage's threads: ``--threads`` of them, each running torch (and its BLAS) on one.

The heavy compute of a run (quantizing GGUF rows, LoRA products) is cut into pieces fixed by the
data: a piece of rows to quantize, a window of a product. Each piece is computed whole by one
thread with single-threaded torch ops, so its bits are the same whichever thread computes it
and however many there are: ``--threads`` changes the speed, never the bytes. torch's own
intra-op threads are not used for this, as they would split a reduction (torch's float ``sum``,
a GEMM's inner products) at places that depend on their number, and would compete with the
pool's threads for the same cores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

import torch

from .cores import machine_cores

__all__ = ["ComputePool", "machine_cores", "one_torch_thread"]

T = TypeVar("T")
R = TypeVar("R")



@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread meanwhile, back to its count after.

    In the pool's threads torch already runs on one (a no-op); the calling thread may have more
    when nothing else runs beside it (``--workers 1``).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ComputePool:
    """``threads`` threads that run a function over pieces; with one, the caller runs them.

    Each thread sets torch to one thread when it starts. :meth:`map` waits for every piece, even
    after one fails, so no piece still writes into a buffer the caller reuses.
    """

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], pieces: Sequence[T]) -> list[R]:
        """``[fn(p) for p in pieces]``, the pieces on the pool's threads; results in order."""
        if self.threads == 1 or len(pieces) <= 1:
            with one_torch_thread():
                return [fn(p) for p in pieces]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.threads, "deltamerge-compute", initializer=torch.set_num_threads, initargs=(1,))
        futures = [self._executor.submit(fn, p) for p in pieces]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        """End the threads (they start again if the pool is used after)."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
