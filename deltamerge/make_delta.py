"""``make_delta``: what publishers run: a delta of the target against the base, and its manifest.

One streaming pass reads base and target, writes the delta, and also computes what apply will
rebuild from it, so the manifest can record the publisher's result digest and the user learns
how many elements a lossy (fp16 additive) delta does not reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .engine import Engine
from .engine.plan import TensorJob, layout_shards, rows_per_block
from .engine.stream import WrittenFile
from .errors import InputError
from .integrity.digest import TensorHasher, file_digest, hash_tensor
from .integrity.manifest import MANIFEST_NAME, FileEntry, Manifest, Role
from .kinds import Step, is_non_weight
from .kinds.add import MakeAddStep, check_pairing
from .kinds.xor import MakeXorStep
from .memory import peak_rss_bytes
from .progress import make_progress
from .results import MakeDeltaResult
from .sinks.aux import copy_aux
from .sinks.folder import check_out, discard, make_partial, publish
from .sinks.lock import hold
from .sinks.overlap import refuse_overlap
from .sinks.safetensors import SafetensorsSink, write_index
from .sizes import DEFAULT_BLOCK_BYTES, DEFAULT_SHARD_SIZE, parse_size
from .sources import Checkpoint, open_checkpoint
from .sources.folders import is_aux_file
from .sources.resolve import input_region, resolve_input
from .tensor_spec import TensorSpec
from .version import __version__

PathLike = str | Path
MAKE_KINDS = ("add", "xor")


def make_delta(
    base: PathLike,
    target: PathLike,
    out: PathLike,
    *,
    kind: str = "add",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    block_size: int = DEFAULT_BLOCK_BYTES,
    force: bool = False,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    hub: dict | None = None,
) -> MakeDeltaResult:
    """Write ``target - base`` (or ``target XOR base``) to ``out`` with a ``deltamerge.json``.

    The one pass hashes the base (the manifest's base role), what apply will rebuild (its result
    role), the delta's tensors (its delta role) and the delta's files as they are written.
    """
    if kind not in MAKE_KINDS:
        raise InputError(f"make-delta --kind must be one of {', '.join(MAKE_KINDS)}, not {kind!r}")
    out = Path(out).expanduser()
    shard_bytes = parse_size(max_shard_size)
    refuse_overlap(out, [(str(g), input_region(g, role)) for g, role in
                         ((base, "base"), (target, "target"))])
    check_out(out, force)
    with hold(out):
        check_out(out, force)  # again under the lock: a run that held it may have published
        return _make_locked(base, target, out, kind, shard_bytes, block_size, workers or 1,
                            progress, hub or {})


def _make_locked(
    base: PathLike, target: PathLike, out: Path, kind: str, shard_bytes: int, block_size: int,
    workers: int, progress: bool | Callable[[int, int], None], hub: dict,
) -> MakeDeltaResult:
    """The run itself, under OUT's lock: a leftover partial folder is removed only under it."""
    base_in = resolve_input(base, "base", **hub)
    target_in = resolve_input(target, "target", **hub)
    with open_checkpoint(base_in.path) as base_ckpt, open_checkpoint(target_in.path) as target_ckpt:
        check_pairing(target_ckpt, base_ckpt.specs, role="the target")
        jobs, steps, results = _plan(base_ckpt, target_ckpt, kind, block_size)
        shards = layout_shards(jobs, shard_bytes)
        bar = make_progress(progress, sum(j.out.nbytes for j in jobs), "making delta")
        tmp = make_partial(out)
        try:
            engine = Engine(
                base_ckpt, shards, tmp, sink=SafetensorsSink(), block_bytes=block_size,
                workers=workers, hash_base=True, hash_out=True, hash_files=True,
                progress=bar.update,
            )
            run = engine.run()
            bar.close()
            base_digests = dict(run.base_digests)
            result_digests = {name: h.digest() for name, h in results.items()}
            for name, spec in base_ckpt.specs.items():
                if name not in base_digests:
                    base_digests[name] = hash_tensor(base_ckpt, spec, block_size)
                if name not in result_digests and is_non_weight(name):
                    result_digests[name] = base_digests[name]
            write_index(tmp, shards)
            copy_aux(tmp, {n: p for n, p in target_ckpt.aux_files().items() if is_aux_file(n)})
            files = _file_table(tmp, engine.written_files)
            manifest = Manifest(
                kind, __version__, files, Role.of(base_digests), Role.of(result_digests),
                {"new_rows": "zero"}, delta=Role.of(run.out_digests),
            )
            manifest.write(tmp / MANIFEST_NAME)
            publish(tmp, out)
        except BaseException:
            bar.close()
            discard(tmp)
            raise
    return MakeDeltaResult(
        out, kind, len(jobs), sum(j.out.numel for j in jobs),
        sum(getattr(s, "mismatches", 0) for s in steps), manifest.base.model_digest,
        manifest.result.model_digest, run.bytes_written, run.seconds, peak_rss_bytes(),
    )


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
    if kind == "xor":
        return MakeXorStep(before, target, name)
    return MakeAddStep(before, target, name)


def _file_table(folder: Path, written: dict[str, WrittenFile]) -> dict[str, FileEntry]:
    """Digest and size of every file of the delta; shards were hashed as they were written."""
    table = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME:
            size = path.stat().st_size
            shard = written.get(path.name)
            if shard is None:
                table[path.name] = FileEntry(file_digest(path), size)
            else:
                table[path.name] = FileEntry(shard.digest, size, (shard.header_size, shard.header_digest))
    return table
