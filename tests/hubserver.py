"""A small, real Hugging Face Hub HTTP server for tests.

The test suite runs the real ``huggingface_hub`` client (2.4) over real HTTP against this server on
127.0.0.1, so uploads, downloads, redirects, Range reads and error mapping are exercised exactly as
they would be against the Hub, without monkeypatching the client and without the internet.

Only what the client needs is implemented; any request that hits no route is answered 404 *without*
an ``X-Error-Code`` and recorded in ``HubServer.unhandled`` so that a test can assert it is empty.

LFS objects are served (and uploaded) on ``http://localhost:PORT`` while the API lives on
``http://127.0.0.1:PORT``: the client treats them as different origins, exactly like the Hub and its
CDN/S3, so the HEAD of an LFS file stops at the 302 (which carries the file metadata) and the
``Authorization`` header is never forwarded to the storage URLs.

Three switches stand in for what a real network and the Hub's storage do: ``drop_connections``
closes the connection of chosen requests without an answer (a dropped connection, mid-upload or
at the commit), ``fail_requests`` answers chosen requests with an HTTP error (a Hub outage),
and ``xet = True`` announces LFS files as stored in Xet (``X-Xet-Hash`` on their
HEAD), which sends the client down its Xet download path. No Xet CAS is served: tests put the
bytes where hf_xet would (its shared blob store) or stand in for the transfer itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

DEFAULT_TOKEN = "hf_test_deltamerge_token"
DEFAULT_USER = "test-user"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gz", ".pt")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = b"".join(
    f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for s in (*LFS_SUFFIXES, ".msgpack", ".zip", ".pkl")
)
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA1 = re.compile(r"[0-9a-f]{40}")
# The CLI fetches this registry on every run, even with telemetry disabled: answer "no agents".
_NO_AGENTS = {"standardEnvVars": [], "harnesses": {}}

Json = dict[str, Any]
Response = tuple[int, dict[str, str], bytes]


def git_blob_sha(data: bytes) -> str:
    """Git's id of a blob: the Hub's ``blobId``/``oid``, and the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The pointer file git stores for an LFS object; its git sha is the LFS file's ``blobId``."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Blob:
    """One file of a commit: inline bytes (regular file) or an LFS object's sha256."""

    size: int
    blob_id: str
    data: bytes | None = None
    lfs_oid: str | None = None
    pointer_size: int = 0


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    date: str


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created: str = field(default_factory=_now)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytearray] = field(default_factory=dict)  # sha256 -> bytes, per repo
    discussions: int = 0


class HubError(Exception):
    """An error answered like the Hub does: ``X-Error-Code`` picks the client's exception."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Request:
    method: str
    raw_path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: HTTPMessage
    body: bytes
    authenticated: bool

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return (status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(data).encode())


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's upload-mode rule: big files, binary samples and weight suffixes go to LFS."""
    return size > LFS_SIZE_THRESHOLD or path.endswith(LFS_SUFFIXES) or b"\0" in sample


def _front_matter(text: str) -> Json | None:
    """The README's YAML front matter (the Hub's ``cardData``); ValueError if it is not YAML."""
    match = re.match(r"^---\s*\n(.*?)\n?---\s*(\n|$)", text, re.S)
    if not match:
        return None
    import yaml  # a dependency of huggingface_hub itself

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in README.md: {err}") from err
    return data if isinstance(data, dict) else None


def _card_data(commit: Commit) -> Json | None:
    readme = commit.files.get("README.md")
    if readme is None or readme.data is None:
        return None
    try:
        return _front_matter(readme.data.decode("utf-8", "replace"))
    except ValueError:
        return None


@dataclass
class Drop:
    """A rule of :meth:`HubServer.drop_connections`; ``stop()`` ends it."""

    fragment: str
    method: str | None
    after: int
    times: int | None
    seen: int = 0
    active: bool = True

    def matches(self, method: str, path: str) -> bool:
        if not self.active or self.fragment not in path or self.method not in (None, method):
            return False
        self.seen += 1
        if self.seen <= self.after:
            return False
        return self.times is None or self.seen <= self.after + self.times

    def stop(self) -> None:
        self.active = False


