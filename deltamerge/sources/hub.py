"""Hub repos as inputs: fetched into the Hugging Face cache, each file checked against the Hub.

A repo id (``owner/name[@revision]``) is fetched through huggingface_hub into its cache
(HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply), only the files the job needs: config and tokenizer
files, manifests, then one weight format. Small files come first, so ``apply`` can read the
weights' safetensors headers remotely and refuse an incompatible pair before the big download
(:func:`remote_specs`, used by :mod:`deltamerge.preflight`). huggingface_hub checks only byte
counts, so every file used is checked against the Hub's own sha256 (git sha1 for small files)
once per cached blob. No message ever contains the token.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub as hf  # attributes load on first use: importing this module stays cheap
from huggingface_hub import constants as hf_constants

from ..errors import (  # HubAuthError, NotCachedError: also importable from here, as before
    DiskSpaceError,
    FormatError,
    HubAuthError,
    InputError,
    NotCachedError,
    NotFoundError,
    VerificationError,
    WorkError,
)
from ..formats.safetensors import Header, header_length, parse_header
from ..integrity.digest import SHA256, file_digest
from ..integrity.manifest import MANIFEST_NAME
from ..integrity.signing import SIGNATURE_NAME
from ..progress import step_bar
from ..results import RESULT_RECORD
from ..tensor_spec import TensorSpec
from ..version import __version__
from .folders import (
    AUX_FILES,
    BIN_INDEX,
    BIN_SINGLE,
    INDEX_SUFFIX,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    WEIGHT_ORDER,
    is_aux_file,
    lone_torch_file,
    read_weight_map,
)
from .inputs import Resolved

if TYPE_CHECKING:
    from huggingface_hub import HfApi

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
META_SMALL = ("params.json", "checklist.chk")
# model.sig: a pinned signer's signature is checked over the snapshot (integrity/signing.py).
SMALL_FILES = (*AUX_FILES, MANIFEST_NAME, RESULT_RECORD, ADAPTER_CONFIG, *META_SMALL, SIGNATURE_NAME)
MAX_WORKERS = 8
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


# -- errors -------------------------------------------------------------------------------------
def transport_errors() -> tuple[type[BaseException], ...]:
    import httpx2  # huggingface_hub's HTTP client

    return (httpx2.TransportError,)


@contextmanager
def hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line deltamerge errors; the token never appears."""
    from huggingface_hub import errors as e

    try:
        yield
    except e.RevisionNotFoundError:
        raise NotFoundError(f"{what}: no such revision on {endpoint}") from None
    except e.GatedRepoError:
        raise HubAuthError(
            f"{what}: a gated repository: accept its terms on the Hub, then set HF_TOKEN"
        ) from None
    except e.RepositoryNotFoundError:
        raise NotFoundError(
            f"{what}: no such repository on {endpoint} (if it is private, set HF_TOKEN to a token "
            "that can read it)"
        ) from None
    except (e.OfflineModeIsEnabled, e.LocalEntryNotFoundError) as exc:
        # huggingface_hub reports a failed request for a file it has no copy of as "not in the
        # local cache", whatever failed: the Hub's own answer or the network, when that is what
        # it was, is the error (exit 1, retry later), not a cache to fill.
        cause = exc.__cause__
        if isinstance(cause, e.HfHubHTTPError):
            raise _answered(what, endpoint, cause) from None
        if isinstance(cause, transport_errors()):
            raise WorkError(f"{what}: cannot reach the Hub at {endpoint} ({type(cause).__name__})") from None
        raise NotCachedError(
            f"{what}: not in the cache, and the Hub at {endpoint} cannot be reached (or "
            "HF_HUB_OFFLINE is set)"
        ) from None
    except e.HFValidationError as exc:
        raise InputError(f"{what}: {str(exc).splitlines()[0]}") from None
    except e.EntryNotFoundError:
        raise NotFoundError(f"{what}: a file is missing from the repository") from None
    except e.HfHubHTTPError as exc:
        raise _answered(what, endpoint, exc) from None
    except transport_errors() as exc:
        raise WorkError(f"{what}: cannot reach the Hub at {endpoint} ({type(exc).__name__})") from None


