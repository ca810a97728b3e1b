"""PyTorch ``.bin``/``.pth`` files as a source: ``torch.load(mmap=True, weights_only=True)``.

Full pickle is never used. :func:`load_torch_file` is shared with Meta's layout, whose shards
are torch files too.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import FormatError, UnsupportedError
from ..formats.files import describe_download, open_for_reading, text_ok
from ..memory import drop_mapped_range
from ..tensor_spec import TensorSpec
from .checkpoint import Checkpoint, register, view_rows
from .folders import Layout, aux_files, read_weight_map

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
    # A saved nn.Parameter (PandaGPT's named_parameters()) would make every copy of it track grad.
    return {name: value.detach() for name, value in obj.items()}


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


register("bin", BinCheckpoint)
