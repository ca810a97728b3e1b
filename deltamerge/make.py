"""``make_delta``: what publishers run: a delta of the target against the base, and its manifest.

One streaming pass reads base and target, writes the delta, and also computes what apply will
rebuild from it, so the manifest can record the publisher's result digest and the user learns
how many elements a lossy (fp16 additive) delta does not reproduce.

Shards are journaled as apply's are (``engine/journal.py``), each line with what the manifest
needs of its shard: the digests of what apply will rebuild from it, and (its ``extra``) the
file's BLAKE3 and the elements it loses. Each shard's header carries the delta's marks
(``kinds/marks.py``: its kind and an id made from the run's fingerprint, which the manifest
records too), so the delta says what it is without its manifest. ``resume=True`` finishes an
interrupted run: each journaled shard file is hashed again and kept only if its digest is the
journal's; the others, and anything else in the partial folder, are removed and written again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import arguments as args
from .delta_files import base_source, file_table
from .engine import Engine
from .engine.journal import JOURNAL_NAME, Entry, Journal, read_digest
from .engine.lifecycle import locked_out, partial_run
from .engine.plan import Shard, TensorJob, layout_shards, rows_per_block
from .engine.recheck import recheck_files
from .engine.stream import ShardDone, WrittenFile
from .extract import extract_lora
from .formats.xor_zstd import DEFAULT_LEVEL
from .formats.xor_zstd import KIND as XOR_ZSTD
from .hub.model_card import CARD_NAME
from .integrity.digest import TensorDigest, TensorHasher, file_digest, hash_tensor
from .integrity.manifest import MANIFEST_NAME, Manifest, Role
from .integrity.signing import SigningKey, sign_folder
from .kinds import Step, is_non_weight
from .kinds.add import MakeAddStep, check_pairing
from .kinds.marks import Marks, delta_id
from .kinds.xor import MakeXorStep
from .memory import peak_rss_bytes
from .options import LORA, MakeOptions
from .progress import make_progress, reports_progress
from .results import MakeDeltaResult
from .sinks.aux import copy_aux, fix_config
from .sinks.safetensors import SafetensorsSink, write_index
from .sinks.xor_zstd import ZstdXorSink
from .sizes import DEFAULT_BLOCK_BYTES
from .sources import Checkpoint, open_checkpoint
from .sources.folders import is_aux_file
from .sources.inputs import need_folders
from .sources.resolve import resolve_input
from .tensor_spec import TensorSpec
from .version import __version__

PathLike = str | Path
OVERFLOWS_NAMED = 3  # tensors named in the note; the result lists them all


@reports_progress
def make_delta(
    base: PathLike,
    target: PathLike,
    out: PathLike,
    *,
    kind: str = "add",
    max_shard_size: str | int | None = None,
    block_size: int | str = DEFAULT_BLOCK_BYTES,
    force: bool = False,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    hub: dict | None = None,
    resume: bool = False,
    compress: bool = False,
    compress_level: int = DEFAULT_LEVEL,
    sign: SigningKey | None = None,
    rank: int | None = None,
) -> MakeDeltaResult:
    """Write ``target - base`` (or ``target XOR base``) to ``out`` with a ``deltamerge.json``.

    The one pass hashes the base (the manifest's base role), what apply will rebuild (its result
    role), the delta's tensors (its delta role) and the delta's files as they are written, so
    whoever applies the delta can check both ends without the publisher's models.

    Args:
        base: the model the delta is made against: a folder, a weight file, or a Hub repo id.
        target: the model the delta rebuilds, in the same forms.
        out: the folder to create; it must be absent or empty unless ``force``.
        kind: ``"add"`` (differences), ``"xor"`` (bitwise, exact for any dtype) or ``"lora"``
            (a peft LoRA adapter of rank ``rank`` approximating the differences: ``extract.py``).
        rank: with ``kind="lora"``, the adapter's rank.
        compress: with ``kind="xor"``, store the delta zstd-compressed in byte planes
            (``formats/xor_zstd.py``), as kind ``xor-zstd``, at ``compress_level``.
        compress_level: zstd's level, 1 to 22 (3 by default).
        sign: write ``model.sig`` over the finished folder before it is published, so OUT never
            appears unsigned (``integrity/signing.py``).
        max_shard_size: bytes (or e.g. ``"5GB"``) per delta shard; 5GB by default.
        block_size: bytes (or e.g. ``"24MB"``) bounding each row block's buffers.
        force: replace a non-empty ``out`` (at publish).
        workers: threads for the stream; 1 by default (the CLI picks from the CPUs).
        progress: show bars, or a ``callback(done_bytes, total_bytes)``.
        hub: ``endpoint``, ``token`` or ``api`` for inputs that are Hub repo ids.
        resume: finish the partial folder an interrupted run left beside ``out``, keeping the
            journaled shards whose files still hash to what the journal recorded.

    Returns:
        A :class:`~deltamerge.results.MakeDeltaResult`: the delta's folder, the digests of the
        base, result and delta roles, its size, time and peak memory.

    Raises:
        InputError: bad arguments, inputs that are missing (``NotFoundError``, also a
            FileNotFoundError), malformed (``FormatError``, also a ValueError) or that do not
            pair (``MismatchError``); ``out`` taken or locked. Nothing was written.
        WorkError: the run failed while working; an ``InterruptedRun`` keeps its partial folder
            for ``resume``.
    """
    base, target = args.path("base", base), args.path("target", target)
    out = Path(args.path("out", out)).expanduser()
    args.text("kind", kind)
    need_folders([(base, "base"), (target, "target")])
    opts = MakeOptions.of(
        kind=kind, max_shard_size=max_shard_size, block_size=block_size, force=force,
        workers=workers, progress=progress, hub=hub, resume=resume, compress=compress,
        compress_level=compress_level, sign=sign, rank=rank,
    )
    with locked_out(out, [(base, "base"), (target, "target")], opts.force):
        if opts.kind == LORA:
            return extract_lora(base, target, out, rank=opts.rank, block_size=opts.block_size,
                                progress=opts.progress, hub=opts.hub, resume=opts.resume,
                                force=opts.force, sign=opts.sign)
        return _make_locked(base, target, out, opts)


def _make_locked(base: PathLike, target: PathLike, out: Path, opts: MakeOptions) -> MakeDeltaResult:
    """The run itself, under OUT's lock: a leftover partial folder is touched only under it."""
    base_in = resolve_input(base, "base", **opts.hub)
    target_in = resolve_input(target, "target", **opts.hub)
    with open_checkpoint(base_in.path) as base_ckpt, open_checkpoint(target_in.path) as target_ckpt:
        check_pairing(target_ckpt, base_ckpt.specs, role="the target")
        jobs, steps, results = _plan(base_ckpt, target_ckpt, opts.kind, opts.block_size)
        shards = layout_shards(jobs, opts.shard_bytes)
        fp = opts.fingerprint([base_in.path, target_in.path], shards)
        marks = Marks(opts.kind, delta_id(fp.digest), str(out))
        with partial_run(out, fp, resume=opts.resume, force=opts.force, kept="the partial delta") as partial:
            tmp, journal = partial.folder, partial.journal
            kept = _recheck(tmp, journal, shards) if opts.resume else {}
            bar = make_progress(opts.progress, sum(
                j.out.nbytes for s in shards if s.filename not in kept for j in s.jobs),
                "making delta")
            metadata = {"format": "pt", **marks.metadata()}
            sink = ZstdXorSink(metadata, opts.level) if opts.kind == XOR_ZSTD else SafetensorsSink(metadata)
            engine = Engine(
                base_ckpt, shards, tmp, sink=sink, block_bytes=opts.block_size,
                workers=opts.workers, hash_base=True, hash_out=True, hash_files=opts.kind != XOR_ZSTD,
                progress=bar.update, at=bar.at, skip_shards=set(kept),
            )
            written = _written_file(engine, sink)
            engine.on_shard_done = _journal_shard(journal, written, shards, results)
            try:
                run = engine.run()
            finally:
                bar.close()
            base_digests = dict(run.base_digests)
            result_digests = {name: h.digest() for name, h in results.items()}
            for shard in kept.values():
                result_digests.update(shard.digests)
            for name, spec in base_ckpt.specs.items():
                if name not in base_digests:
                    base_digests[name] = hash_tensor(base_ckpt, spec, opts.block_size)
                if name not in result_digests and is_non_weight(name):
                    result_digests[name] = base_digests[name]
            write_index(tmp, shards)
            copy_aux(tmp, {n: p for n, p in target_ckpt.aux_files().items() if is_aux_file(n)})
            fix_config(tmp, None, None)  # a delta is published: no folder of the publisher's
            delta_digests = dict(run.out_digests)
            for shard in kept.values():
                delta_digests.update(shard.delta)
            files = file_table(tmp, {**{s.filename: written(s.filename) for s in shards
                                         if s.filename not in kept},
                                      **{n: k.file for n, k in kept.items()}})
            manifest = Manifest(
                opts.kind, __version__, files, Role.of(base_digests), Role.of(result_digests),
                {"new_rows": "zero"}, delta=Role.of(delta_digests),
                base_source=base_source(base_in), delta_id=marks.delta_id,
            )
            manifest.write(tmp / MANIFEST_NAME)
            # Not signed: the journal (removed once published) and the model card push adds.
            signer = sign_folder(tmp, opts.sign, ignore=(JOURNAL_NAME, CARD_NAME)) if opts.sign else None
    mismatches = sum(getattr(s, "mismatches", 0) for s in steps)
    written = run.bytes_written
    if opts.kind == XOR_ZSTD:  # what went to disk, compressed, rather than the rows compressed
        written = sum(files[s.filename].size for s in shards if s.filename not in kept)
    notes = [f"resumed: {len(kept)} finished shard(s) kept, each hashed again"] if kept else []
    overflowed = _overflowed(jobs, kept)
    if overflowed:
        notes.append(
            f"{len(overflowed)} tensor(s) differ from the base by more than their dtype can hold: "
            f"the delta stores Inf there, and apply rebuilds Inf (first "
            f"{', '.join(map(repr, overflowed[:OVERFLOWS_NAMED]))})"
        )
    return MakeDeltaResult(
        out, opts.kind, len(jobs), sum(j.out.numel for j in jobs),
        mismatches + sum(k.mismatches for k in kept.values()), manifest.base.model_digest,
        manifest.result.model_digest, written, run.seconds, peak_rss_bytes(), notes,
        overflowed, signed_by=signer.to_json() if signer else None,
    )