def _answered(what: str, endpoint: str, exc: Exception) -> InputError | WorkError:
    """An HTTP error status the Hub answered: a refused token (exit 2), or the Hub failing (1)."""
    response = getattr(exc, "response", None)
    status = response.status_code if response is not None else None
    if status in (401, 403):
        return HubAuthError(
            f"{what}: the Hub refused access (HTTP {status}): set HF_TOKEN to a valid token "
            "with the rights this needs"
        )
    return WorkError(f"{what}: the Hub at {endpoint} answered HTTP {status}")


def use_cache_dir(path: str | Path) -> None:
    """Download into this Hugging Face cache for the rest of the process (``--cache-dir``).

    huggingface_hub and this module read ``HF_HUB_CACHE`` when each call is made, so setting it
    here is what the variable does when set before the process starts.
    """
    hf_constants.HF_HUB_CACHE = str(Path(path).expanduser())


def quiet_downloads() -> None:
    """No progress bars from huggingface_hub (downloads, uploads), as ``-q`` asks."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def make_api(
    endpoint: str | None = None, token: str | bool | None = None, api: HfApi | None = None
) -> HfApi:
    """The client to use: the caller's, or one for ``endpoint`` (default: HF_ENDPOINT)."""
    return api if api is not None else hf.HfApi(endpoint=endpoint, token=token)


# -- remote repos as inputs ---------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """A file of a repo at a commit, with the Hub's checksum of it."""

    name: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git sha1: regular files

    @property
    def blob(self) -> str | None:
        """The name the cache stores it under (the HEAD's etag)."""
        return self.sha256 or self.blob_id


def cache_storage(text: str) -> Path:
    """The cache folder a repo's files are fetched into (``models--owner--name``), no request."""
    from huggingface_hub.file_download import repo_folder_name

    repo_id = parse_repo_id(text)[0]
    with hub_errors(text, str(hf_constants.ENDPOINT)):  # the id is validated: one line if wrong
        return Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def parse_repo_id(text: str) -> tuple[str, str | None]:
    repo_id, _, revision = text.partition("@")
    if revision and (".." in revision or revision.startswith("/") or revision.endswith("/")
                     or "//" in revision):
        # git refuses these in ref names; offline, a revision names a file of the cache
        raise InputError(f"{text}: {revision!r} is not a valid revision (branch, tag or commit)")
    return repo_id, revision or None


