"""``deltamerge.json``: the checksum manifest that travels with a delta (see docs/manifest.md).

It records what the delta was made against and what applying it gives, as layout-independent
tensor digests, plus the digest of every file of the delta. Format 2 (written) uses BLAKE3 and
also records the delta's own tensors and each safetensors file's header, so apply checks the
delta from the rows it reads anyway; format 1 (sha256, whole files only) is still read.
Everything read from it is validated, because manifests arrive from the Hub like any other input.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import SAFETENSORS_TO_TORCH, TORCH_TO_SAFETENSORS, short_name
from ..errors import FormatError, MismatchError, VerificationError
from ..formats.files import leaves_folder, read_json_object, text_ok, valid_name
from ..tensor_spec import TensorSpec
from .digest import BLAKE3, DEFAULT_ALGORITHM, SHA256, TensorDigest, model_digest

MANIFEST_NAME = "deltamerge.json"
FORMAT = "deltamerge-manifest"
FORMAT_VERSION = 2  # what make-delta writes
VERSION_ALGORITHM = {1: SHA256, 2: BLAKE3}  # the format version decides every digest's algorithm
ALGORITHM_VERSION = {a: v for v, a in VERSION_ALGORITHM.items()}
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Role:
    """A set of tensors by digest: the base a delta needs, the result it gives, the delta itself."""

    tensors: dict[str, TensorDigest]
    model_digest: str
    algorithm: str = DEFAULT_ALGORITHM

    @classmethod
    def of(cls, tensors: dict[str, TensorDigest], algorithm: str = DEFAULT_ALGORITHM) -> Role:
        return cls(dict(sorted(tensors.items())), model_digest(tensors, algorithm), algorithm)

    def to_json(self) -> dict:
        return {
            "model_digest": self.model_digest,
            "tensors": {n: d.to_json() for n, d in self.tensors.items()},
        }


@dataclass(frozen=True)
class FileEntry:
    """One file of the delta: its digest and size, and for a safetensors file (format 2) the
    length and digest of its header (everything before the tensor data)."""

    hexdigest: str
    size: int
    header: tuple[int, str] | None = None

    def to_json(self, algorithm: str) -> dict:
        obj: dict = {algorithm: self.hexdigest, "size": self.size}
        if self.header is not None and algorithm == BLAKE3:
            obj["header"] = {"size": self.header[0], algorithm: self.header[1]}
        return obj


@dataclass
class Manifest:
    kind: str
    deltamerge_version: str
    files: dict[str, FileEntry]
    base: Role
    result: Role
    options: dict = field(default_factory=dict)
    delta: Role | None = None  # the delta's own tensors (format 2)
    algorithm: str = DEFAULT_ALGORITHM
    # Where the base came from, for the delta's card: {"repo_id", "revision" (the commit)} for a
    # Hub repo, {"folder": its name} for a local folder. Optional: older manifests lack it.
    base_source: dict | None = None
    # The id make-delta also writes into each weight file's header (kinds/marks.py), so weights
    # and a manifest of different runs are told apart. Optional: older manifests lack it.
    delta_id: str | None = None

    @property
    def format_version(self) -> int:
        return ALGORITHM_VERSION[self.algorithm]

    def to_json(self) -> dict:
        optional = {"base_source": self.base_source, "delta_id": self.delta_id}
        obj = {
            "format": FORMAT,
            "format_version": self.format_version,
            "kind": self.kind,
            "deltamerge_version": self.deltamerge_version,
            "options": self.options,
            "files": {n: e.to_json(self.algorithm) for n, e in sorted(self.files.items())},
            "base": self.base.to_json(),
            "result": self.result.to_json(),
            **{k: v for k, v in optional.items() if v is not None},
        }
        if self.delta is not None and self.format_version >= 2:
            obj["delta"] = self.delta.to_json()
        return obj

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def known_version(version: object) -> bool:
    """A format_version this reader knows (an integer: not ``true``, not ``"1"``)."""
    return isinstance(version, int) and not isinstance(version, bool) and version in VERSION_ALGORITHM


def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: invalid manifest: {what}")


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _hex(obj: dict, algorithm: str) -> str | None:
    value = obj.get(algorithm)
    return value if isinstance(value, str) and _HEX64.fullmatch(value) else None


def _digest(path: Path, name: object, obj: object, algorithm: str) -> TensorDigest:
    if not isinstance(name, str) or not text_ok(name) or not isinstance(obj, dict):
        raise _fail(path, f"tensor entry {name!r} is not an object")
    dtype, shape, digest = obj.get("dtype"), obj.get("shape"), _hex(obj, algorithm)
    if not isinstance(dtype, str) or digest is None:
        raise _fail(path, f"tensor {name!r} needs a dtype and a 64-hex {algorithm}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    return TensorDigest(dtype, tuple(shape), digest, algorithm)


def parse_role(path: Path, obj: object, which: str, algorithm: str) -> Role:
    """A role object whose digests are all in ``algorithm``, its model digest recomputed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict):
        raise _fail(path, f"{which!r} must be an object with 'tensors'")
    tensors = {n: _digest(path, n, d, algorithm) for n, d in obj["tensors"].items()}
    digest = obj.get("model_digest")
    if not isinstance(digest, str) or digest != model_digest(tensors, algorithm):
        raise _fail(path, f"{which!r} model_digest does not match its tensors")
    return Role(tensors, digest, algorithm)


