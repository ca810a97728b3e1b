"""``deltamerge.json``: the checksum manifest that travels with a delta (see docs/manifest.md).

It records what the delta was made against and what applying it gives, as layout-independent
tensor digests, plus the sha256 of every file of the delta. Everything read from it is
validated, because manifests arrive from the Hub like any other input.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError
from ..formats.files import leaves_folder, read_json_object, text_ok, valid_name
from .digest import TensorDigest, model_digest

MANIFEST_NAME = "deltamerge.json"
FORMAT = "deltamerge-manifest"
FORMAT_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Role:
    """One side of the manifest: the base a delta needs, or the result it gives."""

    tensors: dict[str, TensorDigest]
    model_digest: str

    @classmethod
    def of(cls, tensors: dict[str, TensorDigest]) -> Role:
        return cls(dict(sorted(tensors.items())), model_digest(tensors))

    def to_json(self) -> dict:
        return {
            "model_digest": self.model_digest,
            "tensors": {n: d.to_json() for n, d in self.tensors.items()},
        }


@dataclass
class Manifest:
    kind: str
    deltamerge_version: str
    files: dict[str, dict]  # name -> {"sha256", "size"}
    base: Role
    result: Role
    options: dict = field(default_factory=dict)
    # Where the base came from, for the delta's card: {"repo_id", "revision" (the commit)} for a
    # Hub repo, {"folder": its name} for a local folder. Optional: older manifests lack it.
    base_source: dict | None = None

    def to_json(self) -> dict:
        source = {"base_source": self.base_source} if self.base_source is not None else {}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "deltamerge_version": self.deltamerge_version,
            "options": self.options,
            "files": dict(sorted(self.files.items())),
            "base": self.base.to_json(),
            "result": self.result.to_json(),
            **source,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: invalid manifest: {what}")


def _digest(path: Path, name: object, obj: object) -> TensorDigest:
    if not isinstance(name, str) or not text_ok(name) or not isinstance(obj, dict):
        raise _fail(path, f"tensor entry {name!r} is not an object")
    dtype, shape, sha = obj.get("dtype"), obj.get("shape"), obj.get("sha256")
    if not isinstance(dtype, str) or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise _fail(path, f"tensor {name!r} needs a dtype and a 64-hex sha256")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    return TensorDigest(dtype, tuple(shape), sha)


def _role(path: Path, obj: object, which: str) -> Role:
    if not isinstance(obj, dict) or not isinstance(obj.get("tensors"), dict):
        raise _fail(path, f"{which!r} must be an object with 'tensors'")
    tensors = {n: _digest(path, n, d) for n, d in obj["tensors"].items()}
    digest = obj.get("model_digest")
    if not isinstance(digest, str) or digest != model_digest(tensors):
        raise _fail(path, f"{which!r} model_digest does not match its tensors")
    return Role(tensors, digest)


def parse_manifest(path: Path, obj: object) -> Manifest:
    if not isinstance(obj, dict):
        raise _fail(path, "not a JSON object")
    if obj.get("format") != FORMAT or obj.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"unknown format {obj.get('format')!r} version {obj.get('format_version')!r}")
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise _fail(path, "'kind' must be a string")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise _fail(path, "'files' must be an object")
    for name, info in files.items():
        if not valid_name(name) or leaves_folder(name) or "\\" in name:
            raise _fail(path, f"file name {name!r} must be a relative path inside the delta")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("sha256"), str)
            or not _HEX64.fullmatch(info["sha256"])
            or not isinstance(info.get("size"), int)
            or isinstance(info["size"], bool)
            or info["size"] < 0
        ):
            raise _fail(path, f"file entry {name!r} needs a 64-hex sha256 and an integer size")
    options = obj.get("options", {})
    if not isinstance(options, dict):
        raise _fail(path, "'options' must be an object")
    version = obj.get("deltamerge_version", "")
    return Manifest(
        kind, str(version), files, _role(path, obj.get("base"), "base"),
        _role(path, obj.get("result"), "result"), options, _base_source(path, obj),
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


def read_manifest(path: Path) -> Manifest:
    return parse_manifest(path, read_json_object(path))


def find_manifest(folder: Path) -> Manifest | None:
    path = folder / MANIFEST_NAME
    return read_manifest(path) if path.is_file() else None