class RemoteRepo:
    """One repo at one commit: its file list and the cache folder its files are fetched into.

    ``offline`` says why the Hub is not asked (HF_HUB_OFFLINE, unreachable); None when online.
    """

    def __init__(
        self, api: HfApi, repo_id: str, revision: str | None, commit: str,
        files: dict[str, RemoteFile], offline: str | None = None,
    ):
        self.api, self.repo_id, self.revision, self.commit = api, repo_id, revision, commit
        self.files, self.offline = files, offline
        self.xored = False  # set for a whole-file delta (xor-files, enc): every top-level file is needed
        self.chosen: list[str] | None = None  # weight files picked by the caller instead
        self.storage = cache_storage(repo_id)
        self.folder = self.storage / "snapshots" / commit

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}"

    def resolved(self, given: str) -> Resolved:
        return Resolved(self.folder, given, self.repo_id, self.revision or "main", self.commit)

    def small_files(self) -> list[str]:
        names = [n for n in SMALL_FILES if n in self.files]
        names += sorted(n for n in self.files if is_aux_file(n) and n not in names)
        index, _ = self._weights_plan()
        return names + ([index] if index else [])

    def weight_files(self) -> list[str]:
        """One weight format, in the order ``folders.detect_layout`` prefers them.

        An OpenAssistant xor-files delta XORs every file, its index and config included, so
        for one (``--kind xor-files``, ``.gz`` payloads, or an index that is not JSON) every
        top-level file is taken; so for OpenBuddy's ``.enc`` files.
        """
        if self.chosen is not None:
            return self.chosen
        if self.is_xored():
            return [n for n in self.files if "/" not in n and n not in (".gitattributes", "README.md")]
        index, names = self._weights_plan()
        if index is None:
            if not names:
                raise FormatError(
                    f"{self.label}: no weights found (expected {SAFETENSORS_SINGLE}, "
                    f"{SAFETENSORS_INDEX}, {BIN_SINGLE}, {BIN_INDEX}, Meta's params.json with "
                    f"consolidated.*.pth, or a PEFT adapter)"
                )
            return names
        shards = list(dict.fromkeys(read_weight_map(self.folder / index).values()))
        for shard in shards:
            if shard not in self.files:
                raise FormatError(f"{self.label}: {index} names {shard}, which the repo lacks")
        return shards

    def is_encrypted(self) -> bool:
        """Whether this is OpenBuddy's enc delta: ``.enc`` files, XORed with a key, not a base."""
        return any(n.endswith(".enc") and "/" not in n for n in self.files)

    def is_xored(self) -> bool:
        """Whether this is a whole-file delta (decided once its small files are fetched)."""
        if not self.xored and (self.is_encrypted() or any(
            n.endswith(".gz") and "/" not in n for n in self.files
        )):
            self.xored = True
        index, _ = self._weights_plan()
        if not self.xored and index is not None and (self.folder / index).is_file():
            try:
                read_weight_map(self.folder / index)
            except FormatError:
                self.xored = True
        return self.xored

    def _weights_plan(self) -> tuple[str | None, list[str]]:
        """The index that names the shards, or the weight files themselves."""
        names = set(self.files)
        if ADAPTER_CONFIG in names:
            return None, [n for n in ADAPTER_WEIGHTS if n in names][:1]
        for name, _ in WEIGHT_ORDER:
            if name in names:
                return (name, []) if name.endswith(INDEX_SUFFIX) else (None, [name])
        meta = sorted(fnmatch.filter(names, "consolidated.*.pth"))
        if "params.json" in names and meta:
            return None, meta
        singles = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        if len(singles) == 1:
            return None, singles
        lone = lone_torch_file(sorted(names))
        return None, [lone] if lone else []

    def missing_bytes(self, names: Iterable[str]) -> int:
        """Bytes still to download: files whose blob is not in the cache yet."""
        return sum(
            self.files[n].size for n in names
            if not (self.storage / "blobs" / (self.files[n].blob or "-")).is_file()
        )

    def fetch(self, names: list[str]) -> None:
        """Download what the cache lacks (in parallel), then check every file's checksum."""
        todo = [n for n in names if not (self.folder / n).is_file()]
        if todo and self.offline:
            raise NotCachedError(
                f"{self.label}: {todo[0]} is not in the cache ({self.storage}) and "
                f"{self.offline}: run once online first"
            )
        if todo:
            _parallel(self._download, todo)
        pending = [n for n in names if self._unverified(n)]
        bar = step_bar(sum(self.files[n].size for n in pending), f"sha256 of {self.label}")

        def verify(name: str) -> None:
            bar.at(name)
            self._verify(name)
            bar.update(self.files[name].size)

        try:
            _parallel(verify, pending)
        finally:
            bar.close()

    def _unverified(self, name: str) -> bool:
        """Whether the file still has to be hashed (the Hub gave a checksum, none matched yet)."""
        expected = self.files[name]
        return expected.blob is not None and not _verified(expected.blob, (self.folder / name).resolve())

    def _download(self, name: str) -> None:
        with hub_errors(f"{self.label}/{name}", self.api.endpoint):
            hf.hf_hub_download(
                self.repo_id, name, revision=self.commit, endpoint=self.api.endpoint,
                token=self.api.token, library_name="deltamerge", library_version=__version__,
            )

    def _verify(self, name: str) -> None:
        """Hash one file ``_unverified`` named, against the Hub's checksum."""
        expected = self.files[name]
        path = self.folder / name
        blob = path.resolve()
        if expected.sha256 is not None:
            actual, want, algo = file_digest(blob, SHA256), expected.sha256, "sha256"
        else:
            actual, want, algo = git_blob_sha1(blob), expected.blob_id, "git sha1"
        if actual != want:
            # With Xet the repo's blob is a link into huggingface_hub's shared store (reused
            # across repos on its size alone): the file, the link and the snapshot's entry go.
            for p in (blob, self.storage / "blobs" / want, path):
                try:
                    p.unlink()
                except OSError:
                    pass
            raise VerificationError(
                f"{self.label}/{name}: {algo} {actual[:16]}… does not match the Hub's "
                f"{want[:16]}…: the download is corrupt (removed from the cache; run again to "
                "download it again)"
            )
        _mark_verified(want, blob)


