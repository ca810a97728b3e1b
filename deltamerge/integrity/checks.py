"""Checking checkpoints by content: checksum, verify, inspect and diff.

These answer the questions a user has before and after a rebuild ("is my base the publisher's?",
"is this result what they published?", "what is in this folder?", "how far apart are these two
models?") with the same layout-independent digests apply and make-delta record (docs/manifest.md).
Every function streams tensors a block of rows at a time through :func:`open_checkpoint`, so any
supported format works and memory stays at a few blocks whatever the model's size. They return
result objects and never print: the CLI (cli/integrity.py) does that.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import arguments as args
from ..dtypes import BITS_DTYPE, TORCH_TO_SAFETENSORS, itemsize
from ..errors import FormatError, InputError, NotFoundError
from ..formats.files import read_json_object
from ..names import ROLES
from ..progress import Progress, ProgressArg, make_progress, reports_progress
from ..results import RESULT_RECORD
from ..sizes import DEFAULT_BLOCK_BYTES
from ..sources import Checkpoint, open_checkpoint
from ..sources.resolve import local_folder
from ..version import __version__
from .digest import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    SHA256,
    TensorDigest,
    block_buffer,
    hash_tensor,
    model_digest,
    row_blocks,
)
from .manifest import (
    ALGORITHM_VERSION,
    MANIFEST_NAME,
    VERSION_ALGORITHM,
    Role,
    known_version,
    parse_manifest,
    parse_role,
)
from .manifest import FORMAT as MANIFEST_FORMAT

CHECKSUMS_FORMAT = "deltamerge-checksums"  # its format_version says the algorithm, as a manifest's


# -- streaming ------------------------------------------------------------------------------
def _hash_all(
    ckpt: Checkpoint, block_bytes: int, bar: Progress, algorithm: str
) -> dict[str, TensorDigest]:
    """The digest of every tensor, in stored order (sequential reads), a block at a time."""
    specs = list(ckpt.specs.values())
    buf = block_buffer(specs, block_bytes, 1)
    digests = {}
    for spec in specs:
        bar.at(f"{ckpt.file_of(spec.name).name}: {spec.name}")
        digests[spec.name] = hash_tensor(ckpt, spec, block_bytes, buf, bar.update, algorithm)
    return digests


def _total_bytes(ckpt: Checkpoint) -> int:
    return sum(s.nbytes for s in ckpt.specs.values())


# -- checksum -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checksum:
    """A model's digest and its tensors' digests; unpacks as ``(model_digest, tensors)``."""

    model_digest: str
    tensors: dict[str, TensorDigest]
    algorithm: str = DEFAULT_ALGORITHM

    def __iter__(self) -> Iterator:
        return iter((self.model_digest, self.tensors))

    def to_json(self) -> dict:
        """The ``checksum --output`` file: a role object with a format marker (docs/manifest.md)."""
        return {
            "format": CHECKSUMS_FORMAT,
            "format_version": ALGORITHM_VERSION[self.algorithm],
            "deltamerge_version": __version__,
            **Role.of(self.tensors, self.algorithm).to_json(),
        }

    def write(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")


@reports_progress
def checksum(
    path: Path | str,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressArg = False,
    hub: dict | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
) -> Checksum:
    """Digest every tensor of a checkpoint; the same tensors give the same digests in any layout.

    Args:
        path: a folder, a weight file, or a Hub repo id (``hub``: ``endpoint``, ``token`` or
            ``api``), as for every function here.
        block_bytes: bytes read at a time.
        progress: show a bar, or a ``callback(done_bytes, total_bytes)``.
        hub: how to reach the Hub when ``path`` is a repo id.
        algorithm: ``"blake3"`` (manifest format 2) or ``"sha256"`` (format 1).

    Returns:
        A :class:`Checksum`: the model digest and each tensor's digest.

    Raises:
        NotFoundError: ``path`` does not exist (also a FileNotFoundError).
        FormatError: a file is corrupt, truncated or not what its name says (also a ValueError).
        InputError: bad arguments.
    """
    path = args.path("path", path)
    block_bytes, progress, hub = _common_args(block_bytes, progress, hub)
    _check_algorithm(algorithm)
    with open_checkpoint(local_folder(path, **hub)) as ckpt:
        bar = make_progress(progress, _total_bytes(ckpt), "hashing")
        try:
            digests = _hash_all(ckpt, block_bytes, bar, algorithm)
        finally:
            bar.close()
    return Checksum(model_digest(digests, algorithm), dict(sorted(digests.items())), algorithm)


def _common_args(
    block_bytes: object, progress: object, hub: object
) -> tuple[int, ProgressArg, dict]:
    """The arguments every function here takes, checked (an InputError naming the argument)."""
    block = args.size("block_bytes", block_bytes) or DEFAULT_BLOCK_BYTES
    return block, args.progress(progress), args.hub(hub)


def _check_algorithm(algorithm: str | None) -> None:
    args.text("algorithm", algorithm)
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise InputError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")


# -- verify ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMismatch:
    """A tensor present on both sides whose dtype, shape or bytes differ."""

    name: str
    expected: TensorDigest
    actual: TensorDigest

    @property
    def reason(self) -> str:
        if self.expected.dtype != self.actual.dtype:
            return "dtype"
        if self.expected.shape != self.actual.shape:
            return "shape"
        return "content"


@dataclass
class VerifyReport:
    """How a checkpoint compares with one role of a manifest; ``ok`` when every tensor matches."""

    path: Path
    manifest: Path
    role: str
    model_digest: str
    expected_digest: str
    tensors: int  # tensors in the checkpoint
    matched: int
    missing: list[str] = field(default_factory=list)  # in the manifest, not in the checkpoint
    extra: list[str] = field(default_factory=list)  # in the checkpoint, not in the manifest
    differ: list[TensorMismatch] = field(default_factory=list)
    algorithm: str = DEFAULT_ALGORITHM  # the manifest's, in which DIR was hashed

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.differ)

    @property
    def failures(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.differ)

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "manifest": str(self.manifest),
            "role": self.role,
            "algorithm": self.algorithm,
            "ok": self.ok,
            "model_digest": self.model_digest,
            "expected_digest": self.expected_digest,
            "tensors": self.tensors,
            "matched": self.matched,
            "missing": self.missing,
            "extra": self.extra,
            "differ": [
                {"name": m.name, "reason": m.reason, "expected": m.expected.to_json(),
                 "actual": m.actual.to_json()}
                for m in self.differ
            ],
        }


def load_expected(manifest_path: Path | str, role: str = "result") -> Role:
    """The tensor digests to check against, from any of the three files that carry them.

    A ``deltamerge.json`` has both roles; a ``deltamerge-result.json`` (what apply writes into
    OUT) has only its ``result``; a ``checksum --output`` file describes one model, whatever the
    role. A folder stands for the ``deltamerge.json`` or ``deltamerge-result.json`` in it.

    A result written as GGUF or in Meta's layout records, beside the tensors as written, the
    ``merged`` Hugging Face tensors they were converted from: those are what deltamerge reads
    back from a Meta folder, so they are what a folder is verified against.
    """
    if role not in ROLES:
        raise InputError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    path = _manifest_file(Path(manifest_path).expanduser())
    obj = read_json_object(path)
    fmt = obj.get("format")
    if fmt == MANIFEST_FORMAT:
        manifest = parse_manifest(path, obj)
        return manifest.result if role == "result" else manifest.base
    if fmt == CHECKSUMS_FORMAT:
        version = obj.get("format_version")
        if not known_version(version):
            raise FormatError(f"{path}: unknown {CHECKSUMS_FORMAT} version {version!r}")
        return parse_role(path, obj, "checksums", VERSION_ALGORITHM[version])
    if fmt is None and "result" in obj:
        if role != "result":
            raise InputError(
                f"{path}: a result record has no base role; verify the base against the "
                f"delta's {MANIFEST_NAME}"
            )
        # Records written before manifest format 2 name no algorithm: theirs was sha256.
        algorithm = obj.get("algorithm", SHA256)
        if algorithm not in ALGORITHMS:
            raise FormatError(f"{path}: unknown digest algorithm {algorithm!r}")
        return parse_role(path, obj.get("merged", obj["result"]), "result", algorithm)
    raise FormatError(
        f"{path}: not a {MANIFEST_NAME}, {RESULT_RECORD} or `deltamerge checksum --output` file"
    )


def _manifest_file(path: Path) -> Path:
    if not path.is_dir():
        if not path.exists():
            raise NotFoundError(f"{path}: no such file (manifest)")
        return path
    for name in (MANIFEST_NAME, RESULT_RECORD):
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path}: holds neither {MANIFEST_NAME} nor {RESULT_RECORD}")


def compare_digests(
    actual: dict[str, TensorDigest], expected: dict[str, TensorDigest]
) -> tuple[list[str], list[str], list[TensorMismatch]]:
    """Names only expected (missing), only actual (extra), and on both sides but different."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    differ = [
        TensorMismatch(n, expected[n], actual[n])
        for n in sorted(set(actual) & set(expected))
        if actual[n] != expected[n]
    ]
    return missing, extra, differ


