"""The README.md model card deltamerge writes for a folder it publishes to the Hub.

The card says what the folder is and where it came from, and its front matter carries the two
fields the Hub links models by: ``base_model`` and ``base_model_relation``. A rebuilt model (it
holds the ``deltamerge-result.json`` apply writes) is a ``finetune`` of its base: the front
matter names the base repo, the body the base and every delta with its commit, and the result's
model digest. A result written as GGUF (its record has a ``gguf`` entry) is ``quantized`` from
its base, as the Hub calls any GGUF repo made from another model; its card names the
architecture, the quantization and how llama.cpp runs it. A delta (it holds a
``deltamerge.json``) is an ``adapter`` of its base, as a PEFT LoRA folder
(``adapter_config.json``) is: it is used on top of it, never alone; its base is the repo its
manifest's ``base_source`` names (make-delta records it), and the body says its kind and the
command that applies it. The front matter is built by huggingface_hub's
``ModelCardData`` so the Hub reads it as it writes it. Local input folders are named by their
last path component only: a card is public.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..errors import DeltaMergeError
from ..formats.files import read_json_object
from ..integrity.manifest import MANIFEST_NAME, read_manifest
from ..results import RESULT_RECORD
from ..sources.inputs import is_repo_id
from ..version import __version__

CARD_NAME = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
LICENSE_FIELDS = ("license", "license_name", "license_link")
TAG = "deltamerge"
PROJECT_URL = "https://pypi.org/project/deltamerge/"


def _record(folder: Path) -> dict | None:
    path = folder / RESULT_RECORD
    return read_json_object(path) if path.is_file() else None


def hub_inputs(folder: Path) -> list[dict]:
    """The Hub repos a rebuilt model was made from (base first), as its provenance records them."""
    record = _record(Path(folder))
    if record is None:
        return []
    deltas = record.get("deltas")
    entries = [record.get("base"), *(deltas if isinstance(deltas, list) else [])]
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("repo_id"), str)]


def build_card(
    folder: Path | str,
    repo_id: str,
    *,
    input_cards: dict[str, dict] | None = None,
    endpoint: str = "https://huggingface.co",
) -> str:
    """The README.md text for ``folder`` published as ``repo_id``.

    ``input_cards`` maps the inputs' repo ids to their cards' metadata (``cardData``), where the
    license comes from; inputs without one are skipped.
    """
    folder = Path(folder)
    title = repo_id.rsplit("/", 1)[-1]
    record = _record(folder)
    if record is not None and isinstance(record.get("gguf"), dict):
        data, body = _gguf_card(record, title, input_cards or {}, endpoint)
    elif record is not None:
        data, body = _result_card(record, title, repo_id, input_cards or {}, endpoint)
    elif (folder / MANIFEST_NAME).is_file():
        data, body = _delta_card(folder, title, repo_id, endpoint)
    elif (folder / ADAPTER_CONFIG).is_file():
        data, body = _adapter_card(folder, title, repo_id)
    else:
        library = "transformers" if (folder / "config.json").is_file() else None
        data = ModelCardData(library_name=library, tags=[TAG])
        body = f"# {title}\n\nUploaded with [deltamerge]({PROJECT_URL}) {__version__}.\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _source(entry: object, endpoint: str) -> tuple[str, str]:
    """How the card names an input, and its commit."""
    if not isinstance(entry, dict):
        return "unknown", "—"
    if isinstance(entry.get("repo_id"), str):
        repo = entry["repo_id"]
        commit = entry.get("commit")
        return f"[`{repo}`]({endpoint}/{repo})", f"`{commit}`" if isinstance(commit, str) else "—"
    name = Path(str(entry.get("folder", ""))).name or "unknown"
    return f"a local folder (`{name}`)", "—"


def _license(record: dict, cards: dict[str, dict]) -> dict:
    """The license fields of the last delta's card that has one, else the base's."""
    deltas = record.get("deltas") if isinstance(record.get("deltas"), list) else []
    for entry in [*reversed(deltas), record.get("base")]:
        card = cards.get(entry.get("repo_id")) if isinstance(entry, dict) else None
        if isinstance(card, dict) and card.get("license"):
            return {k: card[k] for k in LICENSE_FIELDS if card.get(k)}
    return {}


def _base_repo(record: dict) -> str | None:
    base = record.get("base")
    repo = base.get("repo_id") if isinstance(base, dict) else None
    return repo if isinstance(repo, str) else None


def _provenance(record: dict, endpoint: str) -> str:
    """The sentence and table that say what a result was rebuilt from, base first."""
    deltas = [d for d in record.get("deltas", []) if isinstance(d, dict)]
    rows = ["| role | source | commit | kind |", "|---|---|---|---|"]
    source, commit = _source(record.get("base"), endpoint)
    rows.append(f"| base | {source} | {commit} | |")
    for d in deltas:
        source, commit = _source(d, endpoint)
        rows.append(f"| delta | {source} | {commit} | {d.get('kind', '?')} |")
    version = record.get("deltamerge_version") or __version__
    return (
        f"rebuilt with [deltamerge]({PROJECT_URL}) {version} by applying "
        f"{'a delta' if len(deltas) == 1 else f'{len(deltas)} deltas, in order,'} to a base "
        "model:\n\n" + "\n".join(rows) + "\n\n"
    )


def _digest(record: dict, role: str) -> str | None:
    entry = record.get(role)
    digest = entry.get("model_digest") if isinstance(entry, dict) else None
    return digest if isinstance(digest, str) else None


def _result_card(
    record: dict, title: str, repo_id: str, cards: dict[str, dict], endpoint: str
) -> tuple[ModelCardData, str]:
    base_repo = _base_repo(record)
    data = ModelCardData(
        base_model=base_repo,
        base_model_relation="finetune" if base_repo else None,  # a relation to a named base only
        library_name="transformers",
        tags=[TAG],
        **_license(record, cards),
    )
    algorithm = record.get("algorithm", "sha256")  # records before manifest format 2: sha256
    option = "" if algorithm == "blake3" else f" --algorithm {algorithm}"
    body = (
        f"# {title}\n\n"
        f"This model was {_provenance(record, endpoint)}"
        f"Model digest of the result ({algorithm}): `{_digest(record, 'result')}`\n\n"
        "The digest covers every tensor's name, dtype, shape and bytes, whatever the file "
        "layout. Check a copy with:\n\n"
        f"```bash\ndeltamerge checksum {repo_id}{option}\n```\n\n"
        f"`{RESULT_RECORD}` records the inputs, the options and every tensor's digest.\n"
    )
    return data, body


def _gguf_card(
    record: dict, title: str, cards: dict[str, dict], endpoint: str
) -> tuple[ModelCardData, str]:
    """A result written as GGUF: ``quantized`` from its base, as the Hub calls every repo of
    GGUF files made from another model (its weights are the fine-tune's, which the body says)."""
    gguf = record["gguf"]
    base_repo = _base_repo(record)
    arch, outtype, file_type = (str(gguf.get(k, "unknown")) for k in ("architecture", "outtype",
                                                                     "file_type"))
    listed_files = gguf.get("files") if isinstance(gguf.get("files"), list) else []
    files = [f for f in listed_files if isinstance(f, str)] or ["MODEL.gguf"]
    data = ModelCardData(
        base_model=base_repo, base_model_relation="quantized" if base_repo else None,
        tags=[TAG, "gguf", outtype, arch], **_license(record, cards),
    )
    algorithm = record.get("algorithm", "sha256")
    listed = "\n".join(f"- `{name}`" for name in files)
    split = (" (llama.cpp reads the other splits from beside the first)"
             if len(files) > 1 else "")
    body = (
        f"# {title}\n\n"
        f"A GGUF file of a model {_provenance(record, endpoint)}"
        f"| | |\n|---|---|\n| architecture | `{arch}` |\n"
        f"| quantization | `{outtype}` (llama.cpp file type `{file_type}`) |\n\n"
        f"Files:\n\n{listed}\n\n"
        f"Run it with [llama.cpp](https://github.com/ggml-org/llama.cpp){split}:\n\n"
        f"```bash\nllama-cli -m {files[0]}\n```\n\n"
        f"Model digest of the GGUF tensors as written ({algorithm}): "
        f"`{_digest(record, 'result')}`\n\n"
        f"Model digest of the Hugging Face model they were converted from ({algorithm}): "
        f"`{_digest(record, 'merged')}`\n\n"
        "A digest covers every tensor's name, type, shape and bytes. "
        f"`{RESULT_RECORD}` records the inputs, the options and every tensor's digest.\n"
    )
    return data, body


def _repo_id(text: object) -> str | None:
    """``text`` when it names a Hub repo (``owner/name``), not a path on some machine."""
    if not isinstance(text, str) or not is_repo_id(text):
        return None
    return text.split("@", 1)[0]


def _delta_card(
    folder: Path, title: str, repo_id: str, endpoint: str
) -> tuple[ModelCardData, str]:
    try:
        manifest = read_manifest(folder / MANIFEST_NAME)
    except DeltaMergeError:
        manifest = None
    kind = manifest.kind if manifest else "unknown"
    source = (manifest.base_source if manifest else None) or {}
    base_repo = _repo_id(source.get("repo_id"))
    data = ModelCardData(
        base_model=base_repo, base_model_relation="adapter" if base_repo else None,
        tags=[TAG, "delta"],
    )
    digests = ""
    if manifest is not None:
        digests = (
            f"| | model digest ({manifest.algorithm}) |\n|---|---|\n"
            f"| base | `{manifest.base.model_digest}` |\n"
            f"| result | `{manifest.result.model_digest}` |\n\n"
        )
    if base_repo:
        commit = source.get("revision")
        made_from = (f"It was made against [`{base_repo}`]({endpoint}/{base_repo})"
                     + (f" at commit `{commit}`" if commit else "") + ".\n\n")
        base_arg = f"{base_repo}@{commit}" if commit else base_repo
    else:
        name = source.get("folder")
        made_from = f"It was made against a local folder (`{name}`).\n\n" if name else ""
        base_arg = "BASE"
    version = manifest.deltamerge_version if manifest else __version__
    body = (
        f"# {title}\n\n"
        f"A **{kind}** delta made with [deltamerge]({PROJECT_URL}) {version}: the difference "
        "between a fine-tuned model and its base. It is not a model on its own; rebuild the "
        "model from your copy of the base with:\n\n"
        f"```bash\npip install deltamerge\ndeltamerge apply {base_arg} {repo_id} "
        f"./{title}-rebuilt\n```\n\n"
        f"{made_from}"
        "The base may be a local folder or a Hub repo id. "
        f"deltamerge checks the base against the base digest of `{MANIFEST_NAME}` before it "
        "writes anything, and the result against its result digest:\n\n"
        f"{digests}"
    )
    return data, body


def _adapter_card(folder: Path, title: str, repo_id: str) -> tuple[ModelCardData, str]:
    """A PEFT LoRA folder: an adapter of the repo its config names, when that is a repo id."""
    try:
        config = read_json_object(folder / ADAPTER_CONFIG)
    except DeltaMergeError:
        config = {}
    base_repo = _repo_id(config.get("base_model_name_or_path"))
    data = ModelCardData(
        base_model=base_repo, base_model_relation="adapter" if base_repo else None,
        library_name="peft", tags=[TAG],
    )
    base = f"`{base_repo}`" if base_repo else "its base model"
    body = (
        f"# {title}\n\n"
        f"A LoRA adapter of {base}, uploaded with [deltamerge]({PROJECT_URL}) {__version__}. "
        "Merge it into the base with:\n\n"
        f"```bash\ndeltamerge apply {base_repo or 'BASE'} {repo_id} ./{title}-merged\n```\n"
    )
    return data, body
