"""``make-delta --kind lora``: a peft LoRA adapter that approximates ``target - base``.

What it writes is what mergekit's ``mergekit-extract-lora`` writes: ``adapter_config.json``
(``peft_type`` LORA, ``r``, ``lora_alpha = r`` so peft's scale is 1, ``target_modules`` as the
set of the factored modules' last names (their full names where only some modules of a kind
changed), ``rank_pattern``/``alpha_pattern`` for a matrix too small for the rank) and
``adapter_model.safetensors`` with peft's key names
(``base_model.model.<module>.lora_A.weight``, ``lora_B.weight``). Each changed 2-D weight of a
layer gets the rank-r truncated SVD of its difference (``kinds/lora_extract.py``, streamed);
a module LoRA cannot express (the embeddings and ``lm_head``, norms and other 1-D tensors, a
Linear whose bias changed) goes to ``modules_to_save`` whole, as peft saves it
(``base_model.model.<module>.weight``, listed by its full name: peft's entries are suffixes,
and ``norm`` would also wrap every ``input_layernorm``); modules whose tensors are the base's
bits are left out. (mergekit factors the embeddings too, and saves full modules by their last
name only.)

The manifest (``deltamerge.json``) is make-delta's: the base's digests, the adapter's tensors
(its delta role), its files, and the digests of what ``apply`` rebuilds, computed by merging the
written factors onto the base through apply's own LoRA arithmetic (``kinds/lora.Factors``), so
the user's apply is checked against the publisher's result bit for bit; the weight file carries
make-delta's marks (``kinds/marks.py``, kind ``lora``). The adapter's tensors are known only as
they are made, so its file is gathered (``sinks/gathered.py``). An interrupted extraction keeps
its partial folder for ``--resume``, which checks it is the same command and starts it over
(it journals no matrices).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .delta_files import base_source, file_table
from .engine.journal import JOURNAL_NAME, fingerprint
from .engine.lifecycle import partial_run
from .engine.stream import WrittenFile
from .errors import MismatchError, UnsupportedError
from .hub.model_card import CARD_NAME
from .integrity.digest import (
    TensorDigest,
    TensorHasher,
    block_buffer,
    file_digest,
    hash_tensor,
    row_blocks,
)
from .integrity.manifest import MANIFEST_NAME, Manifest, Role
from .integrity.signing import SigningKey, sign_folder
from .kinds import Scratch, is_non_weight
from .kinds.add import VOCAB_TENSORS, check_pairing, count_differences
from .kinds.lora import ADAPTER_CONFIG, PREFIX, TOKENIZER_FILES, Factors, FactorSource
from .kinds.lora_extract import POWER_ITERATIONS, SEED, Factorization, factorize, oversampling
from .kinds.marks import Marks, delta_id
from .kinds.peft_targets import DUMMY
from .kinds.targets import LayerTypes, memory_names
from .memory import peak_rss_bytes
from .progress import make_progress
from .results import MakeDeltaResult
from .sinks.aux import copy_aux
from .sinks.folder import remove_entry
from .sinks.gathered import GatheredFile
from .sources import Checkpoint, open_checkpoint
from .sources.resolve import resolve_input
from .tensor_spec import TensorSpec
from .version import __version__

KIND = "lora"
# ONE_THREAD: torch runs on one thread while extracting. The products are thin (k columns), so
# one core keeps up with the reads; torch's other threads spin after every small product and
# took the core from the reads (a tiny model's extraction 1.5 s -> 17 s with many small blocks
# on a loaded 2-core machine); and a BLAS may split a product's sums by thread, which would make
# the adapter's bytes depend on the machine's cores.
ADAPTER_FILE = "adapter_model.safetensors"
# Weights of embedding layers (and the output layer): peft adapts an Embedding with other
# factors (lora_embedding_A/B), so these are saved whole rather than factored.
_EMBEDDING = re.compile(r"(^|.*\.)(embed_tokens|embed_in|embed_out|lm_head|wte|wpe|word_embeddings|"
                        r"position_embeddings|token_type_embeddings|embed_positions)\.weight")


@dataclass
class _Module:
    """A module of the base (its name is its tensors' prefix) and its tensors."""

    name: str
    tensors: list[str] = field(default_factory=list)
    weight: str | None = None  # the 2-D weight LoRA would factor, when it is a Linear layer


@dataclass
class _Run:
    """What the extraction learns, for the manifest, the config and the summary."""

    base: dict[str, TensorDigest] = field(default_factory=dict)
    delta: dict[str, TensorDigest] = field(default_factory=dict)
    result: dict[str, TensorDigest] = field(default_factory=dict)
    factored: dict[str, int] = field(default_factory=dict)  # module: its factors' rank
    saved: list[str] = field(default_factory=list)  # modules_to_save
    errors: dict[str, list[float]] = field(default_factory=dict)  # last name: [||D||^2, captured]
    mismatches: int = 0
    elements: int = 0
    header: int = 0  # the adapter file's header length


def extract_lora(
    base: str | Path, target: str | Path, out: Path, *, rank: int, block_size: int,
    progress: bool | Callable[[int, int], None], hub: dict, resume: bool, force: bool,
    sign: SigningKey | None,
) -> MakeDeltaResult:
    """The extraction, under OUT's lock (``make.make_delta`` checked the arguments and took it)."""
    started = time.perf_counter()
    base_in = resolve_input(base, "base", **hub)
    target_in = resolve_input(target, "target", **hub)
    with open_checkpoint(base_in.path) as base_ckpt, open_checkpoint(target_in.path) as target_ckpt:
        modules = _plan(base_ckpt, target_ckpt)
        options = {"make_delta": KIND, "rank": rank, "block_size": block_size, "seed": SEED,
                   "power_iterations": POWER_ITERATIONS, "oversample": oversampling(rank),
                   "version": __version__}
        fp = fingerprint([base_in.path, target_in.path], options, [])
        marks = Marks(KIND, delta_id(fp.digest), str(out))
        with partial_run(out, fp, resume=resume, force=force, kept="the partial delta") as partial:
            tmp = partial.folder
            for entry in os.scandir(tmp):  # --resume: the same command, started over
                if entry.name != JOURNAL_NAME:
                    remove_entry(tmp / entry.name)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # see ONE_THREAD
            try:
                run = _extract(base_ckpt, target_ckpt, modules, tmp, rank, block_size, progress,
                               marks)
            finally:
                torch.set_num_threads(threads)
            config = _adapter_config(run, rank, base_source(base_in), modules)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            copy_aux(tmp, {n: p for n, p in target_ckpt.aux_files().items() if n in TOKENIZER_FILES})
            path = tmp / ADAPTER_FILE
            files = file_table(tmp, {ADAPTER_FILE: WrittenFile(
                file_digest(path), run.header, file_digest(path, length=run.header))})
            manifest = Manifest(
                KIND, __version__, files, Role.of(run.base), Role.of(run.result),
                {"new_rows": "zero", "rank": rank}, delta=Role.of(run.delta),
                base_source=base_source(base_in), delta_id=marks.delta_id,
            )
            manifest.write(tmp / MANIFEST_NAME)
            signer = sign_folder(tmp, sign, ignore=(JOURNAL_NAME, CARD_NAME)) if sign else None
    return MakeDeltaResult(
        out, KIND, len(run.delta), run.elements, run.mismatches, manifest.base.model_digest,
        manifest.result.model_digest, files[ADAPTER_FILE].size, time.perf_counter() - started,
        peak_rss_bytes(), _notes(run, rank), signed_by=signer.to_json() if signer else None,
    )


def _plan(base: Checkpoint, target: Checkpoint) -> list[_Module]:
    """The base's weights grouped by module, refusing what an adapter cannot carry."""
    check_pairing(target, base.specs, role="the target")
    layers = LayerTypes(base.path, base.specs)
    modules: dict[str, _Module] = {}
    for name, spec in base.specs.items():
        if is_non_weight(name):
            continue
        other = target.specs[name]
        if other.shape != spec.shape:
            raise MismatchError(
                f"{target.file_of(name)}: tensor {name!r} has {other.rows} rows in the target but "
                f"{spec.rows} in the base: a LoRA adapter cannot add rows (use --kind add)")
        if other.dtype != spec.dtype:
            raise MismatchError(
                f"{target.file_of(name)}: tensor {name!r} is {other.dtype} in the target but "
                f"{spec.dtype} in the base: convert one to the other's dtype first")
        if len(memory_names(name)) > 1:
            raise UnsupportedError(
                f"{base.file_of(name)}: tensor {name!r} has another name in memory under "
                "transformers 5: a LoRA of it would not load in peft")
        owner, _, param = name.rpartition(".")
        module = modules.setdefault(owner, _Module(owner))
        module.tensors.append(name)
        if (param == "weight" and len(spec.shape) == 2 and owner
                and not name.endswith(VOCAB_TENSORS) and not _EMBEDDING.fullmatch(name)):
            if layers.conv1d(name):
                raise UnsupportedError(
                    f"{base.file_of(name)}: tensor {name!r} is a Conv1D weight (GPT-2 style): LoRA "
                    "extraction handles Linear layers only")
            module.weight = name
    _check_saved_names(base.path, list(modules), base.specs)
    return list(modules.values())


def _extract(
    base: Checkpoint, target: Checkpoint, modules: list[_Module], tmp: Path, rank: int,
    block_bytes: int, progress: bool | Callable[[int, int], None], marks: Marks,
) -> _Run:
    """Factor or save each changed module into the adapter file; the result's digests after."""
    run = _Run()
    gathered = GatheredFile(tmp / ADAPTER_FILE)
    bar = make_progress(progress, sum(base.specs[n].nbytes for m in modules for n in m.tensors),
                        "extracting LoRA")
    factors: dict[str, Factorization] = {}
    try:
        for module in modules:
            bar.at(module.name)
            others = [n for n in module.tensors if n != module.weight]
            changed = [n for n in others if not _same(base, target, n, block_bytes, run)]
            if module.weight is not None and not changed:
                hasher = TensorHasher(base.specs[module.weight])
                found = factorize(base, target, module.weight, rank, block_bytes,
                                  on_base=hasher.update)
                run.base[module.weight] = hasher.digest()
                if found is not None:
                    factors[module.name] = found
                    _add_factors(gathered, run, module, found, base.specs[module.weight].dtype)
            elif changed:
                if module.weight is not None:
                    _same(base, target, module.weight, block_bytes, run)  # hashes the base
                _save(gathered, run, module, target, block_bytes)
            for name in module.tensors:
                run.result.setdefault(name, run.base[name])
                run.elements += base.specs[name].numel
            bar.update(sum(base.specs[n].nbytes for n in module.tensors))
        if not run.delta:
            raise MismatchError(f"{target.path}: every weight is the base's: there is no "
                                "difference to extract")
        run.header = gathered.finish({"format": "pt", **marks.metadata()})
    except BaseException:
        gathered.abort()
        raise
    finally:
        bar.close()
    for name, spec in base.specs.items():
        if is_non_weight(name):
            run.base[name] = run.result[name] = hash_tensor(base, spec, block_bytes)
    _merged_digests(base, target, modules, factors, tmp / ADAPTER_FILE, block_bytes, run)
    return run


def _same(base: Checkpoint, target: Checkpoint, name: str, block_bytes: int, run: _Run) -> bool:
    """Whether the target's tensor is the base's bits; the base's digest from the same reads."""
    spec = base.specs[name]
    buffers = [block_buffer([spec], block_bytes, 4) for _ in range(2)]  # sized as fp32 work
    hasher = TensorHasher(spec)
    same = True
    for r0, r1 in row_blocks(spec, block_bytes, 4):
        rows = base.read_rows(name, r0, r1, buffers[0])
        hasher.update(rows)
        if same:
            other = target.read_rows(name, r0, r1, buffers[1])
            same = torch.equal(rows.view(torch.uint8), other.view(torch.uint8))
    run.base[name] = hasher.digest()
    return same


def _add_factors(
    gathered: GatheredFile, run: _Run, module: _Module, found: Factorization, dtype: torch.dtype
) -> None:
    """``lora_A``/``lora_B`` in the weight's dtype (mergekit's), and their rank and error."""
    for which, factor in (("lora_A", found.lora_a), ("lora_B", found.lora_b)):
        tensor = factor.to(dtype)
        key = f"{PREFIX}{module.name}.{which}.weight"
        run.delta[key] = gathered.add(TensorSpec(key, dtype, tuple(tensor.shape)), [tensor])
    run.factored[module.name] = found.lora_a.shape[0]
    sums = run.errors.setdefault(module.name.rpartition(".")[2], [0.0, 0.0])
    sums[0] += found.norm_sq
    sums[1] += found.captured_sq


def _save(
    gathered: GatheredFile, run: _Run, module: _Module, target: Checkpoint, block_bytes: int
) -> None:
    """Every tensor of the module, the target's, under peft's ``modules_to_save`` names."""
    if not module.name:
        raise UnsupportedError(f"{target.file_of(module.tensors[0])}: tensor "
                               f"{module.tensors[0]!r} is in no module: peft cannot save it")
    for name in module.tensors:
        spec = target.specs[name]
        buf = block_buffer([spec], block_bytes, 1)
        key = PREFIX + name
        blocks = (target.read_rows(name, r0, r1, buf)
                  for r0, r1 in row_blocks(spec, block_bytes, 1))
        run.delta[key] = run.result[name] = gathered.add(
            TensorSpec(key, spec.dtype, spec.shape), blocks)
    run.saved.append(module.name)


def _merged_digests(
    base: Checkpoint, target: Checkpoint, modules: list[_Module], factors: dict[str, Factorization],
    adapter: Path, block_bytes: int, run: _Run,
) -> None:
    """What apply rebuilds from each factored weight: the factors as written, merged onto the
    base's rows by apply's LoRA arithmetic (peft's); the elements that miss the target counted."""
    source = FactorSource(adapter)
    scratch = Scratch()
    try:
        for module in modules:
            if module.name not in factors or module.weight is None:
                continue
            spec = base.specs[module.weight]
            merge = Factors(source, f"{PREFIX}{module.name}.lora_A.weight",
                            f"{PREFIX}{module.name}.lora_B.weight", 1.0, False, spec.rows)
            hasher = TensorHasher(spec)
            buffers = [block_buffer([spec], block_bytes, 4) for _ in range(3)]
            for r0, r1 in row_blocks(spec, block_bytes, 4):
                rows = base.read_rows(spec.name, r0, r1, buffers[0])
                out = buffers[1][: rows.nbytes].view(spec.dtype).view(rows.shape)
                merge.merge(rows, out, r0, scratch)
                hasher.update(out)
                run.mismatches += count_differences(
                    out, target.read_rows(spec.name, r0, r1, buffers[2]), scratch)
            merge.release()
            run.result[module.weight] = hasher.digest()
    finally:
        source.close()


def _check_saved_names(where: Path, modules: list[str], specs: dict[str, TensorSpec]) -> None:
    """peft wraps every module whose name ends with a ``modules_to_save`` entry (a plain
    suffix): each module that may be saved, by its full name, must wrap itself and no other.
    Checked before any work, for every module (which ones are saved is known only after)."""
    owners = {".".join(parts[:i]) for n in specs for parts in [n.split(".")]
              for i in range(1, len(parts))}
    ends = {}
    for owner in owners:  # every suffix of every owner, at a dot or not, as peft's endswith
        for i in range(len(owner)):
            ends.setdefault(owner[i:], []).append(owner)
    for entry in modules:
        other = sorted(o for o in ends.get(entry, ()) if o != entry)
        if entry and other:
            raise UnsupportedError(
                f"{where}: module {entry!r} could not be saved alone: a modules_to_save entry "
                f"{entry!r} would also wrap {other[0]!r} (peft matches a suffix)")


def _adapter_config(run: _Run, rank: int, base_source: dict, modules: list[_Module]) -> dict:
    """peft's LoraConfig as mergekit writes it: ``lora_alpha = r``, per-module patterns for the
    matrices whose rank is smaller (a side shorter than ``rank``). ``target_modules`` names a
    kind of matrix (``q_proj``) where every one of them is factored, as mergekit does, and the
    factored ones by their full names otherwise: peft would wrap an unchanged one too, and warn
    that the file lacks its factors."""
    ranks = run.factored
    top = max(ranks.values(), default=rank)
    smaller = {m: r for m, r in ranks.items() if r != top}
    last = {m.name: m.name.rpartition(".")[2] for m in modules if m.weight is not None}
    partial = {last[m.name] for m in modules if m.weight is not None and m.name not in ranks}
    targets = sorted({last[m] if last[m] not in partial else m for m in ranks})
    return {
        "alpha_pattern": smaller,
        "auto_mapping": None,
        "base_model_name_or_path": base_source.get("repo_id") or base_source.get("folder"),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": top,
        "lora_dropout": 0.0,
        "modules_to_save": run.saved or None,
        "peft_type": "LORA",
        "r": top,
        "rank_pattern": smaller,
        "revision": None,
        "target_modules": targets or DUMMY,
        "task_type": "CAUSAL_LM",
        "use_rslora": False,
    }


def _notes(run: _Run, rank: int) -> list[str]:
    """The relative Frobenius error per kind of matrix (before the factors are rounded)."""
    notes = []
    if run.errors:
        parts = [f"{kind} {(max(d - c, 0.0) / d) ** 0.5 if d > 0 else 0.0:.4f}"
                 for kind, (d, c) in sorted(run.errors.items())]
        notes.append(f"rank {rank}: {len(run.factored)} matrices factored, relative Frobenius "
                     f"error by kind: {', '.join(parts)}")
    if run.saved:
        notes.append(f"{len(run.saved)} module(s) saved whole (modules_to_save), first "
                     f"{run.saved[0]!r}")
    return notes