@reports_progress
def verify(
    path: Path | str,
    manifest_path: Path | str,
    role: str = "result",
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressArg = False,
    hub: dict | None = None,
    algorithm: str | None = None,
) -> VerifyReport:
    """Compare every tensor of ``path`` with one role of a manifest; lists every difference.

    A mismatch is a report, not an exception, so that every difference is listed at once.

    Args:
        path: the checkpoint to check: a folder, a weight file, or a Hub repo id.
        manifest_path: a delta's ``deltamerge.json`` (or the folder that holds it).
        role: ``"base"`` answers "is this the base the delta was made against?"; ``"result"``
            "is this what the publisher got?".
        block_bytes: bytes read at a time.
        progress: show a bar, or a ``callback(done_bytes, total_bytes)``.
        hub: how to reach the Hub when ``path`` is a repo id.
        algorithm: insist on one; by default the manifest's (sha256 for format 1, BLAKE3 for
            format 2), and a manifest in the other is bad input.

    Returns:
        A :class:`VerifyReport`; ``ok`` when every tensor matches.

    Raises:
        NotFoundError: ``path`` or the manifest does not exist (also a FileNotFoundError).
        FormatError: a file or the manifest is malformed (also a ValueError).
        InputError: bad arguments (an unknown role, an algorithm the manifest does not use).
    """
    path, manifest_path = args.path("path", path), args.path("manifest_path", manifest_path)
    args.text("role", role)
    block_bytes, progress, hub = _common_args(block_bytes, progress, hub)
    _check_algorithm(algorithm)
    text = str(manifest_path)
    if text.endswith(".json") and not Path(text).expanduser().exists():
        # a manifest's own name, mistyped: a file to read, never a Hub repo to look up
        raise NotFoundError(f"{text}: no such file (manifest)")
    manifest_file = local_folder(manifest_path, "manifest", weights=False, **hub)
    expected = load_expected(manifest_file, role)
    if algorithm is not None and algorithm != expected.algorithm:
        raise InputError(
            f"{manifest_path}: holds {expected.algorithm} digests, not {algorithm}: verify with "
            f"--algorithm {expected.algorithm}, or against a manifest in {algorithm}"
        )
    actual = checksum(path, block_bytes=block_bytes, progress=progress, hub=hub,
                      algorithm=expected.algorithm)
    missing, extra, differ = compare_digests(actual.tensors, expected.tensors)
    return VerifyReport(
        Path(path), Path(manifest_path), role, actual.model_digest, expected.model_digest,
        len(actual.tensors), len(actual.tensors) - len(extra) - len(differ), missing, extra,
        differ, expected.algorithm,
    )