def _overflowed(jobs: list[TensorJob], kept: dict[str, _Kept]) -> list[str]:
    """The tensors whose delta overflowed to Inf, in the plan's order: this run's steps say,
    and the journal of each kept shard for the tensors in it."""
    counted = {n: c for k in kept.values() for n, c in k.overflows.items()}
    return [j.name for j in jobs
            if getattr(j.steps[0], "overflows", 0) or counted.get(j.name, 0)]


@dataclass(frozen=True)
class _Kept:
    """A shard an earlier run wrote, checked again by this one: what the manifest needs of it."""

    file: WrittenFile  # the shard's digest and its header's, for the manifest's file table
    digests: dict[str, TensorDigest]  # of what apply will rebuild from its tensors
    delta: dict[str, TensorDigest]  # of the delta tensors it holds, for the delta role
    mismatches: int
    overflows: dict[str, int]  # elements stored as Inf, by tensor (only those with any)


def _written_file(engine: Engine, sink: object) -> Callable[[str], WrittenFile]:
    """How a finished shard file's digests are found: the engine hashes files of the rows' own
    bytes as they are written; a compressing sink writes each file whole at the shard's end,
    and hashes it then."""
    if isinstance(sink, ZstdXorSink):
        return lambda filename: WrittenFile(*sink.files[filename])
    return engine.written_files.__getitem__


