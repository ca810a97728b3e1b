"""``convert``: Meta's original LLaMA layout to a Hugging Face folder (or GGUF, or Meta's layout
in another number of model-parallel shards), streamed.

Applying no delta to a base is writing the base, so conversion is :func:`apply_delta`'s run
with an empty chain (which the public function refuses): the Meta reader joins and permutes
shards row block by row block, and the engine writes the result in ``format`` (by default
sharded safetensors with the config and tokenizer files the reader generates).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from . import arguments as args
from .apply import run_apply
from .errors import InputError
from .options import RunOptions
from .outputs import OUTPUT_FORMATS
from .progress import reports_progress
from .results import ApplyResult
from .sources.folders import detect_layout
from .sources.inputs import need_folders
from .sources.meta import TOKENIZER


@reports_progress
def convert(
    meta_dir: str | Path,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    block_size: int | str | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: bool | Callable[[int, int], None] = False,
    resume: bool = False,
    format: str = "hf",
    outtype: str | None = None,
    mp: int | None = None,
    threads: int | None = None,
) -> ApplyResult:
    """Write the Hugging Face layout of a Meta checkpoint folder (``params.json`` + ``.pth``), or
    the ``format`` :func:`~deltamerge.apply.apply_delta` names.

    The same engine as :func:`~deltamerge.apply.apply_delta` with no delta, so a conversion is
    streamed, hashed and resumable alike. The tokenizer comes along (``tokenizer.model`` from
    the folder or its parent, with its own settings files); without one the weights are still
    written, and the result's notes say so.

    Args:
        meta_dir: the folder of ``params.json`` and ``consolidated.NN.pth``.
        out: the folder to create; it must be absent or empty unless ``force``.
        dtype: the result's dtype; by default the checkpoint's.
        max_shard_size: bytes (or e.g. ``"5GB"``) per output shard; 5GB by default.
        block_size: bytes (or e.g. ``"24MB"``) bounding each row block's buffers.
        force: replace a non-empty ``out`` (at publish).
        workers: threads for the stream; 1 by default (the CLI picks from the CPUs).
        progress: show bars, or a ``callback(done_bytes, total_bytes)``.
        resume: finish the partial folder an interrupted run left beside ``out``.
        format: ``"hf"``, ``"gguf"`` or ``"meta"``, as for :func:`~deltamerge.apply.apply_delta`.
        outtype: for ``format="gguf"``: f32, f16, bf16 or q8_0.
        mp: for ``format="meta"``: the model-parallel shards.

    Returns:
        An :class:`~deltamerge.results.ApplyResult` describing the converted model.

    Raises:
        InputError: bad arguments; ``meta_dir`` missing (``NotFoundError``, also a
            FileNotFoundError), not Meta's layout or malformed (``FormatError``, also a
            ValueError); ``out`` taken or locked. Nothing was written.
        WorkError: the run failed while working; an ``InterruptedRun`` keeps its partial folder
            for ``resume``.
    """
    meta_dir = args.path("meta_dir", meta_dir)
    need_folders([(meta_dir, "meta_dir")])
    layout = detect_layout(Path(meta_dir).expanduser())
    if layout.format != "meta":
        raise InputError(f"{meta_dir}: not a Meta-layout folder (params.json, consolidated.*.pth)")
    result = run_apply(meta_dir, [], args.path("out", out), RunOptions.of(
        dtype=dtype, max_shard_size=max_shard_size, block_size=block_size, force=force,
        workers=workers, progress=progress, resume=resume, format=format, outtype=outtype, mp=mp,
        threads=threads,
    ))
    if not OUTPUT_FORMATS.get(format).holds_vocab and not (result.out / TOKENIZER).is_file():
        result.notes.append(
            f"no {TOKENIZER} in {meta_dir} or its parent: the result has no tokenizer"
        )
    return result