def _parallel(fn: Callable[[str], None], names: list[str]) -> None:
    """``fn`` for each name on a few threads (downloads and hashing wait on I/O or drop the GIL)."""
    if len(names) <= 1:
        for n in names:
            fn(n)
        return
    pool = ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(names)))
    try:
        for future in [pool.submit(fn, n) for n in names]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def git_blob_sha1(path: Path) -> str:
    """Git's id of a file (the Hub's ``blobId`` of a regular file)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _marker(checksum: str, blob: Path) -> Path:
    """Where a match of this very file is remembered: one marker per checksum and inode, since
    several repos can hold the same file (a config, a mirrored shard) as blobs of their own."""
    st = blob.stat()
    return Path(hf_constants.HF_HOME) / "deltamerge" / "verified" / checksum / f"{st.st_dev}-{st.st_ino}"


def _identity(blob: Path) -> str:
    st = blob.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _verified(checksum: str, blob: Path) -> bool:
    """Whether this very blob (same inode, size and mtime) was hashed and matched before.

    A change that keeps all three (a byte rewritten in place, the mtime set back) is not seen
    here; the tensor digests every verified apply checks still see it (docs/design.md).
    """
    try:
        return _marker(checksum, blob).read_text() == _identity(blob)
    except OSError:
        return False


def _mark_verified(checksum: str, blob: Path) -> None:
    """Remember a match so a warm cache is not hashed again; a read-only HF_HOME just rehashes."""
    try:
        marker = _marker(checksum, blob)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(_identity(blob))
    except OSError:
        pass


def open_repo(text: str, api: HfApi) -> RemoteRepo:
    """The repo's commit and file list: from the Hub, or from the cache when offline."""
    from huggingface_hub.errors import RevisionResolutionError

    repo_id, revision = parse_repo_id(text)
    if hf.is_offline_mode():
        with hub_errors(text, api.endpoint):  # the client validates the id offline too
            return _cached_repo(text, api, repo_id, revision, "HF_HUB_OFFLINE is set")
    with hub_errors(text, api.endpoint):
        try:
            commit = api.resolve_revision(repo_id, revision=revision).resolved
            info = api.model_info(repo_id, revision=commit, files_metadata=True)
        except (RevisionResolutionError, *transport_errors()):
            reason = f"the Hub at {api.endpoint} cannot be reached"
            try:
                return _cached_repo(text, api, repo_id, revision, reason)
            except NotCachedError as exc:
                raise WorkError(str(exc)) from None
    files = {
        s.rfilename: RemoteFile(
            s.rfilename, s.lfs.size if s.lfs else s.size or 0, s.lfs.sha256 if s.lfs else None,
            None if s.lfs else s.blob_id,
        )
        for s in info.siblings or []
    }
    return RemoteRepo(api, repo_id, revision, info.sha or commit, files)


def _cached_repo(
    text: str, api: HfApi, repo_id: str, revision: str | None, reason: str
) -> RemoteRepo:
    """Offline: the commit a revision pointed to when last fetched, and the files cached for it.

    Their expected checksums are the blob names, which are the etags the Hub gave at download.
    """
    from huggingface_hub.errors import RevisionResolutionError

    try:
        commit = api.resolve_revision(repo_id, revision=revision, local_files_only=True).resolved
    except RevisionResolutionError:
        raise NotCachedError(
            f"{text}: not in the cache ({hf_constants.HF_HUB_CACHE}) and {reason}: run once "
            "online first"
        ) from None
    if not _SHA1.fullmatch(commit):  # read from a refs file: it names a folder of the cache
        raise NotCachedError(f"{text}: the cache's ref names {commit[:50]!r}, not a commit")
    repo = RemoteRepo(api, repo_id, revision, commit, {}, offline=reason)
    if not repo.folder.is_dir():
        raise NotCachedError(
            f"{text}: commit {commit[:12]} is not in the cache ({repo.storage}) and {reason}"
        )
    for entry in repo.folder.iterdir():
        if entry.is_file():
            blob = entry.resolve()
            name = blob.name if blob.parent.name == "blobs" else ""
            repo.files[entry.name] = RemoteFile(
                entry.name, blob.stat().st_size, name if _SHA256.fullmatch(name) else None,
                name if _SHA1.fullmatch(name) else None,
            )
    return repo


