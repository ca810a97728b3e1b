"""``apply_delta``: rebuild a model from a base and one or more deltas, streaming.

The data flows one way: resolve the inputs, plan (pair tensors, check shapes, lay out shards,
plan the output format's files), stream (the engine, writing through the format's sink), verify
(the publisher's digests), publish (rename into OUT).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import faults
from .dtypes import parse_user_dtype, short_name
from .engine import Engine
from .engine.journal import Journal, fingerprint
from .engine.plan import Shard, TensorJob, layout_shards, rows_per_block
from .engine.recheck import recheck
from .errors import (
    DiskSpaceError,
    InputError,
    InterruptedRun,
    UnsupportedError,
    VerificationError,
    WorkError,
)
from .formats.files import inside
from .integrity.digest import FileHasher, TensorDigest, file_sha256, model_digest
from .integrity.manifest import MANIFEST_NAME, Manifest, Role, find_manifest
from .kinds import ApplyOptions, Kind, is_non_weight
from .kinds.add import VOCAB_TENSORS
from .kinds.detect import detect_kind, open_kind
from .kinds.lora import QLORA_MODES
from .kinds.xor_files import apply_xor_files
from .memory import peak_rss_bytes
from .preflight import preflight
from .progress import make_progress
from .results import RESULT_RECORD, ApplyResult
from .sinks import Sink
from .sinks.aux import copy_aux, fix_config
from .sinks.folder import check_free_space, check_out, discard, partial_dir, publish, write_json
from .sinks.lock import hold
from .sinks.output import OutputFormat, open_sink, output_format
from .sinks.overlap import refuse_overlap
from .sinks.safetensors import write_index
from .sizes import DEFAULT_BLOCK_BYTES, DEFAULT_SHARD_SIZE, parse_size
from .sources import Checkpoint, open_checkpoint
from .sources.folders import AUX_FILES
from .sources.inputs import Resolved
from .sources.resolve import input_region, resolve_input
from .tensor_spec import TensorSpec
from .version import __version__

PathLike = str | Path


def apply_delta(
    base: PathLike,
    delta: PathLike | Sequence[PathLike],
    out: PathLike,
    *,
    kind: str | None = None,
    dtype: str | torch.dtype | None = None,
    new_rows: str = "zero",
    max_shard_size: str | int | None = None,
    block_size: int = DEFAULT_BLOCK_BYTES,
    force: bool = False,
    verify: bool = True,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    extra_files: dict[str, Path | bytes] | None = None,
    hub: dict | None = None,
    expect_md5: PathLike | None = None,
    resume: bool = False,
    qlora: str | None = None,
    qlora_dtype: str | torch.dtype | None = None,
    format: str = "hf",
    outtype: str | None = None,
    mp: int | None = None,
) -> ApplyResult:
    """Rebuild ``base`` + ``delta`` (or a chain of deltas, applied in order) into ``out``.

    ``qlora="nf4"`` or ``"nf4-dq"`` merges LoRA adapters onto bitsandbytes' NF4 round trip of
    the weights they target (double quantized or not), as QLoRA trained them; ``qlora_dtype``
    is the dtype the trainer loaded the base in before quantizing it (default: the base's).

    ``format`` is what OUT holds: ``"hf"`` (sharded safetensors at most ``max_shard_size``
    each, 5GB by default, with the config and tokenizer files), ``"gguf"`` (the GGUF file
    llama.cpp's ``convert_hf_to_gguf.py --outtype OUTTYPE`` would write for that result; f32,
    f16, bf16 or q8_0, by default the result's dtype; split as llama.cpp splits when
    ``max_shard_size`` is given) or ``"meta"`` (Meta's ``consolidated.NN.pth`` in ``mp``
    model-parallel shards, 1 by default, with ``params.json`` and ``tokenizer.model``).

    Raises a :class:`~deltamerge.errors.DeltaMergeError` with a one-line message on any failure,
    and then leaves nothing at ``out``. An interrupted run (Ctrl-C, SIGTERM, a failed write)
    keeps its partial folder beside ``out``; ``resume=True`` finishes it, re-checking the shards
    recorded as finished (read back and hashed) and redoing the others. One run at a time
    writes to ``out``: a second is refused while the first holds its lock.
    """
    deltas = [delta] if isinstance(delta, (str, Path)) else list(delta)
    out = Path(out).expanduser()
    out_dtype = parse_user_dtype(dtype)
    if new_rows not in ("zero", "mean"):
        raise InputError(f"--new-rows must be 'zero' or 'mean', not {new_rows!r}")
    if qlora is not None and qlora not in QLORA_MODES:
        raise InputError(f"--qlora must be one of {', '.join(QLORA_MODES)}, not {qlora!r}")
    if qlora_dtype is not None and qlora is None:
        raise InputError("--qlora-dtype is the dtype the base was quantized from: it needs --qlora")
    quant_dtype = parse_user_dtype(qlora_dtype)
    fmt = output_format(format, outtype=outtype, mp=mp, max_shard_size=max_shard_size)
    inputs = [(base, "base"), *((d, "delta") for d in deltas)]
    refuse_overlap(out, [(str(g), input_region(g, role)) for g, role in inputs])
    check_out(out, force)
    with hold(out):
        check_out(out, force)  # again under the lock: a run that held it may have published
        return _apply_locked(
            base, deltas, out, kind=kind, out_dtype=out_dtype, new_rows=new_rows,
            fmt=fmt, block_size=block_size, force=force, verify=verify,
            workers=workers or 1, progress=progress, extra_files=extra_files, hub=hub,
            expect_md5=expect_md5, resume=resume, qlora=qlora, quant_dtype=quant_dtype,
        )


def _apply_locked(
    base: PathLike, deltas: list[PathLike], out: Path, *, kind: str | None,
    out_dtype: torch.dtype | None, new_rows: str, fmt: OutputFormat, block_size: int,
    force: bool, verify: bool, workers: int, progress: bool | Callable[[int, int], None],
    extra_files: dict[str, Path | bytes] | None, hub: dict | None,
    expect_md5: PathLike | None, resume: bool, qlora: str | None,
    quant_dtype: torch.dtype | None,
) -> ApplyResult:
    """The run itself, under OUT's lock: nothing of OUT or its partial folder is touched before."""
    # Hub inputs: pair tensors and check space before the big downloads.
    hub = preflight(base, deltas, kind=kind, **(hub or {}))
    base_in = resolve_input(base, "base", **hub)
    delta_ins = [resolve_input(d, "delta", **hub) for d in deltas]
    if kind == "xor-files" or (kind is None and any(
        detect_kind(d.path, None) == "xor-files" for d in delta_ins
    )):
        if qlora is not None:
            raise InputError("--qlora merges LoRA adapters: it does not apply to xor-files deltas")
        if fmt.name != "hf":
            raise InputError(f"--format {fmt.name}: xor-files deltas decode the publisher's files as "
                             "they are: decode with --format hf")
        return _apply_xor_files(base_in, delta_ins, out, out_dtype, force, verify, expect_md5,
                                progress)
    if expect_md5 is not None:
        raise InputError("--expect-md5 checks whole decoded files: it applies to xor-files deltas")

    base_ckpt = open_checkpoint(base_in.path)
    opened: list[Kind] = []
    try:
        # The manifest names the kind even when its checks are skipped: without it an XOR delta
        # would be added as if additive. --no-verify with --kind does not read it at all.
        found = [find_manifest(d.path) if verify or kind is None else None for d in delta_ins]
        for d, m in zip(delta_ins, found):
            opened.append(open_kind(kind or detect_kind(d.path, m), d.path))
        manifests = found if verify else [None] * len(delta_ins)
        if qlora is not None and not any(k.name == "lora" for k in opened):
            raise InputError("--qlora merges LoRA adapters onto the NF4 base: no delta is a LoRA")
        options = ApplyOptions(new_rows=new_rows, qlora=qlora, qlora_dtype=quant_dtype)
        jobs = plan_chain(base_ckpt, opened, options, out_dtype, block_size)
        if new_rows == "mean":
            fill_means(base_ckpt, jobs, block_size)
        aux = _aux_files(base_ckpt, opened, extra_files)
        shards, sink = _plan_output(fmt, jobs, aux, out, block_size)
        hashers = _delta_file_hashers(delta_ins, manifests) if verify else {}
        expected_base = manifests[0].base.tensors if manifests and manifests[0] else None
        options_record = {"kind": [k.name for k in opened], "dtype": str(out_dtype),
                          "new_rows": new_rows, "verify": verify, "version": __version__,
                          **fmt.options()}
        if qlora is not None:
            options_record.update(qlora=qlora, qlora_dtype=str(quant_dtype))
        fp = fingerprint([base_in.path, *(d.path for d in delta_ins)], options_record, shards)
        tmp, journal = _open_partial(out, fp, resume)
        try:
            checked = recheck(
                tmp, shards, journal, sink=sink, block_bytes=block_size, workers=workers,
                progress=progress,
            ) if resume else None
            skip = set(journal.done)
            check_free_space(out.parent, sink.planned_bytes(shards, skip))
            bar = make_progress(progress, sum(
                j.out.nbytes for s in shards if s.filename not in skip for j in s.jobs), "rebuilding")
            engine = Engine(
                base_ckpt, shards, tmp, sink=sink, block_bytes=block_size,
                workers=workers, expected_base=expected_base, file_hashers=hashers,
                progress=bar.update, skip_shards=skip, on_shard_done=journal.record,
            )
            try:
                run = engine.run()
                sink.finish(tmp)
            except BaseException:
                sink.abort()
                raise
            finally:
                bar.close()
            out_digests = dict(run.out_digests)
            written = dict(run.written_digests)
            for shard, digests in (checked.kept if checked else {}).items():
                out_digests.update(digests)
                written.update(checked.written[shard])  # computed by this run's re-check
            _check_files(delta_ins, manifests, run.file_digests)
            if fmt.name == "hf":
                write_index(tmp, shards)
            copy_aux(tmp, sink.aux_files(aux))
            fix_config(tmp, _vocab_rows(jobs), _result_dtype(jobs))
            merged = model_digest(out_digests)
            digest = model_digest(written) if sink.converts else merged
            files = sink.outputs() or [s.filename for s in shards]
            result = ApplyResult(
                out, [k.name for k in opened], len(jobs), files,
                run.bytes_read + (checked.bytes_read if checked else 0), run.bytes_written,
                run.seconds + (checked.seconds if checked else 0), peak_rss_bytes(), digest,
                format=fmt.name, merged_digest=merged if sink.converts else None,
            )
            if checked and (checked.kept or checked.redone):
                result.notes.append(checked.note())
            _compare_result(result, manifests, out_digests, out_dtype, new_rows, qlora)
            record = _record(base_in, delta_ins, result, written if sink.converts else out_digests,
                             out_dtype, new_rows)
            record["options"].update(fmt.options())
            if sink.converts:
                record["merged"] = Role.of(out_digests).to_json()
            if qlora is not None:
                record["options"].update(
                    qlora=qlora, qlora_dtype=str(quant_dtype).removeprefix("torch.")
                    if quant_dtype else None)
            write_json(tmp / RESULT_RECORD, record)
            faults.reached("publish")
            publish(tmp, out)
            (out / journal.path.name).unlink(missing_ok=True)
            return result
        except (KeyboardInterrupt, WorkError) as exc:
            if isinstance(exc, DiskSpaceError):
                if not journal.done:
                    discard(tmp)
                raise
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            raise InterruptedRun(
                f"{reason}; the partial result is kept in {tmp}: run the same command with "
                f"--resume to finish it"
            ) from exc
        except BaseException:
            discard(tmp)
            raise
    finally:
        for k in opened:
            k.close()
        base_ckpt.close()


def _plan_output(
    fmt: OutputFormat, jobs: list[TensorJob], aux: dict[str, Path | bytes], out: Path, block_size: int
) -> tuple[list[Shard], Sink]:
    """The shards the ``hf`` format would write (GGUF's tensor order follows them), and the
    format's sink planned from them; tensors are written in the plan's order (the inputs' own,
    so they are read front to back), in blocks of whole heads where the sink reorders rows within
    heads."""
    shards = layout_shards(jobs, fmt.shard_bytes if fmt.name == "hf" else parse_size(DEFAULT_SHARD_SIZE))
    if fmt.name != "hf":  # journal names: no safetensors file is written
        shards = [Shard(f"tensors-{i + 1:05d}-of-{len(shards):05d}", s.jobs) for i, s in enumerate(shards)]
    sink = open_sink(fmt, shards, aux, vocab_rows=_vocab_rows(jobs), dtype=_result_dtype(jobs), out=out,
                     folder=partial_dir(out))
    for job in jobs:
        job.rows_per_block = rows_per_block(job, block_size, sink.row_multiple(job.name))
    return shards, sink


def _open_partial(out: Path, fp: str, resume: bool) -> tuple[Path, Journal]:
    """The partial folder and its journal: fresh, or an earlier run's when resuming."""
    tmp = partial_dir(out)
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        raise InputError(f"{tmp}: not a folder an interrupted run left (a symlink or a file): "
                         f"delete it")
    if tmp.exists():
        if not resume:
            raise InputError(
                f"{out}: an interrupted run left {tmp}: run the same command with --resume to "
                f"finish it, or delete that folder"
            )
        return tmp, Journal.resume(tmp, fp, "the same command")
    tmp.mkdir(parents=True)
    return tmp, Journal.start(tmp, fp)


def _apply_xor_files(
    base: Resolved, deltas: list[Resolved], out: Path, out_dtype: torch.dtype | None,
    force: bool, verify: bool, expect_md5: PathLike | None, progress,
) -> ApplyResult:
    """Whole-file XOR deltas (OpenAssistant) are decoded alone, byte for byte, in kinds/xor_files."""
    if len(deltas) != 1:
        raise InputError(f"{deltas[0].given}: a xor-files delta is decoded alone, not in a chain")
    if out_dtype is not None:
        raise InputError("--dtype does not apply to xor-files deltas: the files are decoded as is")
    md5_list = Path(expect_md5).expanduser() if expect_md5 is not None and verify else None
    return apply_xor_files(
        base.path, deltas[0].path, out, force=force, expect_md5=md5_list, progress=progress
    )


def plan_chain(
    base: Checkpoint,
    kinds: list[Kind],
    options: ApplyOptions,
    out_dtype: torch.dtype | None,
    block_bytes: int,
) -> list[TensorJob]:
    """Fold the deltas over the base's tensors, then make one job per output tensor."""
    specs = dict(base.specs)
    steps: dict[str, list] = {n: [] for n in specs}
    for k in kinds:
        specs, new = k.plan(specs, options)
        for name, step in new.items():
            if step.first_pass and (steps.get(name) or name not in base.specs):
                raise UnsupportedError(
                    f"tensor {name!r}: the {k.name} delta at {k.folder} needs the base's own rows "
                    "(--qlora nf4-dq), but an earlier delta changes them: apply that one first, "
                    "in a run of its own"
                )
            steps.setdefault(name, []).append(step)
    jobs = []
    for name, spec in specs.items():
        if out_dtype is not None and spec.dtype.is_floating_point and not is_non_weight(name):
            spec = TensorSpec(name, out_dtype, spec.shape)
        job = TensorJob(
            spec, base.specs.get(name), steps.get(name, []), fill=options.new_rows
        )
        if job.base is None and not job.steps:
            raise InputError(f"tensor {name!r}: no source for it (internal planning error)")
        job.rows_per_block = rows_per_block(job, block_bytes)
        jobs.append(job)
    return jobs


def fill_means(base: Checkpoint, jobs: list[TensorJob], block_bytes: int) -> None:
    """The fp32 mean of the base's rows, for rows a delta adds (Alpaca's resize).

    Accumulated in fp64 block by block: exact for fp16 weights whatever the block size.
    """
    for job in jobs:
        if job.base is None or job.out.rows <= job.base_rows or job.base_rows == 0:
            continue
        total = torch.zeros(job.base.shape[1:], dtype=torch.float64)
        buf = torch.empty(job.rows_per_block * job.base.row_numel * 8, dtype=torch.uint8)
        for r0 in range(0, job.base_rows, job.rows_per_block):
            r1 = min(job.base_rows, r0 + job.rows_per_block)
            total += base.read_rows(job.base.name, r0, r1, buf).to(torch.float64).sum(dim=0)
        job.mean = (total / job.base_rows).to(torch.float32)


def _delta_file_hashers(
    delta_ins: list[Resolved], manifests: list[Manifest | None]
) -> dict[Path, FileHasher]:
    hashers = {}
    for d, m in zip(delta_ins, manifests):
        if m is None:
            continue
        for name in m.files:
            path = inside(d.path, name, d.path / MANIFEST_NAME)
            if path.is_file() and path.stat().st_size > 1 << 20:
                hashers[path] = FileHasher(path)
    return hashers


def _check_files(
    delta_ins: list[Resolved], manifests: list[Manifest | None], streamed: dict[Path, str]
) -> None:
    """Every file the manifest lists must be present with its sha256."""
    for d, m in zip(delta_ins, manifests):
        if m is None:
            continue
        for name, info in m.files.items():
            path = inside(d.path, name, d.path / MANIFEST_NAME)
            if not path.is_file():
                raise VerificationError(f"{path}: listed in {MANIFEST_NAME} but missing")
            sha = streamed.get(path) or file_sha256(path)
            if sha != info["sha256"]:
                raise VerificationError(
                    f"{path}: sha256 {sha[:16]}… does not match {MANIFEST_NAME} "
                    f"({info['sha256'][:16]}…): the file is corrupt or was changed"
                )


def _aux_files(
    base: Checkpoint, kinds: list[Kind], extra: dict[str, Path | bytes] | None
) -> dict[str, Path | bytes]:
    """Each non-weight file from the last delta that has it, else from the base."""
    files: dict[str, Path | bytes] = dict(base.aux_files())
    for k in kinds:
        files.update(k.aux_files())
    files.update(extra or {})
    return {n: f for n, f in files.items() if n in AUX_FILES or (extra and n in extra)}


def _vocab_rows(jobs: list[TensorJob]) -> int | None:
    for job in jobs:
        if job.name.endswith(VOCAB_TENSORS[0]) and job.out.shape:
            return job.out.rows
    return None


def _result_dtype(jobs: list[TensorJob]) -> str | None:
    """The dtype most of the result's weights are written in: the one config.json must name."""
    elements: Counter[torch.dtype] = Counter()
    for job in jobs:
        if job.out.dtype.is_floating_point and not is_non_weight(job.name):
            elements[job.out.dtype] += job.out.numel
    return short_name(elements.most_common(1)[0][0]) if elements else None


def _compare_result(
    result: ApplyResult,
    manifests: list[Manifest | None],
    digests: dict[str, TensorDigest],
    out_dtype: torch.dtype | None,
    new_rows: str,
    qlora: str | None = None,
) -> None:
    """The publisher's digests are of Hugging Face tensors: compared with the merge's (for gguf and
    meta, as computed before conversion)."""
    last = manifests[-1] if manifests else None
    if last is None:
        return
    result.publisher_digest = last.result.model_digest
    merged = result.merged_digest or result.model_digest
    if merged == last.result.model_digest:
        result.verified = True
        return
    if out_dtype is not None or qlora or new_rows != last.options.get("new_rows", "zero"):
        result.notes.append(
            "options differ from the publisher's (--dtype/--new-rows/--qlora): result not compared"
        )
        return
    names = sorted(
        n for n in set(digests) | set(last.result.tensors)
        if digests.get(n) != last.result.tensors.get(n)
    )
    raise VerificationError(
        f"result does not match the publisher's: model digest {merged[:16]}…, "
        f"expected {last.result.model_digest[:16]}…; {len(names)} tensors differ, first "
        f"{names[0]!r}" if names else "result does not match the publisher's model digest"
    )


def _record(
    base: Resolved,
    deltas: list[Resolved],
    result: ApplyResult,
    digests: dict[str, TensorDigest],
    out_dtype: torch.dtype | None,
    new_rows: str,
) -> dict:
    """Provenance of the result: what it was made from, how, and its digests (a result role)."""
    return {
        "deltamerge_version": __version__,
        "base": base.describe(),
        "deltas": [dict(d.describe(), kind=k) for d, k in zip(deltas, result.kinds)],
        "options": {"dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None,
                    "new_rows": new_rows},
        "result": Role.of(digests).to_json(),
        "publisher_digest": result.publisher_digest,
    }
