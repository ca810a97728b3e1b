"""``apply_delta``: rebuild a model from a base and one or more deltas, streaming.

The data flows one way: resolve the inputs, plan (pair tensors, check shapes, lay out shards,
plan the output format's files), stream (the engine, writing through the format's sink), verify
(the publisher's digests), publish (rename into OUT).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from . import arguments as args
from .compute_pool import ComputePool
from .decoders.enc import apply_enc
from .decoders.xor_files import apply_xor_files
from .dtypes import itemsize, short_name
from .engine import Engine
from .engine.cascade_sum import TorchRowSum
from .engine.journal import JOURNAL_NAME, Fingerprint
from .engine.lifecycle import locked_out, partial_run
from .engine.plan import Shard, TensorJob, layout_shards, rows_per_block
from .engine.recheck import recheck
from .errors import InputError, UnsupportedError, VerificationError
from .formats.files import json_parsed_once, read_json_object
from .integrity.checks import checksum
from .integrity.delta_checks import finish_delta_checks, plan_delta_checks
from .integrity.digest import DEFAULT_ALGORITHM, TensorDigest, model_digest
from .integrity.manifest import Manifest, Role, check_base_dtypes, find_manifest
from .integrity.signing import SignatureCheck, SignerPin, check_folder
from .kinds import ApplyOptions, Kind, is_non_weight
from .kinds.add import VOCAB_TENSORS
from .kinds.detect import WHOLE_FILE_KINDS, detect_kind, open_kind, whole_file_kind
from .kinds.enc import OPENBUDDY_KEY_MD5
from .memory import peak_rss_bytes
from .options import RunOptions
from .outputs import OutputFormat
from .preflight import preflight
from .progress import make_progress, reports_progress
from .results import RESULT_RECORD, ApplyResult
from .sinks import Sink
from .sinks.aux import aux_bytes, copy_aux, fix_config
from .sinks.folder import check_free_space, check_out, partial_dir, write_json
from .sinks.safetensors import write_index
from .sizes import DEFAULT_SHARD_SIZE, parse_size
from .sources import Checkpoint, open_checkpoint
from .sources.folders import is_aux_file
from .sources.inputs import Resolved, hub_repo_id, need_folders
from .sources.resolve import resolve_input
from .tensor_spec import TensorSpec
from .version import __version__

PathLike = str | Path


@reports_progress
def apply_delta(
    base: PathLike,
    delta: PathLike | Sequence[PathLike],
    out: PathLike,
    *,
    kind: str | None = None,
    dtype: str | torch.dtype | None = None,
    new_rows: str = "zero",
    max_shard_size: str | int | None = None,
    block_size: int | str | None = None,
    force: bool = False,
    verify: bool = True,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    extra_files: dict[str, Path | bytes] | None = None,
    hub: dict | None = None,
    expect_md5: PathLike | None = None,
    key_md5: str | None = None,
    resume: bool = False,
    qlora: str | None = None,
    qlora_dtype: str | torch.dtype | None = None,
    qlora_scope: str | None = None,
    qlora_kernel: str | None = None,
    safe_merge: bool = False,
    lora_r: int | None = None,
    lora_alpha: float | None = None,
    lora_prefix: str | None = None,
    format: str = "hf",
    outtype: str | None = None,
    mp: int | None = None,
    allow_repeat: bool = False,
    signer: SignerPin | None = None,
    threads: int | None = None,
) -> ApplyResult:
    """Rebuild ``base`` + ``delta`` (or a chain of deltas, applied in order) into ``out``.

    One pass reads each byte of the inputs once, writes the result, and hashes it: a result the
    publisher's manifest describes is verified as it is written, not read again afterwards.
    Arguments of the wrong type are an :class:`~deltamerge.errors.InputError` naming them.

    Args:
        base: the base model: a folder, a weight file, or a Hub repo id (``REPO@REV``).
        delta: one delta (folder, file or repo id), or several applied in order. The same delta
            twice is refused (a slip: it would be applied twice) unless ``allow_repeat``.
        out: the folder to create; it must be absent or empty unless ``force``.
        kind: the delta's kind (``add``, ``xor``, ``lora``, ...); by default read from the delta.
        dtype: the result's dtype; by default the one config.json names.
        new_rows: ``"zero"`` or ``"mean"``: what rows a delta adds to the vocabulary start from.
        max_shard_size: bytes (or e.g. ``"5GB"``) per output shard; 5GB by default.
        block_size: bytes (or e.g. ``"24MB"``) bounding each row block's buffers (default 24 MiB;
            16 MiB for a llama-quantize ``outtype``, whose runs load numba's compiler).
        force: replace a non-empty ``out`` (at publish, so a failed run leaves it untouched).
        verify: check the result against the delta's manifest as it is written.
        workers: threads for the stream; 1 by default (the CLI picks from the CPUs).
        progress: show bars, or a ``callback(done_bytes, total_bytes)``.
        extra_files: plain file names mapped to the bytes (or the path of a file) to add to OUT.
        hub: ``endpoint``, ``token`` or ``api`` for inputs that are Hub repo ids.
        expect_md5: the release's md5 list, for ``xor-files`` deltas (decoded alone).
        key_md5: the md5 an ``enc`` delta's key must have (OpenBuddy's by default).
        resume: finish the partial folder an interrupted run left beside ``out``, re-checking
            the shards it recorded as finished (read back and hashed) and redoing the others.
        qlora: ``"nf4"`` or ``"nf4-dq"``: merge LoRA adapters onto bitsandbytes' NF4 round trip
            of the weights they target (double quantized or not), as QLoRA trained them.
        qlora_dtype: the dtype the trainer loaded the base in before quantizing it (default:
            the base's).
        qlora_scope: with ``qlora``: ``"all-linear"`` (the default) rounds every Linear layer
            bitsandbytes quantized in training (all but the output layer and the embeddings);
            ``"targets"`` only the layers the adapter targets.
        qlora_kernel: with ``qlora``: whose bitsandbytes kernels quantized the base: ``"cuda"``
            (the default: the GPU's, where QLoRA trained) or ``"cpu"``.
        safe_merge: merge as peft's ``merge_and_unload(safe_merge=True)``: each Linear layer's
            product is rounded to the weight's dtype before it is added (rounded twice); by
            default as ``merge_and_unload()``, rounded once. A merged weight that is not finite
            is then refused, as peft refuses it.
        lora_r: the rank of a LoRA state dict that has no ``adapter_config.json`` (PandaGPT's
            ``pytorch_model.pt``), with ``lora_alpha`` and ``lora_prefix`` likewise.
        lora_alpha: see ``lora_r``.
        lora_prefix: see ``lora_r``.
        format: what OUT holds: ``"hf"`` (sharded safetensors with the config and tokenizer
            files), ``"gguf"`` (the GGUF file llama.cpp's ``convert_hf_to_gguf.py --outtype
            OUTTYPE`` would write for that result, split as llama.cpp splits when
            ``max_shard_size`` is given) or ``"meta"`` (Meta's ``consolidated.NN.pth``, with
            ``params.json`` and ``tokenizer.model``).
        outtype: for ``format="gguf"``: f32, f16, bf16 or q8_0 (by default the result's dtype),
            or one of llama-quantize's (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q4_0, q4_1, q5_0,
            q5_1): the file ``llama-quantize`` writes from the converter's at the result's dtype.
        mp: for ``format="meta"``: the model-parallel shards, 1 by default.
        allow_repeat: see ``delta``.
        signer: who must have signed every delta (its ``model.sig``, OMS format): each
            signature is checked before any weight is read, and the result records who signed.
        threads: the threads that compute LoRA products and quantize a quantized ``outtype``
            (default: the cores this process may use); the bytes do not depend on it.

    Returns:
        An :class:`~deltamerge.results.ApplyResult`: where the result is, its digest, whether it
        was verified against the publisher's, its size, time and peak memory.

    Raises:
        InputError: bad arguments or inputs (its subclasses :class:`~deltamerge.errors.NotFoundError`,
            also a FileNotFoundError; :class:`~deltamerge.errors.FormatError`, also a ValueError;
            ``MismatchError``, ``UnsupportedError``, ``OutputExistsError``, and
            ``OutputBusyError`` while another run holds ``out``'s lock); nothing was written.
        VerificationError: the base or the result is not the publisher's; nothing is left at
            ``out``.
        WorkError: the run failed while working (``DiskSpaceError`` before any work;
            ``InterruptedRun`` when stopped part way: its partial folder is kept for ``resume``).
    """
    deltas = args.paths("delta", delta)
    if not deltas:
        raise InputError("delta: apply needs at least one delta (with none it would only copy "
                         "the base); convert writes a Meta checkpoint in another layout")
    base, out = args.path("base", base), args.path("out", out)
    return run_apply(base, deltas, out, RunOptions.of(
        kind=kind, dtype=dtype, new_rows=new_rows, max_shard_size=max_shard_size,
        block_size=block_size, force=force, verify=verify, workers=workers, progress=progress,
        extra_files=extra_files, hub=hub, expect_md5=expect_md5, key_md5=key_md5, resume=resume,
        qlora=qlora, qlora_dtype=qlora_dtype, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_prefix=lora_prefix, format=format, outtype=outtype, mp=mp,
        allow_repeat=allow_repeat, signer=signer, threads=threads, qlora_scope=qlora_scope,
        qlora_kernel=qlora_kernel, safe_merge=safe_merge,
    ))


def run_apply(base: PathLike, deltas: list[PathLike], out: PathLike, opts: RunOptions) -> ApplyResult:
    """:func:`apply_delta` for a chain of any length: ``convert`` applies none (writing the base
    in another layout is applying an empty chain), which the public function refuses.
    ``base`` and ``out`` are checked by the caller, before ``opts`` are built."""
    out = Path(out).expanduser()
    inputs = [(base, "base"), *((d, "delta") for d in deltas)]
    need_folders(inputs[1:])
    with locked_out(out, inputs, opts.force, lambda: finished_record(out, opts.force)) as finished:
        return _apply_locked(base, deltas, out, opts, finished)


def finished_record(out: Path, force: bool) -> dict | None:
    """OUT's result record, when OUT is a finished rebuild whose record names the run that made
    it (its fingerprint) and ``force`` is not given: the same command run again (after a Ctrl-C
    that came just after publishing, say) then finds its work done instead of being refused.
    Whether it was the same command is known once this run's plan is made."""
    path = out / RESULT_RECORD
    if force or path.is_symlink() or not path.is_file():
        return None
    try:
        record = read_json_object(path)
    except InputError:
        return None
    return record if isinstance(record.get("fingerprint"), str) else None


def _apply_locked(
    base: PathLike, deltas: list[PathLike], out: Path, opts: RunOptions, finished: dict | None
) -> ApplyResult:
    """The run itself, under OUT's lock: nothing of OUT or its partial folder is touched before."""
    local = {str(d): check_folder(Path(d).expanduser(), opts.signer)
             for d in deltas if hub_repo_id(d, "delta") is None}  # before anything reads them
    # Hub inputs: pair tensors and check space before the big downloads.
    hub = preflight(base, deltas, kind=opts.kind, verify=opts.verify, allow_repeat=opts.allow_repeat,
                    **(opts.hub or {}))
    base_in = resolve_input(base, "base", **hub)
    delta_ins = [resolve_input(d, "delta", **hub) for d in deltas]
    signed = [local.get(str(g)) or check_folder(d.path, opts.signer, symlinks=True)  # a Hub snapshot
              for g, d in zip(deltas, delta_ins)]
    if opts.kind is None:
        whole = next((k for d in delta_ins if (k := whole_file_kind(d.path))), None)
    else:
        whole = opts.kind if opts.kind in WHOLE_FILE_KINDS else None
    if whole != "enc":  # OpenBuddy's key is a file: BASE may be Meta's consolidated.00.pth
        need_folders([(base, "base")])
    if whole is not None:
        if finished is not None:
            check_out(out, opts.force)  # a whole-file decode's record holds no fingerprint to match
        if opts.qlora is not None:
            raise InputError(f"--qlora merges LoRA adapters: it does not apply to {whole} deltas")
        if not opts.fmt.whole_files:
            raise InputError(f"--format {opts.fmt.name}: {whole} deltas decode the publisher's files as "
                             "they are: decode with --format hf")
        return _signed(_apply_whole_files(whole, base_in, delta_ins, out, opts), delta_ins, signed)
    _refuse_md5_options(None, opts.expect_md5, opts.key_md5)

    opened: list[Kind] = []
    base_ckpt: Checkpoint | None = None
    pool = ComputePool(opts.threads)  # LoRA products and GGUF quantization, on --threads
    planning = ExitStack()  # side files parsed once while the run is planned (json_parsed_once)
    try:
        planning.enter_context(json_parsed_once())
        base_ckpt = open_checkpoint(base_in.path)
        # The manifest names the kind even when its checks are skipped: without it an XOR delta
        # would be added as if additive. --no-verify with --kind does not read it at all.
        found = [find_manifest(d.path) if opts.verify or opts.kind is None else None
                 for d in delta_ins]
        for d, m in zip(delta_ins, found):
            opened.append(open_kind(opts.kind or detect_kind(d.path, m), d.path))
        manifests = found if opts.verify else [None] * len(delta_ins)
        if opts.qlora is not None and not any(k.name == "lora" for k in opened):
            raise InputError("--qlora merges LoRA adapters onto the NF4 base: no delta is a LoRA")
        if manifests and manifests[0]:
            check_base_dtypes(str(base), base_ckpt.specs, manifests[0].base)
        options = opts.kind_options(pool)
        _check_lora_options(opened, options)
        jobs = plan_chain(base_ckpt, opened, options, opts.dtype, opts.block_size)
        if opts.new_rows == "mean":
            fill_means(base_ckpt, jobs, opts.block_size)
        aux = _aux_files(base_ckpt, opened, opts.extra_files)
        updates = _config_updates(opened)
        shards, sink = _plan_output(opts.fmt, jobs, aux, out, opts.block_size, updates, pool)
        planning.close()  # the parsed side files go before the engine runs
        checks = plan_delta_checks([d.path for d in delta_ins], manifests,
                                   [k.checkpoint for k in opened])
        first = manifests[0] if manifests else None
        base_algorithm = first.algorithm if first else DEFAULT_ALGORITHM
        out_algorithm = _result_algorithm(manifests, opts.dtype, opts.new_rows)
        fp = opts.fingerprint([base_in.path, *(d.path for d in delta_ins)],
                              [k.name for k in opened], out_algorithm, shards)
        if finished is not None:
            if finished["fingerprint"] != fp.digest:
                check_out(out, opts.force)  # made by another command, or from other inputs: refused
            return _already_finished(out, finished, [k.name for k in opened], len(jobs),
                                     sink.outputs() or [s.filename for s in shards], opts.fmt.name)
        with partial_run(out, fp, resume=opts.resume, force=opts.force, kept="the partial result",
                         rerun_finds_it=True) as partial:
            tmp, journal = partial.folder, partial.journal
            checked = recheck(
                tmp, shards, journal, sink=sink, block_bytes=opts.block_size,
                workers=opts.workers, progress=opts.progress,
            ) if opts.resume else None
            skip = set(journal.done)
            check_free_space(out.parent, sink.planned_bytes(shards, skip)
                             + aux_bytes(sink.aux_files(aux)))
            bar = make_progress(opts.progress, sum(
                j.out.nbytes for s in shards if s.filename not in skip for j in s.jobs), "rebuilding")
            engine = Engine(
                base_ckpt, shards, tmp, sink=sink, block_bytes=opts.block_size,
                workers=opts.workers, expected_base=first.base.tensors if first else None,
                base_algorithm=base_algorithm, out_algorithm=out_algorithm,
                expected_inputs=checks.expected_inputs, file_hashers=checks.file_hashers,
                progress=bar.update, at=bar.at, skip_shards=skip, on_shard_done=journal.record,
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
                out_digests.update(digests)  # computed by this run's re-check, not the journal's
                written.update(checked.written[shard])  # computed by this run's re-check
            finish_delta_checks(checks, run.input_digests, run.file_digests, opts.block_size)
            if opts.fmt.shard_files:
                write_index(tmp, shards)
            copy_aux(tmp, sink.aux_files(aux))
            fix_config(tmp, _vocab_rows(jobs), _result_dtype(jobs), updates)
            merged = model_digest(out_digests, out_algorithm)
            digest = model_digest(written, out_algorithm) if sink.converts else merged
            files = sink.outputs() or [s.filename for s in shards]
            result = ApplyResult(
                out, [k.name for k in opened], len(jobs), files,
                run.bytes_read + (checked.bytes_read if checked else 0), run.bytes_written,
                run.seconds + (checked.seconds if checked else 0), peak_rss_bytes(), digest,
                algorithm=out_algorithm, format=opts.fmt.name,
                merged_digest=merged if sink.converts else None,
            )
            if checked and (checked.kept or checked.redone):
                result.notes.append(checked.note())
            _compare_result(result, manifests, out_digests, opts)
            _signed(result, delta_ins, signed)
            write_json(tmp / RESULT_RECORD, _record(
                base_in, delta_ins, result, written if sink.converts else out_digests, opts, fp,
                sink, out_digests))
        return result
    finally:
        planning.close()
        for k in opened:
            k.close()
        if base_ckpt is not None:
            base_ckpt.close()
        pool.close()


def _already_finished(
    out: Path, record: dict, kinds: list[str], tensors: int, files: list[str], fmt: str
) -> ApplyResult:
    """The result a run of this same command already published at OUT, as its record says;
    nothing is read or written but the journal a stop right after publishing left in OUT."""
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    result_role = record.get("result") if isinstance(record.get("result"), dict) else {}
    merged_role = record.get("merged") if isinstance(record.get("merged"), dict) else None
    digest = str(result_role.get("model_digest"))
    merged = str(merged_role.get("model_digest")) if merged_role else None
    publisher = record.get("publisher_digest")
    publisher = publisher if isinstance(publisher, str) else None
    result = ApplyResult(
        out, kinds, tensors, files, 0, 0, 0.0, peak_rss_bytes(), digest,
        publisher_digest=publisher, verified=publisher is not None and (merged or digest) == publisher,
        algorithm=str(record.get("algorithm", DEFAULT_ALGORITHM)), format=fmt, merged_digest=merged,
    )
    result.notes.append(
        f"{out} was already finished by this same command (its {RESULT_RECORD} says so): nothing "
        f"was done; `deltamerge verify {out} -m {out / RESULT_RECORD}` checks its files"
    )
    return result


def _plan_output(
    fmt: OutputFormat, jobs: list[TensorJob], aux: dict[str, Path | bytes], out: Path,
    block_size: int, config_updates: dict, pool: ComputePool,
) -> tuple[list[Shard], Sink]:
    """The shards the ``hf`` format would write (GGUF's tensor order follows them), and the
    format's sink planned from them; tensors are written in the plan's order (the inputs' own,
    so they are read front to back), in blocks of whole heads where the sink reorders rows within
    heads."""
    shards = layout_shards(jobs, fmt.plan_shard_bytes(parse_size(DEFAULT_SHARD_SIZE)))
    if not fmt.shard_files:  # journal names: no safetensors file is written
        shards = [Shard(f"tensors-{i + 1:05d}-of-{len(shards):05d}", s.jobs) for i, s in enumerate(shards)]
    sink = fmt.open_sink(shards, aux, vocab_rows=_vocab_rows(jobs), dtype=_result_dtype(jobs), out=out,
                         folder=partial_dir(out), config_updates=config_updates, pool=pool)
    for job in jobs:
        job.rows_per_block = rows_per_block(job, block_size, sink.row_multiple(job.name))
    return shards, sink


def _refuse_md5_options(kind: str | None, expect_md5: PathLike | None, key_md5: str | None) -> None:
    """Each md5 option belongs to one whole-file kind (``kind``: the delta's, None for others)."""
    if expect_md5 is not None and kind != "xor-files":
        raise InputError("--expect-md5 checks whole decoded files: it applies to xor-files deltas")
    if key_md5 is not None and kind != "enc":
        raise InputError("--key-md5 is the md5 of an OpenBuddy key: it applies to enc deltas")


def _apply_whole_files(
    kind: str, base: Resolved, deltas: list[Resolved], out: Path, opts: RunOptions
) -> ApplyResult:
    """Whole-file XOR deltas (OpenAssistant's, OpenBuddy's) are decoded alone, byte for byte."""
    if len(deltas) != 1:
        raise InputError(f"{deltas[0].given}: a {kind} delta is decoded alone, not in a chain")
    if opts.dtype is not None:
        raise InputError(f"--dtype does not apply to {kind} deltas: the files are decoded as is")
    _refuse_md5_options(kind, opts.expect_md5, opts.key_md5)
    if kind == "enc":
        return apply_enc(
            base.path, deltas[0].path, out, force=opts.force, progress=opts.progress,
            key_md5=opts.key_md5 or OPENBUDDY_KEY_MD5,
            model_digest=lambda folder: _tensor_digests(folder, opts.progress),
            resume=opts.resume, workers=opts.workers,
        )
    md5_list = (Path(opts.expect_md5).expanduser()
                if opts.expect_md5 is not None and opts.verify else None)
    return apply_xor_files(
        base.path, deltas[0].path, out, force=opts.force, expect_md5=md5_list,
        progress=opts.progress, resume=opts.resume, workers=opts.workers,
    )


def _tensor_digests(folder: Path, progress) -> tuple[str, dict]:
    """The model digest of a decoded folder, and its tensors' digests as a result record has them."""
    summed = checksum(folder, progress=progress)
    return summed.model_digest, Role.of(summed.tensors).to_json()


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

    Alpaca's ``mean(dim=0)`` of the fp32 rows is torch's CPU sum then a division, with the sum's
    additions in torch's order: :class:`~deltamerge.engine.cascade_sum.TorchRowSum` makes the same
    additions a block of rows at a time, so the mean is Alpaca's bit for bit.
    """
    for job in jobs:
        if job.base is None or job.out.rows <= job.base_rows or job.base_rows == 0:
            continue
        summed = TorchRowSum(job.base_rows, job.base.row_numel)
        buf = torch.empty(job.rows_per_block * job.base.row_numel * itemsize(job.base.dtype),
                          dtype=torch.uint8)
        for r0 in range(0, job.base_rows, job.rows_per_block):
            r1 = min(job.base_rows, r0 + job.rows_per_block)
            rows = base.read_rows(job.base.name, r0, r1, buf)
            summed.add(rows.reshape(r1 - r0, -1).to(torch.float32))
        job.mean = summed.mean().reshape(job.base.shape[1:])


def _result_algorithm(
    manifests: list[Manifest | None], out_dtype: torch.dtype | None, new_rows: str
) -> str:
    """The result is hashed in the algorithm of the digest it is compared with: the last
    manifest's when its result role applies (sha256 for format 1), BLAKE3 otherwise."""
    last = manifests[-1] if manifests else None
    if last is None or out_dtype is not None or new_rows != last.options.get("new_rows", "zero"):
        return DEFAULT_ALGORITHM
    return last.algorithm


def _aux_files(
    base: Checkpoint, kinds: list[Kind], extra: dict[str, Path | bytes] | None
) -> dict[str, Path | bytes]:
    """Each non-weight file from the last delta that has it, else from the base."""
    files: dict[str, Path | bytes] = dict(base.aux_files())
    for k in kinds:
        files.update(k.aux_files())
    files.update(extra or {})
    return {n: f for n, f in files.items() if is_aux_file(n) or (extra and n in extra)}


def _config_updates(kinds: list[Kind]) -> dict:
    """config.json fields the deltas set (a P-tuning checkpoint's pre_seq_len), the last one's win."""
    updates: dict = {}
    for k in kinds:
        updates.update(k.config_updates())
    return updates


def _check_lora_options(kinds: list[Kind], options: ApplyOptions) -> None:
    """--lora-r/--lora-alpha/--lora-prefix describe a bare LoRA state dict; refuse them unused."""
    given = [n for n, v in (("--lora-r", options.lora_r), ("--lora-alpha", options.lora_alpha),
                            ("--lora-prefix", options.lora_prefix)) if v is not None]
    if given and not any(getattr(k, "bare", False) for k in kinds):
        raise InputError(
            f"{given[0]} describes a LoRA state dict without adapter_config.json, and no delta "
            "is one (an adapter's own config gives its rank and alpha)"
        )


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
    opts: RunOptions,
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
    if opts.dtype is not None or opts.qlora or opts.new_rows != last.options.get("new_rows", "zero"):
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


def _signed(result: ApplyResult, deltas: list[Resolved], checks: list[SignatureCheck]) -> ApplyResult:
    """Who signed each signed delta (verified against the pin, or said to be unchecked)."""
    result.signatures = [{**d.describe(), **c.to_json()} for d, c in zip(deltas, checks) if c.signed]
    result.notes.extend(note for c in checks for note in c.notes)
    return result


def _record(
    base: Resolved,
    deltas: list[Resolved],
    result: ApplyResult,
    digests: dict[str, TensorDigest],
    opts: RunOptions,
    fp: Fingerprint,
    sink: Sink,
    merged: dict[str, TensorDigest],
) -> dict:
    """Provenance of the result: what it was made from, how, and its digests (a result role, of
    the tensors as written; for a sink that converts them, ``merged``: the merge's own)."""
    return {
        "deltamerge_version": __version__,
        "base": base.describe(),
        "deltas": [dict(d.describe(), kind=k) for d, k in zip(deltas, result.kinds)],
        "options": opts.record(),
        "algorithm": result.algorithm,
        "result": Role.of(digests, result.algorithm).to_json(),
        "publisher_digest": result.publisher_digest,
        **({"signatures": result.signatures} if result.signatures else {}),
        **sink.record(),
        "fingerprint": fp.digest,
        **({"merged": Role.of(merged, result.algorithm).to_json()} if sink.converts else {}),
    }
