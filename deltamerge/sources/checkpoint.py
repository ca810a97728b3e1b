"""Reading tensors a block of rows at a time, whatever the checkpoint's format.

A :class:`Checkpoint` lists its tensors (name, dtype, shape) without reading their data, and
copies rows ``[start, stop)`` of one tensor into a buffer the caller owns and reuses. That is the
whole interface the engine needs, so every source (safetensors, ``.bin``, Meta's layout) is one
class here, and none of them ever holds a tensor whole.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .dtypes import TORCH_TO_SAFETENSORS, itemsize
from .errors import FormatError, MismatchError, UnsupportedError
from .folders import Layout, aux_files, detect_layout, read_weight_map
from .memory import address_view, drop_file_range, drop_mapped_range, will_need
from .safetensors_format import (
    Header,
    StoredTensor,
    TensorSpec,
    describe_download,
    open_for_reading,
    read_header,
    text_ok,
)


class Checkpoint(ABC):
    """A source of tensors. Subclasses fill ``specs`` (in stored order) and implement reads."""

    format: str = "?"

    def __init__(self, layout: Layout):
        self.layout = layout
        self.path = layout.folder
        self.specs: dict[str, TensorSpec] = {}

    @property
    def files(self) -> tuple[Path, ...]:
        return self.layout.files

    def aux_files(self) -> dict[str, Path]:
        return aux_files(self.path)

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


class SafetensorsCheckpoint(Checkpoint):
    """Reads with ``pread`` into the caller's buffer: no mapping, so nothing stays resident."""

    format = "safetensors"

    def __init__(self, layout: Layout):
        super().__init__(layout)
        self._fds: dict[Path, int] = {}
        self._where: dict[str, tuple[Path, StoredTensor]] = {}
        self.headers: dict[Path, Header] = {}
        aux_files(layout.folder)
        try:
            for path in layout.files:
                fd = open_for_reading(path)
                self._fds[path] = fd
                header = read_header(path, fd)
                self.headers[path] = header
                for name, stored in sorted(header.tensors.items(), key=lambda kv: kv[1].offset):
                    if name in self._where:
                        raise FormatError(
                            f"{path}: tensor {name!r} is also in {self._where[name][0].name}"
                        )
                    self._where[name] = (path, stored)
            self._check_index()
        except BaseException:
            self.close()
            raise
        self.specs = {name: stored.spec for name, (_, stored) in self._where.items()}

    def _check_index(self) -> None:
        if self.layout.index is None:
            return
        for name, shard in read_weight_map(self.layout.index).items():
            found = self._where.get(name)
            if found is None:
                raise FormatError(f"{self.layout.index}: tensor {name!r} is not in {shard}")
            if found[0].name != Path(shard).name:
                raise FormatError(
                    f"{self.layout.index}: tensor {name!r} is listed in {shard} but stored in "
                    f"{found[0].name}"
                )

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def _range(self, name: str, start: int, stop: int) -> tuple[int, int, int]:
        path, stored = self._where[name]
        row_bytes = stored.spec.nbytes // stored.spec.rows if stored.spec.rows else 0
        return self._fds[path], stored.offset + start * row_bytes, (stop - start) * row_bytes

    def prefetch(self, name: str, start: int, stop: int) -> None:
        will_need(*self._range(name, start, stop))

    def locate(self, name: str, start: int, stop: int) -> tuple[Path, int] | None:
        return self._where[name][0], self._range(name, start, stop)[1]

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        fd, offset, length = self._range(name, start, stop)
        target = address_view(buffer.data_ptr(), length, buffer)
        done = 0
        while done < length:
            got = os.preadv(fd, [target[done:]], offset + done)
            if got == 0:
                raise FormatError(f"{self.file_of(name)}: truncated while reading tensor {name!r}")
            done += got
        drop_file_range(fd, offset, length)
        return view_rows(buffer, self.specs[name], stop - start)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