def _file_entry(path: Path, name: object, info: object, algorithm: str) -> FileEntry:
    if not isinstance(name, str) or not valid_name(name) or leaves_folder(name) or "\\" in name:
        raise _fail(path, f"file name {name!r} must be a relative path inside the delta")
    digest = _hex(info, algorithm) if isinstance(info, dict) else None
    if digest is None or not _is_count(info.get("size")):
        raise _fail(path, f"file entry {name!r} needs a 64-hex {algorithm} and an integer size")
    header = info.get("header") if algorithm == BLAKE3 else None
    if header is None:
        return FileEntry(digest, info["size"])
    head = _hex(header, algorithm) if isinstance(header, dict) else None
    if head is None or not _is_count(header.get("size")) or not 8 <= header["size"] <= info["size"]:
        raise _fail(path, f"file entry {name!r}: 'header' needs a size within the file and a "
                          f"64-hex {algorithm}")
    return FileEntry(digest, info["size"], (header["size"], head))


def parse_manifest(path: Path, obj: object) -> Manifest:
    if not isinstance(obj, dict):
        raise _fail(path, "not a JSON object")
    version = obj.get("format_version")
    if obj.get("format") != FORMAT or not known_version(version):
        raise _fail(path, f"unknown format {obj.get('format')!r} version {version!r}")
    algorithm = VERSION_ALGORITHM[version]
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise _fail(path, "'kind' must be a string")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise _fail(path, "'files' must be an object")
    entries = {name: _file_entry(path, name, info, algorithm) for name, info in files.items()}
    options = obj.get("options", {})
    if not isinstance(options, dict):
        raise _fail(path, "'options' must be an object")
    delta = None
    if algorithm == BLAKE3 and obj.get("delta") is not None:
        delta = parse_role(path, obj["delta"], "delta", algorithm)
    return Manifest(
        kind, str(obj.get("deltamerge_version", "")), entries,
        parse_role(path, obj.get("base"), "base", algorithm),
        parse_role(path, obj.get("result"), "result", algorithm), options, delta, algorithm,
        _base_source(path, obj), _delta_id(path, obj),
    )


def delta_mismatch(
    where: Path | str, name: str, digest: TensorDigest, expected: TensorDigest
) -> VerificationError:
    """A delta tensor that is not the publisher's: the delta file is corrupt or was changed."""
    return VerificationError(
        f"{where}: tensor {name!r}: {digest.describe()} does not match {MANIFEST_NAME} "
        f"({expected.describe()}): the file is corrupt or was changed"
    )


def _base_source(path: Path, obj: dict) -> dict | None:
    """The optional ``base_source``: an object of short strings, or absent."""
    source = obj.get("base_source")
    if source is None:
        return None
    if not isinstance(source, dict) or not source or not all(
        k in ("repo_id", "revision", "folder") and isinstance(v, str) and text_ok(v)
        and len(v) <= 256 for k, v in source.items()
    ):
        raise _fail(path, "'base_source' must map repo_id and revision, or folder, to names")
    return source


def _delta_id(path: Path, obj: dict) -> str | None:
    """The optional ``delta_id``: 64 lowercase hex digits, or absent."""
    ident = obj.get("delta_id")
    if ident is not None and not (isinstance(ident, str) and _HEX64.fullmatch(ident)):
        raise _fail(path, "'delta_id' must be 64 lowercase hex digits")
    return ident


def read_manifest(path: Path) -> Manifest:
    return parse_manifest(path, read_json_object(path))


def find_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_NAME
    return read_manifest(path) if path.is_file() else None


def check_base_dtypes(base: str, specs: Mapping[str, TensorSpec], expected: Role) -> None:
    """A base in another dtype than the publisher's is named as such, before any work.

    Its digests cannot match (they are of the bytes in the stored dtype), so the run would fail
    at its first tensor with "does not match"; a bf16 copy of an fp16 base is a common mistake
    with a plain fix.
    """
    differ = [
        name for name, spec in specs.items()
        if name in expected.tensors and tuple(spec.shape) == expected.tensors[name].shape
        and TORCH_TO_SAFETENSORS.get(spec.dtype) != expected.tensors[name].dtype
    ]
    if not differ:
        return
    have = Counter(short_name(specs[n].dtype) for n in differ).most_common(1)[0][0]
    want = Counter(_dtype_name(expected.tensors[n].dtype) for n in differ).most_common(1)[0][0]
    raise MismatchError(
        f"{base}: BASE is {have}, the delta was made against a {want} base ({len(differ)} of "
        f"{len(expected.tensors)} tensors differ in dtype, first {differ[0]!r}): convert it to "
        f"{want} or use the original"
    )


def _dtype_name(safetensors_name: str) -> str:
    dtype = SAFETENSORS_TO_TORCH.get(safetensors_name)
    return short_name(dtype) if dtype is not None else safetensors_name
