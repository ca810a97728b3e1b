"""safetensors files as a source: read with ``pread`` into the caller's buffers, never mapped."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.files import open_for_reading
from ..formats.safetensors import Header, StoredTensor, read_header
from ..memory import address_view, drop_file_range, will_need
from .checkpoint import Checkpoint, register, view_rows
from .folders import Layout, read_weight_map


class SafetensorsCheckpoint(Checkpoint):
    """Reads with ``pread`` into the caller's buffer: no mapping, so nothing stays resident."""

    format = "safetensors"

    def __init__(self, layout: Layout):
        super().__init__(layout)
        self._fds: dict[Path, int] = {}
        self._where: dict[str, tuple[Path, StoredTensor]] = {}
        self.headers: dict[Path, Header] = {}
        self.aux_files()
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

    def header_length(self, path: Path) -> int | None:
        header = self.headers.get(path)
        return header.data_start if header is not None else None

    def read_rows(self, name: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        fd, offset, length = self._range(name, start, stop)
        target = address_view(buffer.data_ptr(), length, buffer)
        done = 0
        while done < length:
            got = os.preadv(fd, [target[done:]], offset + done)
            if got == 0:
                raise FormatError(f"{self.file_of(name)}: truncated while reading tensor {name!r}")
            done += got
        if self.drop_behind:
            drop_file_range(fd, offset, length)
        return view_rows(buffer, self.specs[name], stop - start)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


register("safetensors", SafetensorsCheckpoint)