def _journal_shard(
    journal: Journal, file_of: Callable[[str], WrittenFile], shards: list[Shard],
    results: dict[str, TensorHasher],
) -> ShardDone:
    """The engine's ``on_shard_done``: journal a written shard with what the manifest needs
    (make-delta writes safetensors: nothing is converted, so nothing is ``written`` apart)."""
    by_name = {s.filename: s for s in shards}

    def record(
        filename: str, size: int, digests: dict[str, TensorDigest], written: dict[str, TensorDigest]
    ) -> None:
        jobs = by_name[filename].jobs
        shard = file_of(filename)
        journal.record(filename, size, {j.name: results[j.name].digest() for j in jobs}, extra={
            "file": [shard.digest, shard.header_size, shard.header_digest],
            "delta": {n: d.to_json() for n, d in digests.items()},
            "mismatches": sum(getattr(j.steps[0], "mismatches", 0) for j in jobs),
            "overflows": {j.name: n for j in jobs if (n := getattr(j.steps[0], "overflows", 0))},
        })

    return record


def _recheck(folder: Path, journal: Journal, shards: list[Shard]) -> dict[str, _Kept]:
    """The journaled shards whose files hash, now, to the digest the journal recorded; the
    others and anything else in the partial folder are removed (only what was checked is kept).
    A file that hashes as journaled holds the bytes the journal's tensor digests were made of."""
    planned = {s.filename: {j.name for j in s.jobs} for s in shards}

    def holds(name: str, claim: Entry, path: Path, advance: Callable[[int], None]) -> bool:
        kept = _kept(claim, planned[name])
        size = path.stat().st_size
        # The claim's own checks first: a shard they refuse is not read at all.
        ok = kept is not None and size == claim.size and file_digest(path) == kept.file.digest
        advance(size)
        return ok

    kept = recheck_files(folder, journal, planned, holds, "re-checking kept shards")
    return {n: k for n, e in kept.items() if (k := _kept(e, planned[n])) is not None}


