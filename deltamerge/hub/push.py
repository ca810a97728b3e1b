"""Publishing a finished folder to the Hub: one commit, with a model card unless it has a README.md.

The client, its errors and the token's handling are the same as for inputs
(:mod:`deltamerge.sources.hub`); no message ever contains the token.

A push survives a dropped connection the way the Hub's storage allows: huggingface_hub retries
each transfer with backoff, every LFS (or Xet) object uploaded stays in the repo's storage
whether or not the commit comes, and the commit itself is made last, so the repo never shows
half a model. A push that fails anyway is a :class:`~deltamerge.errors.PushError` naming the
command to run again; that run hashes the files, finds the objects already stored, uploads
only the rest and commits. ``check_target`` is what a long job runs before it starts, so that
its push does not fail on a token or a repo id.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub as hf  # attributes load on first use: importing this module stays cheap

from .. import arguments as args
from ..errors import HubAuthError, InputError, NotFoundError, PushError, WorkError
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

    def to_json(self) -> dict:
        return {"url": self.url, "commit": self.commit, "repo_id": self.repo_id}


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

    One commit, so that nobody downloads half a model. The card is added to the commit only:
    the folder itself is never written to.

    Args:
        folder: the folder to upload (the OUT of a run).
        repo_id: the model repo, created if needed.
        private: make a repo created here private.
        revision: the branch to commit to, created if it is new.
        create_pr: open a pull request instead of committing to the branch.
        message: the commit message.
        token: the Hub token (``False``: none), as huggingface_hub takes it.
        endpoint: the Hub's address.
        api: a ``huggingface_hub.HfApi`` to use instead of ``token`` and ``endpoint``.

    Returns:
        A :class:`PushResult`: the page to open and the commit.

    Raises:
        NotFoundError: ``folder`` does not exist (also a FileNotFoundError).
        HubAuthError: no token, or a token that may not write to ``repo_id``.
        InputError: bad arguments, or nothing to upload.
        PushError: the push did not finish; nothing was committed, and its message names the
            call to run again.
    """
    folder = Path(args.path("folder", folder)).expanduser()
    _check_push_args(repo_id, private, revision, create_pr, message, token, endpoint, api)
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
    retry = retry_command(folder, repo_id, revision=revision, create_pr=create_pr)
    try:
        with hub_errors(repo_id, client.endpoint):
            repo_id = client.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if revision:
                client.create_branch(repo_id, branch=revision, exist_ok=True)
            if not (folder / CARD_NAME).is_file():
                cards = _input_cards(client, hub_inputs(folder))
                card = build_card(folder, repo_id, input_cards=cards, endpoint=client.endpoint)
                operations.append(hf.CommitOperationAdd(CARD_NAME, card.encode()))
            commit = _commit(
                client, repo_id, operations, revision=revision, create_pr=create_pr,
                commit_message=message or f"Upload {folder.name} with deltamerge {__version__}",
            )
    except WorkError as exc:  # the network or the Hub failed: what was uploaded stays uploaded
        raise PushError(str(exc), retry) from None
    url = f"{client.endpoint}/{repo_id}" + (f"/tree/{revision}" if revision else "")
    return PushResult(commit.pr_url if create_pr and commit.pr_url else url, commit.oid, repo_id)


def _check_push_args(
    repo_id: object, private: object, revision: object, create_pr: object, message: object,
    token: object, endpoint: object, api: object,
) -> None:
    """The library caller's arguments, checked before any request (an InputError naming one)."""
    args.text("repo_id", repo_id, optional=False)
    args.flag("private", private)
    args.flag("create_pr", create_pr)
    args.text("revision", revision)
    args.text("message", message)
    args.text("endpoint", endpoint)
    args.token("token", token)
    args.api("api", api)


def check_target(
    repo_id: str,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Before a long job that ends in a push: the repo id is valid and the token is one the Hub
    knows, with write access. Nothing is created: a job that fails leaves no empty repo behind;
    :func:`push_to_hub` creates the repo when there is something to publish (``private``
    applies then).

    Returns the full repo id (``owner/name``; a bare name is the token owner's). Raises the
    errors the push itself would.
    """
    from huggingface_hub.errors import LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    client = make_api(endpoint, token, api)
    with hub_errors(repo_id, client.endpoint):
        validate_repo_id(repo_id)
        try:
            me = client.whoami()
        except LocalTokenNotFoundError:
            raise HubAuthError(
                f"{repo_id}: pushing needs a token with write access: set HF_TOKEN (or run "
                "`hf auth login`, or pass --token)"
            ) from None
    if "/" not in repo_id:
        repo_id = f"{me.get('name')}/{repo_id}"
    if ((me.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise HubAuthError(f"{repo_id}: the token is read-only: pushing needs one with write "
                           "access (set HF_TOKEN, or pass --token)")
    return repo_id


def retry_command(
    folder: Path, repo_id: str, *, revision: str | None = None, create_pr: bool = False
) -> str:
    """The ``deltamerge push`` command that pushes ``folder`` as this push would have."""
    words = ["deltamerge", "push", str(folder), repo_id]
    if revision:
        words += ["--revision", revision]
    if create_pr:
        words.append("--create-pr")
    return shlex.join(words)


def _commit(client: HfApi, repo_id: str, operations: list, **options: object):
    """``create_commit``, with the error of a failed upload as it came from the transfer.

    huggingface_hub wraps an upload's failure in a RuntimeError naming the file; its cause is
    the HTTP or network error, which ``hub_errors`` turns into a one-line message.
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return client.create_commit(repo_id, operations, **options)
    except RuntimeError as exc:
        cause = exc.__cause__
        if isinstance(cause, (HfHubHTTPError, *transport_errors())):
            raise cause from None
        raise


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
