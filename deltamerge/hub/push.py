"""Publishing a finished folder to the Hub: one commit, with a model card unless it has a README.md.

The client, its errors and the token's handling are the same as for inputs
(:mod:`deltamerge.sources.hub`); no message ever contains the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub as hf  # attributes load on first use: importing this module stays cheap

from ..errors import InputError, NotFoundError
from ..formats.files import stays_inside
from ..sources.hub import hub_errors, make_api, transport_errors
from ..version import __version__
from .model_card import CARD_NAME, build_card, hub_inputs

if TYPE_CHECKING:
    from huggingface_hub import HfApi

SKIP_DIRS = (".git", ".cache")  # git metadata; huggingface_hub's local_dir bookkeeping


@dataclass(frozen=True)
class PushResult:
    """Where a push went: the page to open (the pull request's, for a PR) and the commit."""

    url: str
    commit: str
    repo_id: str


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    api: HfApi | None = None,
) -> PushResult:
    """Upload ``folder`` to ``repo_id`` in one commit, with a model card unless it has a README.md.

    Creates the repo if needed (``private`` applies then) and the branch ``revision`` if it is
    new; ``create_pr`` opens a pull request instead of committing to the branch. The card is
    added to the commit only: the folder itself is never written to.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: a file, not a folder: push uploads a folder (OUT of a run)")
    if not folder.is_dir():
        raise NotFoundError(f"{folder}: no such folder")
    files = _files_to_upload(folder)
    if not files:
        raise InputError(f"{folder}: nothing to upload")
    client = make_api(endpoint, token, api)
    operations = [hf.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in files]
    with hub_errors(repo_id, client.endpoint):
        repo_id = client.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision:
            client.create_branch(repo_id, branch=revision, exist_ok=True)
        if not (folder / CARD_NAME).is_file():
            cards = _input_cards(client, hub_inputs(folder))
            card = build_card(folder, repo_id, input_cards=cards, endpoint=client.endpoint)
            operations.append(hf.CommitOperationAdd(CARD_NAME, card.encode()))
        commit = client.create_commit(
            repo_id, operations, revision=revision, create_pr=create_pr,
            commit_message=message or f"Upload {folder.name} with deltamerge {__version__}",
        )
    url = f"{client.endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    return PushResult(commit.pr_url if create_pr and commit.pr_url else url, commit.oid, repo_id)


def _files_to_upload(folder: Path) -> list[tuple[str, Path]]:
    """Every file under ``folder`` by its path in the repo, as upload_folder would take them.

    Only the folder's own: a symlink leading out of it (``tokenizer.model -> ~/secret``) is
    refused before anything is sent, as :func:`~deltamerge.sources.folders.own_file` refuses
    it as an input. FIFOs and devices are skipped; symlinked folders are not followed.
    """
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in SKIP_DIRS:
            continue
        if path.is_symlink() and path.exists() and not stays_inside(folder, path):
            raise InputError(
                f"{path}: a symlink leading outside {folder} (to {path.resolve()}): push uploads "
                "only the folder's own files; copy the file in instead of linking it"
            )
        if path.is_file():
            found.append((rel.as_posix(), path))
    return found


def _input_cards(api: HfApi, inputs: list[dict]) -> dict[str, dict]:
    """The card metadata of the inputs' repos, for the license; unreadable ones are skipped."""
    from huggingface_hub.errors import HfHubHTTPError

    cards = {}
    for entry in inputs:
        repo_id = entry["repo_id"]
        commit = entry.get("commit")
        try:
            info = api.model_info(repo_id, revision=commit if isinstance(commit, str) else None)
        except (HfHubHTTPError, OSError, ValueError, *transport_errors()):
            continue
        if info.card_data is not None:
            cards[repo_id] = info.card_data.to_dict()
    return cards
