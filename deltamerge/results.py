"""What the entry points return and record, in a leaf so that kinds, sinks and the Hub code can
use these without importing an entry point."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ALGORITHM = "blake3"  # integrity.digest's default, named here for the leaf

# Provenance and digests of a rebuilt model, written into it by apply (and by xor-files).
RESULT_RECORD = "deltamerge-result.json"


@dataclass
class ApplyResult:
    """What a rebuild produced; the CLI prints it, pipelines read it."""

    out: Path
    kinds: list[str]
    tensors: int
    shards: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int | None  # this process's own peak resident memory (VmHWM), in bytes; None: unknown
    model_digest: str
    publisher_digest: str | None = None  # the manifest's expected result, when there is one
    verified: bool = False  # True when the result matched the publisher's digest
    notes: list[str] = field(default_factory=list)
    algorithm: str = DEFAULT_ALGORITHM  # of model_digest: sha256 when checked against format 1
    format: str = "hf"  # what OUT holds: hf, gguf or meta
    # gguf and meta: model_digest is of the tensors as written; this one of the merge's tensors
    # before conversion, which the publisher's digest is of (and is compared with)
    merged_digest: str | None = None
    # each delta's model.sig as checked: its signer and verified, or {"signed", "verified": False}
    signatures: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """Every field, paths as strings: what ``apply --json`` prints for pipelines."""
        return _jsonable(asdict(self))


@dataclass
class MakeDeltaResult:
    out: Path
    kind: str
    tensors: int
    elements: int
    mismatched_elements: int  # elements base + delta does not give back exactly
    base_digest: str  # BLAKE3 model digests, as the manifest (format 2) records them
    result_digest: str
    bytes_written: int
    seconds: float
    peak_rss: int | None  # this process's own peak resident memory (VmHWM), in bytes; None: unknown
    notes: list[str] = field(default_factory=list)
    overflowed: list[str] = field(default_factory=list)  # tensors whose delta holds Inf (overflow)
    signed_by: dict | None = None  # model.sig's signer (integrity.signing.Signer.to_json)

    def to_json(self) -> dict:
        """Every field, paths as strings: what ``make-delta --json`` prints."""
        return _jsonable(asdict(self))


def _jsonable(record: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}
