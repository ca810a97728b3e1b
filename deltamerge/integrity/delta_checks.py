"""What a delta's manifest proves about the delta's own files, checked from the reads apply makes.

A format 2 manifest lists the delta's tensors by digest (its ``delta`` role) and, for each
safetensors file, the digest of the header (everything before the tensor data). A file whose
header matches and whose every tensor matches is the publisher's file byte for byte: the header
fixes every tensor's dtype, shape and offsets, the parser refuses a data region that the tensors
do not tile exactly, and the tensor digests cover every byte of it. So such a file is never
hashed as a file: its header is a few KB, and its tensors are hashed from the rows the merge
reads anyway, in any order, in the engine's check stage. Every other listed file (configs,
``.bin`` weights, any file of a format 1 manifest) is checked against its whole-file digest, fed
from the merge's reads where the bytes read are the file's (:class:`FileHasher`), or read once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..dtypes import TORCH_TO_SAFETENSORS
from ..errors import VerificationError
from ..formats.files import inside
from ..sources import Checkpoint
from .digest import FileHasher, TensorDigest, file_digest, hash_tensor
from .manifest import MANIFEST_NAME, Manifest, delta_mismatch

STREAMED_FILE_BYTES = 1 << 20  # smaller files are read once more rather than fed from reads


@dataclass
class DeltaChecks:
    """The checks a run makes on its deltas: what the engine feeds, and what is left after."""

    expected_inputs: dict[Checkpoint, dict[str, TensorDigest]] = field(default_factory=dict)
    file_hashers: dict[Path, FileHasher] = field(default_factory=dict)  # fed by the engine
    files: dict[Path, tuple[str, str]] = field(default_factory=dict)  # path: algorithm, digest


def plan_delta_checks(
    folders: list[Path], manifests: list[Manifest | None], checkpoints: list[Checkpoint | None]
) -> DeltaChecks:
    """Check what can be checked before any tensor is read (headers, the tensor table); say
    which digests the engine computes from its reads and which files are hashed whole.

    ``checkpoints`` are the deltas' tensors as their kinds opened them (None for a kind that
    has none), so that the engine recognises their rows."""
    checks = DeltaChecks()
    for folder, m, ckpt in zip(folders, manifests, checkpoints):
        if m is None:
            continue
        covered: set[Path] = set()
        if m.delta is not None and ckpt is not None:
            _check_table(ckpt, m)
            checks.expected_inputs[ckpt] = m.delta.tensors
            covered = _check_headers(folder, ckpt, m)
        for name in m.files:
            path = inside(folder, name, folder / MANIFEST_NAME)
            if not path.is_file():
                raise VerificationError(f"{path}: listed in {MANIFEST_NAME} but missing")
            if path.resolve() in covered:
                continue
            checks.files[path] = (m.algorithm, m.files[name].hexdigest)
            if path.stat().st_size > STREAMED_FILE_BYTES:
                checks.file_hashers[path] = FileHasher(path, m.algorithm)
    return checks


def _check_table(ckpt: Checkpoint, m: Manifest) -> None:
    """The delta holds exactly the tensors its manifest lists, with their dtypes and shapes."""
    assert m.delta is not None
    for name, spec in ckpt.specs.items():
        expected = m.delta.tensors.get(name)
        if expected is None:
            raise VerificationError(
                f"{ckpt.file_of(name)}: tensor {name!r} is not in the delta's {MANIFEST_NAME}: "
                f"the file was changed"
            )
        dtype = TORCH_TO_SAFETENSORS[spec.dtype]
        if (dtype, spec.shape) != (expected.dtype, expected.shape):
            raise VerificationError(
                f"{ckpt.file_of(name)}: tensor {name!r} is {dtype}{list(spec.shape)} but "
                f"{expected.dtype}{list(expected.shape)} in {MANIFEST_NAME}: the file is corrupt "
                f"or was changed"
            )
    missing = sorted(set(m.delta.tensors) - set(ckpt.specs))
    if missing:
        raise VerificationError(
            f"{ckpt.path}: tensor {missing[0]!r} of {MANIFEST_NAME} is missing from the delta "
            f"({len(missing)} missing)"
        )


def _check_headers(folder: Path, ckpt: Checkpoint, m: Manifest) -> set[Path]:
    """Compare each weight file's header with the manifest's; the files whose headers it lists
    (resolved), which the tensor digests then cover."""
    by_path = {inside(folder, n, folder / MANIFEST_NAME).resolve(): e for n, e in m.files.items()}
    covered = set()
    for path in ckpt.files:
        entry = by_path.get(path.resolve())
        length = ckpt.header_length(path)
        if entry is None or entry.header is None or length is None:
            continue
        size, expected = entry.header
        actual = file_digest(path, m.algorithm, length=length)
        if size != length or actual != expected:
            raise VerificationError(
                f"{path}: header ({length} bytes) {m.algorithm} {actual[:16]}… does not match "
                f"{MANIFEST_NAME} ({size} bytes, {expected[:16]}…): the file is corrupt or was "
                f"changed"
            )
        covered.add(path.resolve())
    return covered


def finish_delta_checks(
    checks: DeltaChecks,
    read: dict[tuple[Checkpoint, str], TensorDigest],
    streamed: dict[Path, str],
    block_bytes: int,
) -> None:
    """After the run: delta tensors the merge did not read (buffers it skips, LoRA factors it
    loads itself, shards a resumed run kept) are hashed now; then every whole-file digest."""
    for ckpt, expected in checks.expected_inputs.items():
        for name, spec in ckpt.specs.items():
            if (ckpt, name) in read:
                continue
            digest = hash_tensor(ckpt, spec, block_bytes, algorithm=expected[name].algorithm)
            if digest != expected[name]:
                raise delta_mismatch(ckpt.file_of(name), name, digest, expected[name])
    for path, (algorithm, expected) in checks.files.items():
        actual = streamed.get(path) or file_digest(path, algorithm)
        if actual != expected:
            raise VerificationError(
                f"{path}: {algorithm} {actual[:16]}… does not match {MANIFEST_NAME} "
                f"({expected[:16]}…): the file is corrupt or was changed"
            )