def check_cache_space(needed: int, what: str) -> None:
    """Refuse a download the Hub cache's disk cannot hold, naming both numbers."""
    folder = Path(hf_constants.HF_HUB_CACHE)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskSpaceError(
            f"{folder}: not enough free space to download {what}: {needed:,} bytes "
            f"({needed / 1e9:.2f} GB) needed, {free:,} bytes ({free / 1e9:.2f} GB) free"
        )


def download_input(
    text: str,
    role: str = "input",
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    api: HfApi | None = None,
    repos: dict[str, RemoteRepo] | None = None,
    weights: bool = True,
) -> Resolved:
    """Fetch (or find in the cache) what a job needs of a Hub repo, checked against the Hub.

    ``repos`` holds repos :func:`preflight` already opened (same commit, no second look-up);
    ``weights=False`` fetches only the small files (configs, manifests, index).
    """
    repo = (repos or {}).get(text) or open_repo(text, make_api(endpoint, token, api))
    repo.fetch(repo.small_files())
    if weights:
        names = repo.weight_files()
        check_cache_space(repo.missing_bytes(names), f"{repo.label} ({role})")
        repo.fetch(names)
    return repo.resolved(text)


# -- before the big download ----------------------------------------------------------------------
class HeaderSpecs:
    """Tensor specs read from headers (over HTTP for Hub repos): enough for ``check_pairing``;
    ``metadata``, each file's ``__metadata__`` (a delta's marks), by file name."""

    def __init__(self, label: str, specs: dict[str, TensorSpec], where: dict[str, str],
                 metadata: dict[str, dict[str, str]] | None = None):
        self.path, self.specs, self._where = label, specs, where
        self.metadata = metadata or {}

    def file_of(self, name: str) -> str:
        return f"{self.path}/{self._where[name]}"


def remote_specs(repo: RemoteRepo) -> HeaderSpecs | None:
    """The repo's tensors from its safetensors headers (a few KB each), or None for other formats.

    Each header is validated by the local reader's own parser (``formats/safetensors.py``),
    against the file's size the Hub lists: a remote header is as strictly checked as a local one.
    """
    names = repo.weight_files()
    if not all(n.endswith(".safetensors") for n in names):
        return None
    headers: dict[str, Header] = {}

    def read(name: str) -> None:
        with hub_errors(f"{repo.label}/{name}", repo.api.endpoint):
            headers[name] = _remote_header(repo, name)

    _parallel(read, names)
    specs, where = {}, {}
    for name in names:
        for tensor, stored in headers[name].tensors.items():
            specs[tensor] = stored.spec
            where[tensor] = name
    metadata = {name: dict(headers[name].metadata or {}) for name in names}
    return HeaderSpecs(repo.label, specs, where, metadata)


# huggingface_hub reads this much first: most headers are whole in it, saving a second request.
_FIRST_READ = 100_000


def _remote_header(repo: RemoteRepo, name: str) -> Header:
    """A safetensors file's header over HTTP (Range requests), parsed by the local parser."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    label = Path(f"{repo.label}/{name}")
    size = repo.files[name].size
    url = hf.hf_hub_url(repo.repo_id, name, revision=repo.commit, endpoint=repo.api.endpoint)
    http = build_hf_headers(token=repo.api.token, library_name=repo.api.library_name,
                            library_version=repo.api.library_version,
                            user_agent=repo.api.user_agent, headers=repo.api.headers)

    def get(first: int, last: int) -> bytes:
        response = get_session().get(url, headers={**http, "range": f"bytes={first}-{last}"},
                                     timeout=hf_constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(response)
        return response.content

    head = get(0, _FIRST_READ - 1) if size else b""
    n = header_length(label, head[:64], size)
    raw = head[8 : 8 + n] if 8 + n <= len(head) else get(8, 7 + n)
    if len(raw) != n:
        raise FormatError(f"{label}: truncated while reading its header")
    return parse_header(label, raw, size)
