"""The local Hub, exercised through the real huggingface_hub client over HTTP.

These tests pin the server's behaviour that the rest of the suite relies on: uploads go through
preupload + LFS + commit, downloads through HEAD/302/Range, and errors map to the client's typed
exceptions. Each test also checks that no request fell outside the implemented routes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hubserver import DEFAULT_TOKEN, HubServer, git_blob_sha
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    get_safetensors_metadata,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

pytest_plugins = ["hub_fixtures"]  # provides the ``hub`` fixture

REPO = "alice/tiny-model"
README = """---
license: apache-2.0
base_model: meta-llama/Llama-2-7b-hf
base_model_relation: finetune
tags:
- deltamerge
---
# Tiny model
"""


pytestmark = pytest.mark.usefixtures("all_routes_known")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder: small config, ~1 MB safetensors (LFS), README with YAML front matter."""
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"hidden_size": 512, "model_type": "llama"}))
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(512, 512, generator=generator),
        "norm.weight": torch.ones(512, dtype=torch.bfloat16),
    }
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    (root / "README.md").write_text(README)
    return root


@pytest.fixture
def uploaded(api: HfApi, folder: Path) -> str:
    """Create the repo and upload ``folder``; returns the commit sha."""
    api.create_repo(REPO, exist_ok=True)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add model").oid


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_upload_goes_through_lfs_and_model_info_reports_checksums(
    hub: HubServer, api: HfApi, folder: Path, uploaded: str
) -> None:
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == uploaded == hub.head(REPO)
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {".gitattributes", "config.json", "model.safetensors", "README.md"}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None
    assert weights.lfs.sha256 == _sha256(folder / "model.safetensors")
    assert weights.size == (folder / "model.safetensors").stat().st_size > 1_000_000
    config = siblings["config.json"]
    assert config.lfs is None
    assert config.blob_id == git_blob_sha((folder / "config.json").read_bytes())
    assert info.card_data is not None
    assert info.card_data.base_model == "meta-llama/Llama-2-7b-hf"
    assert info.card_data.to_dict()["base_model_relation"] == "finetune"
    assert [status for _, _, status in hub.requests_to("/lfs-upload/", "PUT")] == [200]
    assert hub.requests_to("/info/lfs/objects/verify")
    assert hub.files(REPO)["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_create_repo_conflict(api: HfApi, hub: HubServer) -> None:
    first = api.create_repo(REPO)
    assert first.repo_id == REPO
    assert api.create_repo(REPO, exist_ok=True) == first
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo("no-namespace").repo_id == f"{hub.user}/no-namespace"


def test_snapshot_download_into_fresh_cache(
    hub: HubServer, folder: Path, uploaded: str, tmp_path: Path
) -> None:
    local = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache"))
    assert local.name == uploaded
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (local / name).read_bytes() == (folder / name).read_bytes()
    assert hub.requests_to("/lfs-objects/", "GET")[0][2] == 200
    # snapshot_download with a default cache uses the patched HF_HOME, never ~/.cache
    default = Path(snapshot_download(REPO))
    assert str(default).startswith(str(tmp_path))


def test_download_by_commit_sha_and_branch(hub: HubServer, api: HfApi, uploaded: str, tmp_path: Path) -> None:
    new = api.create_commit(
        REPO,
        operations=[CommitOperationAdd("config.json", b'{"hidden_size": 1}')],
        commit_message="v2",
        parent_commit=uploaded,
    ).oid
    assert new != uploaded
    cache = tmp_path / "cache"
    old_cfg = hf_hub_download(REPO, "config.json", revision=uploaded, endpoint=hub.url, cache_dir=cache)
    assert json.loads(Path(old_cfg).read_text())["hidden_size"] == 512
    new_cfg = hf_hub_download(REPO, "config.json", endpoint=hub.url, cache_dir=cache)
    assert Path(new_cfg).read_bytes() == b'{"hidden_size": 1}'
    with pytest.raises(HfHubHTTPError) as err:  # parentCommit no longer the head
        api.create_commit(
            REPO, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=uploaded
        )
    assert err.value.response.status_code == 412
    api.create_branch(REPO, branch="dev", revision=uploaded)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    dev = hf_hub_download(REPO, "dev.txt", revision="dev", endpoint=hub.url, cache_dir=cache)
    assert Path(dev).read_bytes() == b"dev"
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "dev"}


def test_safetensors_metadata_reads_only_the_header(hub: HubServer, api: HfApi, uploaded: str) -> None:
    meta = api.get_safetensors_metadata(REPO)
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert tensors["embed.weight"].shape == [512, 512]
    assert tensors["norm.weight"].dtype == "BF16"
    assert get_safetensors_metadata(REPO).weight_map == meta.weight_map  # module-level helper too
    weight_gets = hub.requests_to("/lfs-objects/", "GET")
    assert weight_gets and all(status == 206 for _, _, status in weight_gets)