class HubServer:
    """In-memory Hub: repos -> refs -> commits -> {path: Blob}, LFS objects by sha256.

    ``log`` holds ``(method, unquoted path without query, status)`` for every request;
    ``unhandled`` holds ``(method, path)`` for requests that matched no route; ``errors`` holds
    tracebacks of server bugs (answered 501, which the client does not retry).
    """

    def __init__(self, token: str = DEFAULT_TOKEN, user: str = DEFAULT_USER, tree_page_size: int = 1000):
        self.tokens = {token}
        self.user = user
        self.tree_page_size = tree_page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str, int]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.xet = False  # announce LFS files as stored in Xet (X-Xet-Hash on their HEAD)
        self.drops: list[Drop] = []  # connections to drop, as a network failure would
        self.dropped: list[tuple[str, str]] = []  # (method, path) of requests whose connection was dropped
        self.failures: list[tuple[Drop, int]] = []  # requests answered with an HTTP error status
        self._lock = threading.RLock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._connections: set[Any] = set()
        T, R = r"(?P<type>models|datasets|spaces)", r"(?P<repo>[^/]+/[^/]+)"
        P = r"(?:(?P<type>datasets|spaces)/)?" + R
        routes: list[tuple[str, str, Callable[[Request], Response]]] = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("DELETE", r"/api/repos/delete", self._delete_repo),
            ("GET", r"/api/whoami-v2", self._whoami),
            ("GET", r"/api/agent-harnesses", lambda req: _json(_NO_AGENTS)),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", rf"/api/{T}/{R}(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", rf"/api/{T}/{R}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
            ("POST", rf"/api/{T}/{R}/paths-info/(?P<rev>[^/]+)", self._paths_info),
            ("POST", rf"/api/{T}/{R}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/{T}/{R}/commit/(?P<rev>[^/]+)", self._commit),
            ("GET", rf"/api/{T}/{R}/refs", self._refs),
            ("POST", rf"/api/{T}/{R}/branch/(?P<branch>[^/]+)", self._create_branch),
            ("DELETE", rf"/api/{T}/{R}/branch/(?P<branch>[^/]+)", self._delete_branch),
            ("POST", rf"/{P}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", rf"/{P}\.git/info/lfs/objects/verify", self._lfs_verify),
            ("PUT", rf"/lfs-upload/{T}/{R}/(?P<oid>[0-9a-f]{{64}})", self._lfs_put),
            ("GET", rf"/lfs-objects/{T}/{R}/(?P<oid>[0-9a-f]{{64}})", self._lfs_get),
            ("GET", rf"/{P}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self._resolve_file),
        ]
        self._routes = [(m, re.compile(rx), fn) for m, rx, fn in routes]

    # ----------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The API endpoint, to pass as ``endpoint=`` / ``HF_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        """The same server under another origin, standing in for the Hub's CDN and S3."""
        return f"http://localhost:{self.port}"

    def start(self) -> HubServer:
        handler = type("BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="hubserver", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        """Stop serving; drop kept-alive connections so no pooled client reaches a stopped server."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for sock in list(self._connections):
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- test helpers
    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha a branch (or ``refs/pr/N``) points to."""
        return self._resolve(self.repos[(repo_type, repo_id)], revision)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Content of every file at a revision (LFS objects inlined)."""
        repo = self.repos[(repo_type, repo_id)]
        commit = repo.commits[self._resolve(repo, revision)]
        return {
            p: bytes(b.data if b.lfs_oid is None else repo.lfs[b.lfs_oid]) for p, b in commit.files.items()
        }

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        repo_type: str = "model",
        message: str = "seed",
    ) -> str:
        """Create (if needed) a repo and commit ``files`` to main without HTTP; return the sha.

        Files become LFS or regular by the same rule as ``preupload``, so downloads look like
        those of an uploaded repo, while fixtures stay fast.
        """
        with self._lock:
            repo = self.repos.get((repo_type, repo_id)) or self._new_repo(repo_type, repo_id, private)
            blobs = {}
            for path, data in files.items():
                if _wants_lfs(path, len(data), data[:512]):
                    oid = hashlib.sha256(data).hexdigest()
                    repo.lfs[oid] = bytearray(data)
                    blobs[path] = self._lfs_blob(oid, len(data))
                else:
                    blobs[path] = Blob(len(data), git_blob_sha(data), data=data)
            parent = repo.refs["main"]
            sha = self._add_commit(repo, parent, {**repo.commits[parent].files, **blobs}, message)
            repo.refs["main"] = sha
            return sha

    def corrupt_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> None:
        """Flip a byte of a stored LFS object, keeping its recorded sha256 and size."""
        repo = self.repos[(repo_type, repo_id)]
        blob = repo.commits[self._resolve(repo, revision)].files[path]
        if blob.lfs_oid is None:
            raise ValueError(f"{path} is not an LFS file")
        obj = repo.lfs[blob.lfs_oid]
        obj[len(obj) // 2] ^= 0xFF

    @staticmethod
    def xet_hash(oid: str) -> str:
        """The Xet file hash announced for an LFS object (a stand-in: no CAS serves it here)."""
        return hashlib.sha256(b"xet:" + oid.encode()).hexdigest()

    def drop_connections(
        self, fragment: str, method: str | None = None, *, after: int = 0, times: int | None = 1
    ) -> Drop:
        """Close the connection, answering nothing, on requests whose path contains ``fragment``.

        The first ``after`` matching requests are served; the next ``times`` (None: all, until
        ``drop.stop()``) lose their connection once their body has been read, as when the network
        fails mid-transfer. The client sees a dropped connection, never an HTTP status.
        """
        drop = Drop(fragment, method, after, times)
        with self._lock:
            self.drops.append(drop)
        return drop

    def fail_requests(
        self, fragment: str, status: int = 500, method: str | None = None, *, times: int | None = None
    ) -> Drop:
        """Answer ``status`` (with the Hub's JSON error body) to requests whose path contains
        ``fragment``: the next ``times`` of them (None: all, until ``rule.stop()``)."""
        rule = Drop(fragment, method, 0, times)
        with self._lock:
            self.failures.append((rule, status))
        return rule

    def _failure(self, method: str, path: str) -> int | None:
        with self._lock:
            return next((status for rule, status in self.failures if rule.matches(method, path)), None)

    def _should_drop(self, method: str, path: str) -> bool:
        with self._lock:
            for drop in self.drops:
                if drop.matches(method, path):
                    self.dropped.append((method, path))
                    return True
        return False

    def requests_to(self, fragment: str, method: str | None = None) -> list[tuple[str, str, int]]:
        """Log entries whose path contains ``fragment``, e.g. ``"/lfs-objects/"``."""
        return [e for e in self.log if fragment in e[1] and (method is None or e[0] == method)]

    def assert_clean(self) -> None:
        """Fail if a request hit no route or the server itself raised."""
        assert self.unhandled == [], f"requests with no route: {self.unhandled}"
        assert self.errors == [], "hubserver raised:\n" + "\n".join(self.errors)

    # ----------------------------------------------------------------- internals
    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        """Like the Hub, a new repo starts with one commit holding a ``.gitattributes``."""
        repo = Repo(repo_type, repo_id, private)
        files = {".gitattributes": Blob(len(GITATTRIBUTES), git_blob_sha(GITATTRIBUTES), data=GITATTRIBUTES)}
        repo.refs["main"] = self._add_commit(repo, None, files, "initial commit")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def _add_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob], title: str) -> str:
        self._commit_counter += 1
        seed = json.dumps(
            [repo.id, parent, title, self._commit_counter, sorted((p, b.blob_id) for p, b in files.items())]
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = Commit(sha, parent, files, title, _now())
        return sha

    @staticmethod
    def _lfs_blob(oid: str, size: int) -> Blob:
        pointer = lfs_pointer(oid, size)
        return Blob(size, git_blob_sha(pointer), lfs_oid=oid, pointer_size=len(pointer))

    def _repo(self, req: Request, write: bool = False, signed: bool = False) -> Repo:
        """The request's repo; without a valid token, private and missing repos look the same.

        ``signed`` marks storage URLs (LFS uploads and downloads): on the Hub they are pre-signed,
        so they need no token, and the client deliberately sends none.
        """
        repo_type = _TYPES.get(req.params.get("type") or "models", "model")
        if write and not req.authenticated:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self.repos.get((repo_type, req.params["repo"]))
        if repo is None or (repo.private and not (req.authenticated or signed)):
            status = 404 if req.authenticated else 401
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _resolve(repo: Repo, rev: str) -> str:
        rev = rev.removeprefix("refs/heads/")
        if rev in repo.refs:
            return repo.refs[rev]
        if _SHA1.fullmatch(rev) and rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _branch(self, repo: Repo, rev: str) -> str:
        """Commits go to branches (or PR refs) only, never to a detached sha."""
        rev = rev.removeprefix("refs/heads/")
        if rev not in repo.refs:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return rev

    def _commit_at(self, req: Request) -> tuple[Repo, Commit]:
        repo = self._repo(req)
        return repo, repo.commits[self._resolve(repo, req.params.get("rev") or "main")]

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.type]}{repo.id}"

    # ----------------------------------------------------------------- account / repos
    def _create_repo(self, req: Request) -> Response:
        if not req.authenticated:
            raise HubError(401, "You must be authenticated to create a repo")
        body = req.json()
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        repo_type = body.get("type") or "model"
        private = body.get("visibility") == "private" or bool(body.get("private"))
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                url = self._repo_url(self.repos[(repo_type, repo_id)])
                return _json({"error": "You already created this repo", "url": url}, 409)
            repo = self._new_repo(repo_type, repo_id, private)
        return _json({"url": self._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: Request) -> Response:
        body = req.json()
        req.params.update(repo=f"{body.get('organization') or self.user}/{body['name']}")
        req.params["type"] = {v: k for k, v in _TYPES.items()}[body.get("type") or "model"]
        repo = self._repo(req, write=True)
        with self._lock:
            del self.repos[(repo.type, repo.id)]
        return _json({})

    def _whoami(self, req: Request) -> Response:
        if not req.authenticated:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _json(
            {"type": "user", "name": self.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        )

    def _validate_yaml(self, req: Request) -> Response:
        try:
            _front_matter(req.json().get("content", ""))
        except ValueError as err:
            return _json({"errors": [{"message": str(err)}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    # ----------------------------------------------------------------- read API
    def _info(self, req: Request) -> Response:
        repo, commit = self._commit_at(req)
        card = _card_data(commit) or {}
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: Json = {"rfilename": path}
            if req.flag("blobs"):
                sibling.update(size=blob.size, blobId=blob.blob_id)
                if blob.lfs_oid:
                    sibling["lfs"] = {
                        "sha256": blob.lfs_oid,
                        "size": blob.size,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        tags = card.get("tags") or []
        return _json(
            {
                "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24],
                "id": repo.id,
                "author": repo.id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": tags if isinstance(tags, list) else [tags],
                "library_name": card.get("library_name"),
                "pipeline_tag": card.get("pipeline_tag"),
                "createdAt": repo.created,
                "lastModified": commit.date,
                "cardData": card or None,
                "siblings": siblings,
            }
        )

    @staticmethod
    def _file_entry(path: str, blob: Blob, commit: Commit, expand: bool) -> Json:
        entry: Json = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": path}
        if blob.lfs_oid:
            entry["lfs"] = {"oid": blob.lfs_oid, "size": blob.size, "pointerSize": blob.pointer_size}
        if expand:  # the Hub names the last commit touching the file; the current one will do
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    @staticmethod
    def _dir_entry(path: str, commit: Commit) -> Json:
        return {
            "type": "directory",
            "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def _tree(self, req: Request) -> Response:
        _, commit = self._commit_at(req)
        base = (req.params.get("path") or "").strip("/")
        prefix = f"{base}/" if base else ""
        if base and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{base} does not exist on this revision", "EntryNotFound")
        recursive, items, seen = req.flag("recursive"), [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                if folder not in seen:
                    seen.add(folder)
                    items.append(self._dir_entry(folder, commit))
            if recursive or len(parts) == 1:
                items.append(self._file_entry(path, commit.files[path], commit, req.flag("expand")))
        cursor = int(req.query.get("cursor", ["0"])[0])
        page, headers = items[cursor : cursor + self.tree_page_size], {}
        if cursor + self.tree_page_size < len(items):
            query = {k: v[0] for k, v in req.query.items()} | {"cursor": str(cursor + self.tree_page_size)}
            headers["Link"] = f'<{self.url}{req.raw_path}?{urlencode(query)}>; rel="next"'
        return _json(page, headers=headers)

    def _paths_info(self, req: Request) -> Response:
        _, commit = self._commit_at(req)
        form = parse_qs(req.body.decode())  # a form: repeated ``paths`` fields and ``expand``
        expand = form.get("expand", ["false"])[0].lower() == "true"
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                out.append(self._file_entry(path, commit.files[path], commit, expand))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(self._dir_entry(path, commit))
        return _json(out)

    def _refs(self, req: Request) -> Response:
        repo = self._repo(req)
        refs = [(name, sha) for name, sha in sorted(repo.refs.items())]
        branches = [
            {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
            for n, s in refs
            if not n.startswith("refs/")
        ]
        prs = [{"name": n, "ref": n, "targetCommit": s} for n, s in refs if n.startswith("refs/pr/")]
        return _json(
            {
                "branches": branches,
                "tags": [],
                "converts": [],
                **({"pullRequests": prs} if req.flag("include_prs") else {}),
            }
        )

    def _resolve_file(self, req: Request) -> Response:
        repo = self._repo(req)
        sha = self._resolve(repo, req.params["rev"])
        blob = repo.commits[sha].files.get(req.params["path"])
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha}
        if blob.lfs_oid is not None:
            location = f"{self.cdn_url}/lfs-objects/{repo.type}s/{repo.id}/{blob.lfs_oid}"
            headers |= {"Location": location, "X-Linked-Etag": f'"{blob.lfs_oid}"'}
            if self.xet:  # what the Hub adds for files stored in Xet: the client then fetches
                # them through hf_xet (or its shared blob store), not through this redirect
                headers |= {
                    "X-Xet-Hash": self.xet_hash(blob.lfs_oid),
                    "X-Xet-Refresh-Route": f"{self.url}/api/{repo.type}s/{repo.id}/xet-read-token/{sha}",
                }
            return 302, headers | {"X-Linked-Size": str(blob.size)}, b""
        assert blob.data is not None
        return _ranged(req, blob.data, headers | {"ETag": f'"{blob.blob_id}"'})

    # ----------------------------------------------------------------- write API
    def _preupload(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        commit = repo.commits[self._resolve(repo, req.params["rev"])]
        out = []
        for f in req.json()["files"]:
            lfs = _wants_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None and (existing.lfs_oid is not None) == lfs:
                oid = existing.lfs_oid or existing.blob_id  # compared with the local oid
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return _json({"files": out, "commitOid": commit.sha})

    def _lfs_batch(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        body = req.json()
        if body.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: Json = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs:  # known objects get no actions: the client skips them
                verify = f"{self.url}/{_URL_PREFIX[repo.type]}{repo.id}.git/info/lfs/objects/verify"
                entry["actions"] = {
                    "upload": {"href": f"{self.cdn_url}/lfs-upload/{repo.type}s/{repo.id}/{oid}"},
                    "verify": {"href": verify},
                }
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, req: Request) -> Response:
        repo = self._repo(req, signed=True)
        oid = req.params["oid"]
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match the oid")
        with self._lock:
            repo.lfs[oid] = bytearray(req.body)
        return 200, {"ETag": f'"{oid}"'}, b""

    def _lfs_verify(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        body = req.json()
        obj = repo.lfs.get(body["oid"])
        if obj is None or len(obj) != body["size"]:
            raise HubError(404, "LFS object not found or wrong size")
        return _json({"message": "ok"})

    def _lfs_get(self, req: Request) -> Response:
        repo = self._repo(req, signed=True)
        obj = repo.lfs.get(req.params["oid"])
        if obj is None:
            raise HubError(404, "no such object")
        return _ranged(req, bytes(obj), {"ETag": f'"{req.params["oid"]}"'})

    def _commit(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        with self._lock:
            branch = self._branch(repo, req.params["rev"])
            parent = repo.refs[branch]
            if header.get("parentCommit") not in (None, parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[parent].files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"].strip("/")
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path] = Blob(len(data), git_blob_sha(data), data=data)
                elif key == "lfsFile":
                    obj = repo.lfs.get(value["oid"])
                    if obj is None:
                        raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                    files[path] = self._lfs_blob(value["oid"], len(obj))
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    files = {p: b for p, b in files.items() if not p.startswith(path + "/")}
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            sha = self._add_commit(repo, parent, files, header.get("summary") or "commit")
            pr_url = None
            if req.flag("create_pr"):
                repo.discussions += 1
                repo.refs[f"refs/pr/{repo.discussions}"] = sha
                pr_url = f"{self._repo_url(repo)}/discussions/{repo.discussions}"
            else:
                repo.refs[branch] = sha
        return _json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{sha}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    def _create_branch(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        with self._lock:
            if req.params["branch"] in repo.refs:
                raise HubError(409, "Reference already exists")
            start = (json.loads(req.body) if req.body else {}).get("startingPoint") or "main"
            repo.refs[req.params["branch"]] = self._resolve(repo, start)
        return _json({})

    def _delete_branch(self, req: Request) -> Response:
        repo = self._repo(req, write=True)
        with self._lock:
            del repo.refs[self._branch(repo, req.params["branch"])]
        return _json({})


def _ranged(req: Request, data: bytes, headers: dict[str, str]) -> Response:
    """Serve ``data`` honouring one ``Range: bytes=a-b`` (or ``a-``, ``-n``), like S3 does."""
    headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    spec = req.headers.get("Range")
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip()) if spec else None
    if match is None or match.groups() == ("", ""):
        return 200, headers, data
    first, last = match.groups()
    total = len(data)
    start, end = (
        (total - int(last), total - 1)
        if first == ""
        else (int(first), min(int(last or total - 1), total - 1))
    )
    if start >= total or start > end:
        return 416, headers | {"Content-Range": f"bytes */{total}"}, b""
    start = max(start, 0)
    return 206, headers | {"Content-Range": f"bytes {start}-{end}/{total}"}, data[start : end + 1]


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to ``HubServer``; HTTP/1.1 keep-alive like the Hub, so bodies are framed."""

    protocol_version = "HTTP/1.1"
    timeout = 60
    hub: HubServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACK cost 40 ms each
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        method = "GET" if self.command == "HEAD" else self.command
        body = self._read_body()
        auth = self.headers.get("Authorization", "")
        token_ok = auth.startswith("Bearer ") and auth[7:] in self.hub.tokens
        if self.hub._should_drop(self.command, unquote(split.path)):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        status = self.hub._failure(self.command, unquote(split.path))
        if status is not None:
            status, headers, payload = _json({"error": "Internal Error"}, status)
            return self._send(status, headers, payload, unquote(split.path))
        for route_method, regex, fn in self.hub._routes:
            match = regex.fullmatch(split.path) if route_method == method else None
            if match is None:
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            req = Request(
                self.command, split.path, params, parse_qs(split.query), self.headers, body, token_ok
            )
            try:
                if auth and not token_ok:
                    raise HubError(401, "Invalid credentials in Authorization header")
                status, headers, payload = fn(req)
            except HubError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                status, headers, payload = _json({"error": err.message}, err.status, headers)
            except Exception as err:  # a server bug: 501, which (unlike 500) is not retried
                with self.hub._lock:
                    self.hub.errors.append(traceback.format_exc())
                status, headers, payload = _json({"error": f"hubserver bug: {err!r}"}, 501)
            return self._send(status, headers, payload, unquote(split.path))
        with self.hub._lock:
            self.hub.unhandled.append((self.command, unquote(split.path)))
        self._send(404, {"Content-Type": "application/json"}, b'{"error": "no route"}', unquote(split.path))

    def _send(self, status: int, headers: dict[str, str], payload: bytes, path: str) -> None:
        with self.hub._lock:
            self.hub.log.append((self.command, path, status))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
