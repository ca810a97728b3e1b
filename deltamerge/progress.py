"""One progress bar in bytes for a whole job, or a caller's callback, or nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


class _Silent:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback:
    """Library callers get ``callback(done_bytes, total_bytes)`` instead of a bar."""

    def __init__(self, fn: Callable[[int, int], None], total: int):
        self.fn, self.total, self.done = fn, total, 0

    def update(self, n: int) -> None:
        self.done += n
        self.fn(self.done, self.total)

    def close(self) -> None:
        pass


def make_progress(
    progress: bool | Callable[[int, int], None], total: int, desc: str
) -> Progress:
    if callable(progress):
        return _Callback(progress, total)
    if not progress:
        return _Silent()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True, leave=True, disable=None)