def test_unchanged_upload_makes_no_commit_and_no_lfs_transfer(
    hub: HubServer, api: HfApi, folder: Path, uploaded: str
) -> None:
    hub.log.clear()
    again = api.upload_folder(repo_id=REPO, folder_path=folder)
    assert again.oid == uploaded == hub.head(REPO)
    assert not hub.requests_to("/commit/") and not hub.requests_to("/lfs-upload/")
    # the client still asks the LFS batch endpoint; no actions come back, so no bytes are sent
    assert [e[2] for e in hub.requests_to("objects/batch")] == [200]
    (folder / "config.json").write_text("{}")
    changed = api.upload_folder(repo_id=REPO, folder_path=folder)
    assert changed.oid != uploaded
    assert not hub.requests_to("/lfs-upload/")


def test_create_pr(hub: HubServer, api: HfApi, folder: Path, uploaded: str) -> None:
    (folder / "config.json").write_text('{"pr": true}')
    pr = api.upload_folder(repo_id=REPO, folder_path=folder, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert pr.pr_url == f"{hub.url}/{REPO}/discussions/1"
    assert hub.head(REPO) == uploaded  # main untouched
    assert hub.head(REPO, "refs/pr/1") == pr.oid
    path = hf_hub_download(REPO, "config.json", revision=pr.pr_revision, endpoint=hub.url)
    assert Path(path).read_text() == '{"pr": true}'
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests or []] == ["refs/pr/1"]


def test_errors_map_to_typed_exceptions(hub: HubServer, api: HfApi, uploaded: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/missing", "config.json", endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json", endpoint=hub.url)
    assert not api.file_exists(REPO, "missing.json")
    hub.assert_clean()
    assert ("GET", "/api/models/alice/missing", 404) in hub.log  # with a token: 404
    assert ("HEAD", "/alice/missing/resolve/main/config.json", 401) in hub.log  # without: 401


def test_private_repo_needs_the_token(hub: HubServer, folder: Path) -> None:
    owner = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)
    owner.create_repo(REPO, private=True)
    owner.upload_folder(repo_id=REPO, folder_path=folder)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "model.safetensors", endpoint=hub.url)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").model_info(REPO)
    assert err.value.response.status_code == 401
    assert owner.model_info(REPO).private is True
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, token=DEFAULT_TOKEN)
    assert _sha256(path) == _sha256(folder / "model.safetensors")


def test_corrupt_lfs_is_only_caught_by_checksums(
    hub: HubServer, api: HfApi, folder: Path, uploaded: str, tmp_path: Path
) -> None:
    hub.corrupt_lfs(REPO, "model.safetensors")
    path = hf_hub_download(REPO, "model.safetensors", endpoint=hub.url, cache_dir=tmp_path / "c")
    recorded = api.model_info(REPO, files_metadata=True).siblings
    expected = next(s.lfs.sha256 for s in recorded or [] if s.lfs)
    assert expected == _sha256(folder / "model.safetensors")
    assert _sha256(path) != expected  # the client accepted the bytes: only size is checked
    result = api.verify_repo_checksums(REPO, cache_dir=tmp_path / "c")
    assert [m["path"] for m in result.mismatches] == ["model.safetensors"]


def test_tree_pagination_and_paths_info(hub: HubServer, api: HfApi, uploaded: str) -> None:
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="sub/dir/a.json", repo_id=REPO)
    hub.tree_page_size = 2
    recursive = list(api.list_repo_tree(REPO, recursive=True))
    assert {e.path for e in recursive} >= {"sub", "sub/dir", "sub/dir/a.json", "model.safetensors"}
    assert len(hub.requests_to("/tree/")) > 2
    top = {e.path for e in api.list_repo_tree(REPO)}
    assert "sub" in top and "sub/dir" not in top
    assert [e.path for e in api.list_repo_tree(REPO, "sub/dir")] == ["sub/dir/a.json"]
    infos = api.get_paths_info(REPO, ["model.safetensors", "sub", "missing"])
    assert [i.path for i in infos] == ["model.safetensors", "sub"]
    assert api.list_repo_files(REPO)[-1] == "sub/dir/a.json"


def test_seeded_sharded_repo_without_endpoint_argument(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    shards = {}
    for i, name in enumerate(("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
        save_file({f"layer{i}.weight": torch.full((4, 4), float(i))}, tmp_path / name)
        shards[name] = (tmp_path / name).read_bytes()
    index = {"metadata": {}, "weight_map": {f"layer{i}.weight": n for i, n in enumerate(shards)}}
    sha = hub.seed(
        "bob/sharded",
        {**shards, "model.safetensors.index.json": json.dumps(index).encode(), "README.md": README.encode()},
    )
    assert hub.head("bob/sharded") == sha
    # no endpoint= anywhere: the fixture points huggingface_hub's import-time constants at the server
    meta = get_safetensors_metadata("bob/sharded")
    assert meta.sharded and set(meta.weight_map) == {"layer0.weight", "layer1.weight"}
    assert ModelCard.load("bob/sharded").data.base_model == "meta-llama/Llama-2-7b-hf"
    assert hub.requests_to("/lfs-objects/", "GET") and all(
        s == 206 for _, _, s in hub.requests_to("/lfs-objects/")
    )
    api.delete_file("README.md", repo_id="bob/sharded")
    api.delete_files("bob/sharded", delete_patterns=["*.safetensors"])
    assert sorted(hub.files("bob/sharded")) == [".gitattributes", "model.safetensors.index.json"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("README.md", repo_id="bob/sharded")