# -- inspect --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # as safetensors spells it
    shape: tuple[int, ...]
    file: str  # relative to the checkpoint's folder

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "file": self.file}


@dataclass(frozen=True)
class ShardInfo:
    file: str
    size: int  # bytes on disk
    tensors: int


@dataclass(frozen=True)
class DtypeCount:
    tensors: int
    parameters: int


@dataclass
class InspectReport:
    """What a checkpoint holds, from its headers, and (unless skipped) its model digest."""

    path: Path
    format: str
    index: str | None
    shards: list[ShardInfo]
    dtypes: dict[str, DtypeCount]
    parameters: int
    bytes: int  # tensor data, without headers
    tensors: list[TensorInfo]
    model_digest: str | None
    algorithm: str = DEFAULT_ALGORITHM  # of model_digest

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
            "index": self.index,
            "shards": [{"file": s.file, "size": s.size, "tensors": s.tensors} for s in self.shards],
            "dtypes": {d: {"tensors": c.tensors, "parameters": c.parameters}
                       for d, c in self.dtypes.items()},
            "parameters": self.parameters,
            "bytes": self.bytes,
            "model_digest": self.model_digest,
            "algorithm": self.algorithm if self.model_digest else None,
            "tensors": [t.to_json() for t in self.tensors],
        }


def _relative(ckpt: Checkpoint, file: Path) -> str:
    try:
        return str(file.relative_to(ckpt.path))
    except ValueError:
        return file.name


