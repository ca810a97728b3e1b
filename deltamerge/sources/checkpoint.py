"""Reading tensors a block of rows at a time, whatever the checkpoint's format.

A :class:`Checkpoint` lists its tensors (name, dtype, shape) without reading their data, and
copies rows ``[start, stop)`` of one tensor into a buffer the caller owns and reuses. That is the
whole interface the engine needs, so every source format (safetensors, ``.bin``, Meta's layout)
is one class in its own module, and none of them ever holds a tensor whole. Each format module
calls :func:`register` for the layout format it reads, so :func:`open_checkpoint` names none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from ..dtypes import itemsize
from ..errors import MismatchError
from ..tensor_spec import TensorSpec
from .folders import Layout, aux_files, detect_layout


class Checkpoint(ABC):
    """A source of tensors. Subclasses fill ``specs`` (in stored order) and implement reads."""

    format: str = "?"
    # Whether a read tells the kernel its pages will not be read again (``memory.drop_file_range``),
    # for formats that read files; a caller that reads a tensor several times over clears it
    # until its last pass (LoRA extraction), so the passes before it read from the page cache.
    drop_behind: bool = True

    def __init__(self, layout: Layout):
        self.layout = layout
        self.path = layout.folder
        self.specs: dict[str, TensorSpec] = {}
        self._aux: dict[str, Path] | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        return self.layout.files

    def aux_files(self) -> dict[str, Path]:
        """The folder's side files, checked once: a tokenizer.json of Llama 3's 17 MB took half a
        second to check each time it was asked for (when opened, and when the plan gathers them)."""
        if self._aux is None:
            self._aux = aux_files(self.path)
        return dict(self._aux)

    @abstractmethod
    def file_of(self, name: str) -> Path:
        """The file holding ``name``, for messages."""

    @abstractmethod
    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``name`` in its stored dtype, copied into ``buffer``.

        ``buffer`` is a 1-d uint8 tensor at least as large as the rows; the result is a view of it.
        """

    def prefetch(self, name: str, start: int, stop: int) -> None:  # noqa: B027 - optional hook
        """Hint that these rows are read next; sources that can, start the I/O early."""

    def locate(self, name: str, start: int, stop: int) -> tuple[Path, int] | None:
        """The file and byte offset of these rows, where they are stored as they are read.

        Lets the engine hash whole files from the reads it makes anyway; None where the bytes
        read are not the file's bytes (mapped pickles, Meta shards joined and permuted).
        """
        return None

    def header_length(self, path: Path) -> int | None:
        """How many bytes of weight file ``path`` come before its tensor data, for a format whose
        files hold a header and tensors tiling the rest exactly (safetensors); None otherwise.

        With the header's digest and the tensors' digests that proves the whole file.
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def view_rows(buffer: torch.Tensor, spec: TensorSpec, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of ``spec`` laid over a uint8 buffer."""
    nbytes = rows * spec.row_numel * itemsize(spec.dtype)
    shape = (rows, *spec.shape[1:]) if spec.shape else ()
    return buffer[:nbytes].view(spec.dtype).view(shape)


Opener = Callable[[Layout], Checkpoint]
_OPENERS: dict[str, Opener] = {}


def register(layout_format: str, opener: Opener) -> None:
    """Read folders whose :func:`~deltamerge.sources.folders.detect_layout` format is this."""
    _OPENERS[layout_format] = opener


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open a folder (or weight file) with the reader its layout calls for."""
    layout = detect_layout(Path(path))
    opener = _OPENERS.get(layout.format)
    if opener is None:
        raise MismatchError(f"{layout.folder}: {layout.format} checkpoints are not supported")
    return opener(layout)
