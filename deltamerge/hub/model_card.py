"""The README.md model card deltamerge writes for a folder it publishes to the Hub.

The card says what the folder is and where it came from. A rebuilt model (it holds the
``deltamerge-result.json`` apply writes) is a fine-tune of its base: the front matter names the
base repo, the body the base and every delta with its commit, and the result's model digest. A
delta (it holds a ``deltamerge.json``) says its kind and the command that applies it. The front
matter is built by huggingface_hub's ``ModelCardData`` so the Hub reads it as it writes it.
Local input folders are named by their last path component only: a card is public.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..errors import DeltaMergeError
from ..formats.files import read_json_object
from ..integrity.manifest import MANIFEST_NAME, read_manifest
from ..results import RESULT_RECORD
from ..version import __version__

CARD_NAME = "README.md"
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
    if record is not None:
        data, body = _result_card(record, title, repo_id, input_cards or {}, endpoint)
    elif (folder / MANIFEST_NAME).is_file():
        data, body = _delta_card(folder, title, repo_id)
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


def _result_card(
    record: dict, title: str, repo_id: str, cards: dict[str, dict], endpoint: str
) -> tuple[ModelCardData, str]:
    base = record.get("base")
    deltas = [d for d in record.get("deltas", []) if isinstance(d, dict)]
    base_repo = base.get("repo_id") if isinstance(base, dict) else None
    data = ModelCardData(
        base_model=base_repo if isinstance(base_repo, str) else None,
        base_model_relation="finetune",
        library_name="transformers",
        tags=[TAG],
        **_license(record, cards),
    )
    rows = ["| role | source | commit | kind |", "|---|---|---|---|"]
    source, commit = _source(base, endpoint)
    rows.append(f"| base | {source} | {commit} | |")
    for d in deltas:
        source, commit = _source(d, endpoint)
        rows.append(f"| delta | {source} | {commit} | {d.get('kind', '?')} |")
    result = record.get("result")
    digest = result.get("model_digest") if isinstance(result, dict) else None
    algorithm = record.get("algorithm", "sha256")  # records before manifest format 2: sha256
    option = "" if algorithm == "blake3" else f" --algorithm {algorithm}"
    version = record.get("deltamerge_version") or __version__
    body = (
        f"# {title}\n\n"
        f"This model was rebuilt with [deltamerge]({PROJECT_URL}) {version} by applying "
        f"{'a delta' if len(deltas) == 1 else f'{len(deltas)} deltas, in order,'} to a base "
        "model:\n\n" + "\n".join(rows) + "\n\n"
        f"Model digest of the result ({algorithm}): `{digest}`\n\n"
        "The digest covers every tensor's name, dtype, shape and bytes, whatever the file "
        "layout. Check a copy with:\n\n"
        f"```bash\ndeltamerge checksum {repo_id}{option}\n```\n\n"
        f"`{RESULT_RECORD}` records the inputs, the options and every tensor's digest.\n"
    )
    return data, body


def _delta_card(folder: Path, title: str, repo_id: str) -> tuple[ModelCardData, str]:
    try:
        manifest = read_manifest(folder / MANIFEST_NAME)
    except DeltaMergeError:
        manifest = None
    kind = manifest.kind if manifest else "unknown"
    data = ModelCardData(tags=[TAG, "delta"])
    digests = ""
    if manifest is not None:
        digests = (
            f"| | model digest ({manifest.algorithm}) |\n|---|---|\n"
            f"| base | `{manifest.base.model_digest}` |\n"
            f"| result | `{manifest.result.model_digest}` |\n\n"
        )
    version = manifest.deltamerge_version if manifest else __version__
    body = (
        f"# {title}\n\n"
        f"A **{kind}** delta made with [deltamerge]({PROJECT_URL}) {version}: the difference "
        "between a fine-tuned model and its base. It is not a model on its own; rebuild the "
        "model from your copy of the base with:\n\n"
        f"```bash\npip install deltamerge\ndeltamerge apply BASE {repo_id} ./{title}-rebuilt\n```\n\n"
        "`BASE` is the base model the delta was made from: a local folder or a Hub repo id. "
        f"deltamerge checks the base against the base digest of `{MANIFEST_NAME}` before it "
        "writes anything, and the result against its result digest:\n\n"
        f"{digests}"
    )
    return data, body