@reports_progress
def inspect(
    path: Path | str,
    *,
    digest: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressArg = False,
    hub: dict | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
) -> InspectReport:
    """Format, files, dtypes, sizes and the tensor table; ``digest=False`` reads headers only.

    Args:
        path: a folder, a weight file, or a Hub repo id.
        digest: also hash every tensor for the model digest (reads the whole model).
        block_bytes: bytes read at a time.
        progress: show a bar, or a ``callback(done_bytes, total_bytes)``.
        hub: how to reach the Hub when ``path`` is a repo id.
        algorithm: ``"blake3"`` or ``"sha256"``.

    Returns:
        An :class:`InspectReport`.

    Raises:
        NotFoundError: ``path`` does not exist (also a FileNotFoundError).
        FormatError: a file is malformed (also a ValueError).
        InputError: bad arguments.
    """
    path = args.path("path", path)
    args.flag("digest", digest)
    block_bytes, progress, hub = _common_args(block_bytes, progress, hub)
    _check_algorithm(algorithm)
    with open_checkpoint(local_folder(path, **hub)) as ckpt:
        tensors = [
            TensorInfo(n, TORCH_TO_SAFETENSORS[s.dtype], s.shape, _relative(ckpt, ckpt.file_of(n)))
            for n, s in sorted(ckpt.specs.items())
        ]
        per_file: dict[str, int] = {}
        for t in tensors:
            per_file[t.file] = per_file.get(t.file, 0) + 1
        shards = []
        for f in ckpt.files:
            name = _relative(ckpt, f)
            shards.append(ShardInfo(name, f.stat().st_size, per_file.get(name, 0)))
        dtypes: dict[str, DtypeCount] = {}
        for t in tensors:
            c = dtypes.get(t.dtype, DtypeCount(0, 0))
            dtypes[t.dtype] = DtypeCount(c.tensors + 1, c.parameters + ckpt.specs[t.name].numel)
        found = None
        if digest:
            bar = make_progress(progress, _total_bytes(ckpt), "hashing")
            try:
                found = model_digest(_hash_all(ckpt, block_bytes, bar, algorithm), algorithm)
            finally:
                bar.close()
        index = _relative(ckpt, ckpt.layout.index) if ckpt.layout.index else None
        return InspectReport(
            Path(path), ckpt.format, index, shards, dict(sorted(dtypes.items())),
            sum(s.numel for s in ckpt.specs.values()), _total_bytes(ckpt), tensors, found,
            algorithm,
        )


# -- diff -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecDifference:
    """A tensor on both sides with another dtype or shape; values compared when shapes agree."""

    name: str
    a_dtype: str
    a_shape: tuple[int, ...]
    b_dtype: str
    b_shape: tuple[int, ...]
    max_abs_diff: float | None  # None when the shapes differ

    def to_json(self) -> dict:
        return {"name": self.name, "a": {"dtype": self.a_dtype, "shape": list(self.a_shape)},
                "b": {"dtype": self.b_dtype, "shape": list(self.b_shape)},
                "max_abs_diff": self.max_abs_diff}