def _kept(claim: Entry, tensors: set[str]) -> _Kept | None:
    """What a journal line says of a make-delta shard holding ``tensors``; None when it is not
    such a line (damaged, or another run's)."""
    file, lost = claim.extra.get("file"), claim.extra.get("mismatches")
    try:
        delta = {n: read_digest(d) for n, d in claim.extra.get("delta", {}).items()}
        written = WrittenFile(*file)
        overflows = {str(n): int(c) for n, c in claim.extra.get("overflows", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not isinstance(lost, int) or set(claim.digests) != tensors or set(delta) != tensors:
        return None
    return _Kept(written, claim.digests, delta, lost, overflows)


def _plan(
    base: Checkpoint, target: Checkpoint, kind: str, block_bytes: int
) -> tuple[list[TensorJob], list[Step], dict[str, TensorHasher]]:
    jobs, steps, results = [], [], {}
    for name, spec in target.specs.items():
        if is_non_weight(name):
            continue
        step = _make_step(kind, base.specs[name], target, name)
        hasher = results[name] = TensorHasher(spec)
        step.on_result = hasher.update
        job = TensorJob(TensorSpec(name, spec.dtype, spec.shape), base.specs[name], [step])
        job.rows_per_block = rows_per_block(job, block_bytes)
        jobs.append(job)
        steps.append(step)
    return jobs, steps, results


def _make_step(kind: str, before: TensorSpec, target: Checkpoint, name: str) -> Step:
    if kind in ("xor", XOR_ZSTD):
        return MakeXorStep(before, target, name)
    return MakeAddStep(before, target, name)


