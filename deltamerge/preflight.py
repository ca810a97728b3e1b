"""Before the big download: pair the inputs' tensors and check the Hub cache's free space.

A step of ``apply`` that joins the two sides of the plan: what the sources can say about Hub
repos from their small files and remote safetensors headers (:mod:`deltamerge.sources.hub`),
and what the kinds say about whether a base and its deltas pair (:mod:`deltamerge.kinds`).
It sits above both, with the entry points, so neither has to know the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FormatError, InputError
from .integrity.manifest import MANIFEST_NAME, check_base_dtypes, find_manifest
from .kinds import is_non_weight
from .kinds.adapter import PEFT_KINDS, named_kind
from .kinds.add import check_pairing
from .kinds.detect import WHOLE_FILE_KINDS, declared_kind, detect_kind
from .kinds.lora import ADAPTER_CONFIG
from .kinds.marks import KIND_KEY, agreed_marks, check_manifest_marks, weight_headers
from .progress import step_bar
from .sources import open_checkpoint
from .sources.hub import (
    HeaderSpecs,
    RemoteRepo,
    check_cache_space,
    make_api,
    open_repo,
    remote_specs,
)
from .sources.inputs import hub_repo_id

if TYPE_CHECKING:
    from huggingface_hub import HfApi


def preflight(
    base: str | Path,
    deltas: list[str | Path],
    *,
    kind: str | None = None,
    verify: bool = True,
    endpoint: str | None = None,
    token: str | bool | None = None,
    api: HfApi | None = None,
    allow_repeat: bool = False,
) -> dict:
    """Before any weights are downloaded: pair the inputs' tensors and check the cache's space.

    Every input is checked locally first (a mistyped path fails without a request). For Hub
    inputs the small files are fetched and the weights' headers read remotely, so a base and a
    delta that do not pair fail in seconds. Returns the keyword arguments for ``resolve_input``,
    with the opened repos so they are not looked up twice.
    """
    inputs = [(base, "base"), *((d, "delta") for d in deltas)]
    ids = [hub_repo_id(given, role) for given, role in inputs]
    givens = [str(given) for given, _ in inputs]
    if not any(ids):
        check_roles([Path(g).expanduser() for g in givens], givens, kind, allow_repeat)
        return {"endpoint": endpoint, "token": token, "api": api}
    client = make_api(endpoint, token, api)
    repos: dict[str, RemoteRepo] = {}
    bar = step_bar(len(set(filter(None, ids))), "Hub preflight", unit="repo")
    try:
        for text, (_, role) in zip(ids, inputs):
            if text is not None and text not in repos:
                bar.at(text)
                repos[text] = open_repo(text, client)
                repos[text].xored = role == "delta" and kind in WHOLE_FILE_KINDS
                repos[text].fetch(repos[text].small_files())
                bar.update(1)
        check_roles([repos[t].folder if t else Path(g).expanduser() for t, g in zip(ids, givens)],
                    givens, kind, allow_repeat)
        _pair_xored_files(repos.get(ids[0]) if ids[0] else None, [repos[t] for t in ids[1:] if t])
        needed = sum(r.missing_bytes(r.weight_files()) for r in repos.values())
        if needed:
            bar.at("pairing the remote headers")
            _check_pairing([repos.get(t) if t else Path(str(g)).expanduser()
                            for t, (g, _) in zip(ids, inputs)], kind, verify)
            check_cache_space(needed, ", ".join(r.label for r in repos.values()))
    finally:
        bar.close()
    return {"api": client, "repos": repos}


def check_roles(
    folders: list[Path], givens: list[str], kind: str | None, allow_repeat: bool = False
) -> None:
    """Arguments in the wrong places, caught from the small files before any weight is read.

    ``folders`` are the base's and each delta's (for Hub repos, the snapshot holding their small
    files so far), ``givens`` what the user typed for them. A delta given twice in a chain
    (however spelled) is a slip far more often than a wish: refused unless ``allow_repeat``.
    """
    seen: dict[Path, str] = {}
    for folder, given in zip(folders[1:], givens[1:]):
        if folder.exists() and folders[0].exists() and folder.resolve() == folders[0].resolve():
            raise InputError(
                f"{given}: is BASE itself, given again as a DELTA: a model applied to itself "
                "is no rebuild; give the delta's folder"
            )
        if not folder.exists():
            continue
        where = folder.resolve()
        if where in seen and not allow_repeat:
            raise InputError(
                f"{given}: the same delta as {seen[where]}, given twice: it would be applied "
                "twice; drop one (or pass --allow-repeat if applying it twice is meant)"
            )
        seen.setdefault(where, given)
    held = _delta_files(folders[0]) if len(folders) > 1 else None
    if held is not None:
        raise InputError(
            f"{givens[0]}: BASE holds {held}: it looks like a delta; did you swap BASE "
            f"and DELTA? (the base comes first: apply BASE DELTA... OUT)"
        )
    if kind is None:
        return
    for folder, given in zip(folders[1:], givens[1:]):
        said, where = _declared_kind(folder)
        _refuse_contradiction(given, kind, said, where)


def _delta_files(folder: Path) -> str | None:
    """What in a BASE says it is a delta: a manifest, or weight files with make-delta's marks
    (a delta downloaded without its manifest)."""
    if (folder / MANIFEST_NAME).is_file():
        return f"a {MANIFEST_NAME}"
    for name, metadata in (weight_headers(folder) or {}).items():
        if KIND_KEY in metadata:
            return f"weight files marked as a delta ({KIND_KEY} in {Path(name).name})"
    return None


def _refuse_contradiction(given: str, kind: str | None, said: str | None, where: str) -> None:
    if kind is not None and said is not None and said != kind:
        raise InputError(
            f"{given}: --kind {kind} contradicts its {where}, which says {said}: leave out "
            f"--kind (the kind is detected) or give the delta you meant"
        )


def _declared_kind(folder: Path) -> tuple[str | None, str]:
    """The kind a delta's own files declare (a PEFT LoRA config, a manifest, the weight files'
    marks), or None."""
    if (folder / ADAPTER_CONFIG).is_file():
        return named_kind(folder), ADAPTER_CONFIG
    try:
        manifest = find_manifest(folder)
    except FormatError:
        return None, MANIFEST_NAME  # a broken manifest is reported where it is used
    return declared_kind(folder, manifest)


def _pair_xored_files(base: RemoteRepo | None, deltas: list[RemoteRepo]) -> None:
    """A base for an xor-files delta needs the files of the same names, whatever their format."""
    names = {n.removesuffix(".gz") for d in deltas if d.is_xored() and not d.is_encrypted()
             for n in d.weight_files()}
    if base is not None and names:
        base.chosen = sorted(n for n in names if n in base.files)


def _check_pairing(inputs: list[RemoteRepo | Path], kind: str | None, verify: bool) -> None:
    """``kinds.add.check_pairing`` along the chain, for the additive and XOR deltas it can judge;
    and, when verifying, the base's dtypes against the first delta's manifest.

    Whole-file deltas pair by files, not tensors (an enc delta's base is one Meta file), so a
    chain with one is not judged here.
    """
    if any(isinstance(d, RemoteRepo) and d.is_xored() for d in inputs[1:]):
        return
    base = _specs_of(inputs[0])
    if base is None:
        return
    specs = base.specs
    first = inputs[1] if len(inputs) > 1 else None
    manifest = find_manifest(first.folder if isinstance(first, RemoteRepo) else first) if (
        verify and first is not None) else None
    if manifest is not None:
        check_base_dtypes(base.path, specs, manifest.base)
    for delta in inputs[1:]:
        folder = delta.folder if isinstance(delta, RemoteRepo) else delta
        delta_kind = kind or detect_kind(folder, find_manifest(folder))
        if delta_kind in PEFT_KINDS.values():
            continue
        found = _specs_of(delta) if delta_kind in ("add", "xor") else None
        if found is None:
            return
        if isinstance(delta, RemoteRepo):
            _check_remote_marks(delta, found, kind)
        check_pairing(found, specs)
        after = {n: s for n, s in found.specs.items() if not is_non_weight(n)}
        specs = {**after, **{n: s for n, s in specs.items() if n not in after}}


def _check_remote_marks(repo: RemoteRepo, found: HeaderSpecs, kind: str | None) -> None:
    """The marks in a Hub delta's remote headers, checked as ``detect_kind`` and ``check_roles``
    check a local delta's, before its weights are downloaded (a few KB already read)."""
    marks = agreed_marks({f"{repo.label}/{n}": m for n, m in found.metadata.items()})
    manifest = find_manifest(repo.folder)
    if manifest is not None:
        check_manifest_marks(repo.label, marks, manifest.kind, manifest.delta_id, MANIFEST_NAME)
    if marks is not None:
        _refuse_contradiction(repo.label, kind, marks.kind, marks.said_by)


def _specs_of(source: RemoteRepo | Path) -> HeaderSpecs | None:
    if isinstance(source, RemoteRepo):
        return remote_specs(source)
    with open_checkpoint(source) as ckpt:
        where = {n: ckpt.file_of(n).name for n in ckpt.specs}
        return HeaderSpecs(str(source), dict(ckpt.specs), where)