# A legacy (pre-zip) torch file starts with this pickled magic number; any other pickle is not one.
LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
_PICKLE_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_torch_file(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """``torch.load`` a ``.bin``/``.pth`` safely: weights only, mapped where the file allows.

    Returns the state dict and whether it is memory-mapped. Full pickle is never used: a file
    whose pickle would run code is refused by ``weights_only`` and named here. The usual ways a
    download goes wrong are told apart before torch sees the file, so each gets its own message.
    """
    head = _read_head(path)
    known = describe_download(path, head)
    if known:
        raise FormatError(known)
    if not head:
        raise FormatError(f"{path}: empty file (an interrupted download?)")
    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip and not _has_central_directory(path):
        raise FormatError(
            f"{path}: truncated: a zip archive without a readable central directory (an "
            "interrupted download?)"
        )
    if not is_zip and not head.startswith(LEGACY_TORCH_MAGIC):
        raise FormatError(
            f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a torch pickle)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise FormatError(
            f"{path}: refused by weights-only loading ({_pickle_reason(exc)}): the pickle holds "
            "more than tensors, or is corrupt; nothing in it was run"
        ) from None
    except Exception as exc:  # torch raises many types on corrupt archives
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"{path}: not a readable torch archive (truncated or corrupt?): {msg}"
        ) from None
    return _check_state(path, obj), is_zip


def _has_central_directory(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _read_head(path: Path) -> bytes:
    fd = open_for_reading(path)
    try:
        return os.pread(fd, 64, 0)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _pickle_reason(exc: Exception) -> str:
    """The line of torch's weights-only message that says what was refused."""
    for line in str(exc).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(_PICKLE_BOILERPLATE):
            return line[:200]
    return "unsupported content"


def _check_state(path: Path, obj: object) -> dict[str, torch.Tensor]:
    """A flat mapping of names to dense tensors of a dtype deltamerge can write, or an error."""
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    for name, value in obj.items():
        if not isinstance(name, str) or not text_ok(name) or not isinstance(value, torch.Tensor):
            raise FormatError(f"{path}: entry {name!r} is not a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise UnsupportedError(
                f"{path}: tensor {name!r} is sparse or quantized: deltamerge reads dense tensors"
            )
        if value.dtype not in TORCH_TO_SAFETENSORS:
            raise UnsupportedError(f"{path}: tensor {name!r} has dtype {value.dtype}: not supported")
    return obj


class BinCheckpoint(Checkpoint):
    """PyTorch ``.bin`` shards, mapped with ``torch.load(mmap=True, weights_only=True)``.

    Only one shard is mapped at a time, and the pages of rows already copied out are released
    from the mapping, so resident memory stays at a block, not a shard.
    """

    format = "bin"

    def __init__(self, layout: Layout):
        super().__init__(layout)
        self._file: dict[str, Path] = {}
        self._open: tuple[Path, dict[str, torch.Tensor], bool] | None = None
        aux_files(layout.folder)
        for path in layout.files:
            state, _ = load_torch_file(path)
            for name, tensor in state.items():
                if name in self._file:
                    raise FormatError(f"{path}: tensor {name!r} is also in {self._file[name].name}")
                self._file[name] = path
                self.specs[name] = TensorSpec(name, tensor.dtype, tuple(tensor.shape))
            del state
        if layout.index is not None:
            for name, shard in read_weight_map(layout.index).items():
                if self._file.get(name, Path()).name != Path(shard).name:
                    raise FormatError(f"{layout.index}: tensor {name!r} is not in {shard}")

    def file_of(self, name: str) -> Path:
        return self._file[name]

    def _tensor(self, name: str) -> tuple[torch.Tensor, bool]:
        path = self._file[name]
        if self._open is None or self._open[0] != path:
            self._open = None
            state, mapped = load_torch_file(path)
            self._open = (path, state, mapped)
        return self._open[1][name], self._open[2]

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        tensor, mapped = self._tensor(name)
        spec = self.specs[name]
        out = view_rows(buffer, spec, stop - start)
        source = tensor[start:stop] if tensor.dim() else tensor
        out.copy_(source)
        if mapped and source.is_contiguous():
            drop_mapped_range(source.data_ptr(), source.nbytes)
        return out

    def close(self) -> None:
        self._open = None


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Open a folder (or weight file) with the reader its layout calls for."""
    layout = detect_layout(Path(path))
    if layout.format == "safetensors":
        return SafetensorsCheckpoint(layout)
    if layout.format == "bin":
        return BinCheckpoint(layout)
    if layout.format == "meta":
        from .meta import MetaCheckpoint

        return MetaCheckpoint(layout)
    raise MismatchError(f"{layout.folder}: {layout.format} checkpoints are not supported")
