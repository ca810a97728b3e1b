"""PyTorch ``.bin``/``.pth`` files as a source: ``torch.load(mmap=True, weights_only=True)``.

Full pickle is never used. :func:`load_torch_file` is shared with Meta's layout, whose shards
are torch files too.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import FormatError, UnsupportedError
from ..formats.files import describe_download, open_for_reading, text_ok
from ..formats.safetensors import check_shape
from ..memory import drop_mapped_range
from ..tensor_spec import TensorSpec
from .checkpoint import Checkpoint, register, view_rows
from .folders import Layout, read_weight_map

# Element sizes of the storage classes a torch pickle names (UntypedStorage counts bytes).
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}
# A checkpoint's pickle lists its tensors (about 150 bytes each); torch reads it whole.
MAX_PICKLE_BYTES = 100_000_000
# A legacy (pre-zip) torch file starts with this pickled magic number; any other pickle is not one.
LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
_PICKLE_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unreadable(path: Path, exc: Exception) -> FormatError:
    """What torch or zipfile said of a damaged archive, on one line."""
    msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return FormatError(f"{path}: not a readable torch archive (truncated or corrupt?): {msg}")


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
    pickle_name = _check_archive(path) if is_zip else None
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
        raise _unreadable(path, exc) from None
    state = _check_state(path, obj)
    if pickle_name is not None:
        _check_records(path, pickle_name)
    return state, is_zip


def _check_archive(path: Path) -> str:
    """Before torch reads it: every member stored as torch.save stores it, the pickle bounded.

    torch reads ``data.pkl`` whole into memory, so a few MB of deflated zeros would cost
    gigabytes (a zip bomb); and ``mmap`` reads storage records in place, which is only right
    for uncompressed ones. torch.save compresses nothing. Returns the pickle's member name.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except Exception as exc:  # zipfile raises many types on a damaged directory
        raise _unreadable(path, exc) from None
    for info in members:
        if info.compress_type != zipfile.ZIP_STORED:
            raise FormatError(
                f"{path}: member {info.filename} is compressed: torch.save stores its members "
                "as they are and torch reads storage records in place (re-save it with torch.save)"
            )
    pickles = [i for i in members if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(pickles) != 1:
        raise FormatError(f"{path}: not a torch archive: no single data.pkl")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise FormatError(
            f"{path}: its pickle is {pickles[0].file_size} bytes: too large for the tensor list "
            "of a checkpoint"
        )
    return pickles[0].filename


class _Placeholder:
    """What the storage scan builds in place of every object a torch pickle names."""

    def __new__(cls, *args: object, **kwargs: object) -> _Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass

    def add(self, value: object) -> None:
        pass


class _StorageScan(pickle.Unpickler):
    """The storages a torch pickle refers to (record key, storage class, element count).

    Nothing is imported and nothing called: every name the pickle gives becomes a placeholder
    class. It runs after ``torch.load(weights_only=True)`` accepted the same pickle.
    """

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: dict[str, tuple[str, int]] = {}

    def find_class(self, module: str, name: str) -> type:
        return type(f"{module}.{name}", (_Placeholder,), {})

    def persistent_load(self, pid: object) -> object:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, kind, key, _, numel = pid
            self.storages[str(key)] = (getattr(kind, "__name__", ""), numel)
        return _Placeholder()


def _check_records(path: Path, pickle_name: str) -> None:
    """Every storage the pickle declares must lie whole in its own record.

    ``torch.load(mmap=True)`` takes a storage's bytes from its record's offset for as many bytes
    as the pickle declares: from a short record it reads on into the next members, silently.
    Such tensors have no true bytes to read, so they are refused here, when the file is opened.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            records = {info.filename: info for info in archive.infolist()}
            scan = _StorageScan(archive.read(pickle_name))
            scan.load()
    except Exception as exc:  # the pickle torch just accepted: a failure here is a corrupt file
        raise _unreadable(path, exc) from None
    prefix = pickle_name.removesuffix("data.pkl")
    for key, (kind, numel) in scan.storages.items():
        info = records.get(f"{prefix}data/{key}")
        if info is None:
            raise FormatError(f"{path}: storage record data/{key} is missing")
        itemsize = _STORAGE_ITEMSIZE.get(kind.rsplit(".", 1)[-1], 1)
        needed = numel * itemsize if isinstance(numel, int) and numel >= 0 else None
        if needed is None or info.file_size < needed:
            raise FormatError(
                f"{path}: storage record data/{key} holds {info.file_size} bytes but the pickle "
                f"declares {needed}: the archive is truncated or corrupt"
            )


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
        check_shape(f"{path}: tensor {name!r}", tuple(value.shape), value.dtype, path.stat().st_size)
        if value.device.type != "cpu":
            # A "meta" tensor has a shape and no storage: torch saves one from a model that was
            # never materialized, and its bytes exist nowhere, so no run could ever read them.
            raise FormatError(
                f"{path}: tensor {name!r} has no data (device {value.device.type!r}): the file was "
                "saved from a model whose weights were never loaded; save it again from a loaded one"
            )
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
        self.aux_files()
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