@dataclass(frozen=True)
class ContentDifference:
    """A tensor with the same dtype and shape on both sides but other values."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    differing: int  # elements whose bits differ
    elements: int
    max_abs_diff: float  # computed in fp32; inf where one side is NaN or inf and the other not

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "differing": self.differing, "elements": self.elements,
                "max_abs_diff": self.max_abs_diff}


@dataclass
class DiffReport:
    """Tensor by tensor, how checkpoint ``b`` differs from ``a``."""

    a: Path
    b: Path
    only_a: list[str]
    only_b: list[str]
    layout: list[SpecDifference]
    content: list[ContentDifference]
    same: int  # tensors identical on both sides

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.layout or self.content)

    @property
    def max_abs_diff(self) -> float | None:
        """The largest absolute difference over all tensors compared by value (None if none)."""
        values = [c.max_abs_diff for c in self.content]
        values += [d.max_abs_diff for d in self.layout if d.max_abs_diff is not None]
        return max(values) if values else (0.0 if self.same else None)

    def to_json(self) -> dict:
        return {
            "a": str(self.a),
            "b": str(self.b),
            "identical": self.identical,
            "same": self.same,
            "only_a": self.only_a,
            "only_b": self.only_b,
            "layout": [d.to_json() for d in self.layout],
            "content": [c.to_json() for c in self.content],
            "max_abs_diff": self.max_abs_diff,
        }


def _compare_values(
    a: torch.Tensor, b: torch.Tensor, same_dtype: bool
) -> tuple[int, float]:
    """Elements that differ (bitwise when the dtypes agree) and their largest |a - b| in fp32."""
    if same_dtype:
        bits = BITS_DTYPE[itemsize(a.dtype)]
        ne = a.reshape(-1).view(bits) != b.reshape(-1).view(bits)
    else:
        ne = a.reshape(-1).float() != b.reshape(-1).float()
    count = int(ne.sum())
    if not count:
        return 0, 0.0
    d = a.reshape(-1).float()
    d.sub_(b.reshape(-1).float()).abs_().masked_fill_(~ne, 0).nan_to_num_(nan=float("inf"))
    return count, float(d.max())


def _diff_tensor(
    ca: Checkpoint, cb: Checkpoint, name: str, block_bytes: int, widest: int,
    bufs: tuple[torch.Tensor, torch.Tensor], bar: Progress,
) -> tuple[int, float]:
    sa, sb = ca.specs[name], cb.specs[name]
    count, largest = 0, 0.0
    for r0, r1 in row_blocks(sa, block_bytes, widest):
        ra = ca.read_rows(name, r0, r1, bufs[0])
        rb = cb.read_rows(name, r0, r1, bufs[1])
        n, m = _compare_values(ra, rb, sa.dtype == sb.dtype)
        count, largest = count + n, max(largest, m)
        bar.update(ra.nbytes + rb.nbytes)
    return count, largest


@reports_progress
def diff(
    a: Path | str,
    b: Path | str,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressArg = False,
    hub: dict | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor, by value, whatever their formats and shards.

    Answers "is my base the right one?" with names on one side only, dtype and shape
    differences, and for each tensor that differs how many elements do and by how much at most
    (the largest absolute difference, computed block by block in fp32).

    Args:
        a: one checkpoint: a folder, a weight file, or a Hub repo id.
        b: the other, in the same forms.
        block_bytes: bytes read at a time.
        progress: show a bar, or a ``callback(done_bytes, total_bytes)``.
        hub: how to reach the Hub when ``a`` or ``b`` is a repo id.

    Returns:
        A :class:`DiffReport`; differences are reported, not raised.

    Raises:
        NotFoundError: ``a`` or ``b`` does not exist (also a FileNotFoundError).
        FormatError: a file is malformed (also a ValueError).
        InputError: bad arguments.
    """
    a, b = args.path("a", a), args.path("b", b)
    block_bytes, progress, hub = _common_args(block_bytes, progress, hub)
    with (
        open_checkpoint(local_folder(a, "A", **hub)) as ca,
        open_checkpoint(local_folder(b, "B", **hub)) as cb,
    ):
        only_a = sorted(set(ca.specs) - set(cb.specs))
        only_b = sorted(set(cb.specs) - set(ca.specs))
        common = [n for n in ca.specs if n in cb.specs]
        comparable = [n for n in common if ca.specs[n].shape == cb.specs[n].shape]
        widest = max([4] + [itemsize(s.dtype) for s in (*ca.specs.values(), *cb.specs.values())])
        bufs = (
            block_buffer([ca.specs[n] for n in comparable], block_bytes, widest),
            block_buffer([cb.specs[n] for n in comparable], block_bytes, widest),
        )
        total = sum(ca.specs[n].nbytes + cb.specs[n].nbytes for n in comparable)
        bar = make_progress(progress, total, "comparing")
        layout: list[SpecDifference] = []
        content: list[ContentDifference] = []
        same = 0
        try:
            for name in sorted(common):
                sa, sb = ca.specs[name], cb.specs[name]
                da, db = TORCH_TO_SAFETENSORS[sa.dtype], TORCH_TO_SAFETENSORS[sb.dtype]
                if sa.shape != sb.shape:
                    layout.append(SpecDifference(name, da, sa.shape, db, sb.shape, None))
                    continue
                bar.at(name)
                count, largest = _diff_tensor(ca, cb, name, block_bytes, widest, bufs, bar)
                if sa.dtype != sb.dtype:
                    layout.append(SpecDifference(name, da, sa.shape, db, sb.shape, largest))
                elif count:
                    content.append(ContentDifference(name, da, sa.shape, count, sa.numel, largest))
                else:
                    same += 1
        finally:
            bar.close()
    return DiffReport(Path(a), Path(b), only_a, only_b, layout, content, same)
