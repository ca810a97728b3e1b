"""Hub repos as inputs and outputs, with the real huggingface_hub client over HTTP.

Every test runs against the local Hub server of ``hubserver.py`` (a fresh one and a fresh
HF_HOME per test) and ends by checking that no request fell outside the routes it implements.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import (
    FFN,
    HIDDEN,
    assert_states_equal,
    llama_state,
    load_state,
    run_cli,
    run_in_process,
    save_checkpoint,
)
from hubserver import DEFAULT_TOKEN, HubServer
from huggingface_hub import HfApi, ModelCard, constants

from deltamerge import apply_delta, make_delta, push_to_hub
from deltamerge.cli import main
from deltamerge.errors import (
    DiskSpaceError,
    MismatchError,
    NotFoundError,
    VerificationError,
    WorkError,
)
from deltamerge.sources.hub import HubAuthError, NotCachedError, check_cache_space, download_input, open_repo

pytest_plugins = ["hub_fixtures"]

LICENSED_CARD = b"""---
license: other
license_name: llama2
license_link: https://ai.meta.com/llama/license/
---
# base
"""


pytestmark = pytest.mark.usefixtures("all_routes_known")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    """A base, a fine-tune's delta made by make-delta, and the local rebuild (built once)."""
    root = tmp_path_factory.mktemp("models")
    base = save_checkpoint(llama_state(0), root / "base")
    target = save_checkpoint(llama_state(1), root / "target")
    delta = root / "delta"
    make_delta(base, target, delta)
    local = apply_delta(base, delta, root / "local")
    return SimpleNamespace(base=base, target=target, delta=delta, local=local, out=root / "local")


def publish(api: HfApi, models: SimpleNamespace) -> tuple[str, str]:
    """Push the base and the delta; their commit shas."""
    base = push_to_hub(models.base, "alice/base", api=api)
    delta = push_to_hub(models.delta, "alice/delta", api=api)
    return base.commit, delta.commit


def weight_downloads(hub: HubServer) -> list[tuple[str, str, int]]:
    """Whole-file reads of LFS objects (header reads answer 206)."""
    return [e for e in hub.requests_to("/lfs-objects/", "GET") if e[2] != 206]


def test_apply_from_the_hub_matches_the_local_run(hub, api, models, tmp_path):
    base_sha, delta_sha = publish(api, models)
    info = api.model_info("alice/delta", files_metadata=True)
    lfs = {s.rfilename for s in info.siblings if s.lfs}
    assert "model.safetensors" in lfs  # the weights went through LFS
    hub.log.clear()

    out = tmp_path / "out"
    result = apply_delta("alice/base", "alice/delta@main", out, hub={"api": api})

    assert result.model_digest == models.local.model_digest and result.verified
    assert_states_equal(load_state(out), load_state(models.out))
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["base"] == {"repo_id": "alice/base", "revision": "main", "commit": base_sha}
    assert record["deltas"] == [
        {"repo_id": "alice/delta", "revision": "main", "commit": delta_sha, "kind": "add"}
    ]
    assert len(weight_downloads(hub)) == 2  # each weight file once, nothing else
    markers = {p.name for p in (Path(constants.HF_HOME) / "deltamerge" / "verified").iterdir()}
    assert {s.lfs.sha256 for s in info.siblings if s.lfs} <= markers

    hub.log.clear()  # warm cache: no weights fetched, no headers read
    again = apply_delta("alice/base", "alice/delta", tmp_path / "again", hub={"endpoint": hub.url})
    assert again.model_digest == result.model_digest
    assert hub.requests_to("/lfs-objects/") == []


def test_corrupt_lfs_object_is_caught_by_the_hub_sha256(hub, api, models, tmp_path):
    publish(api, models)
    hub.corrupt_lfs("alice/delta", "model.safetensors")
    out = tmp_path / "out"
    proc = run_in_process("apply", "alice/base", "alice/delta", out, "-q")
    assert proc.returncode == 1, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "alice/delta@" in message and "model.safetensors" in message and "sha256" in message
    assert not out.exists()


def test_damaged_cache_blob_is_hashed_again_and_refused(hub, api, models, tmp_path):
    publish(api, models)
    apply_delta("alice/base", "alice/delta", tmp_path / "one", hub={"api": api})
    blob = (open_repo("alice/base", api).folder / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(data)  # same name (the sha256), other content: the marker no longer fits
    with pytest.raises(VerificationError, match=r"alice/base@\w+/model.safetensors: sha256"):
        apply_delta("alice/base", "alice/delta", tmp_path / "two", hub={"api": api})
    assert not blob.exists()  # removed, so the next run downloads it again
    again = apply_delta("alice/base", "alice/delta", tmp_path / "three", hub={"api": api})
    assert again.model_digest == models.local.model_digest


def test_a_verified_blob_is_not_hashed_again_and_a_change_behind_its_back_is_still_caught(
    hub, api, models, tmp_path, monkeypatch
):
    """The Hub's sha256 is checked once, at download; a warm apply hashes no blob as a file. A
    byte changed in a cached blob with its size, inode and mtime kept fools that memory, and is
    then caught by what every apply checks: the base's tensors against the delta's manifest."""
    import deltamerge.sources.hub as hub_module
    from deltamerge.formats.safetensors import read_header

    publish(api, models)
    apply_delta("alice/base", "alice/delta", tmp_path / "one", hub={"api": api})
    hashed = []
    for name in ("file_digest", "git_blob_sha1"):
        real = getattr(hub_module, name)
        monkeypatch.setattr(hub_module, name, lambda *a, real=real, **k: hashed.append(a) or real(*a, **k))
    again = apply_delta("alice/base", "alice/delta", tmp_path / "two", hub={"api": api})
    assert again.verified and hashed == []

    blob = (open_repo("alice/base", api).folder / "model.safetensors").resolve()
    st = blob.stat()
    stored = read_header(blob).tensors["model.norm.weight"]
    with open(blob, "r+b") as f:  # in place: the same inode
        f.seek(stored.offset)
        byte = f.read(1)[0]
        f.seek(stored.offset)
        f.write(bytes([byte ^ 1]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(VerificationError, match="'model.norm.weight' does not match the publisher's base"):
        apply_delta("alice/base", "alice/delta", tmp_path / "three", hub={"api": api})
    assert hashed == []


def test_offline_with_a_warm_cache(hub, api, models, tmp_path, monkeypatch):
    _, delta_sha = publish(api, models)
    apply_delta("alice/base", "alice/delta", tmp_path / "warm", hub={"api": api})
    seen = len(hub.log)
    out = tmp_path / "out"
    proc = run_cli("apply", "alice/base", "alice/delta", out, "-q", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(hub.log) == seen  # not a single request
    record = json.loads((out / "deltamerge-result.json").read_text())
    assert record["deltas"][0]["commit"] == delta_sha
    assert_states_equal(load_state(out), load_state(models.out))

    unreachable = HfApi(endpoint="http://127.0.0.1:9", token=False)  # nothing listens there
    cached = download_input("alice/delta", api=unreachable)
    assert cached.commit == delta_sha
    with pytest.raises(WorkError, match="cannot be reached"):
        download_input("alice/never-fetched", api=unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotCachedError, match="not in the cache"):
        download_input("alice/never-fetched", api=api)


def test_mistyped_local_path_is_no_such_folder_without_a_request(hub, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for typo in ("./no/such/dir", "no/such/dir", "~/no-such-dir"):
        with pytest.raises(NotFoundError, match="no such folder"):
            apply_delta(typo, "alice/delta", tmp_path / "out", hub={"endpoint": hub.url})
    with pytest.raises(NotFoundError, match="no such folder"):
        apply_delta(models.base, "./no/such/dir", tmp_path / "out", hub={"endpoint": hub.url})
    assert hub.log == []


def test_incompatible_pair_fails_before_any_weight_download(hub, api, models, tmp_path):
    state = llama_state(3)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(FFN + 8, HIDDEN, dtype=torch.float16)
    other = save_checkpoint(state, tmp_path / "other-base")
    push_to_hub(other, "alice/other-base", api=api)
    push_to_hub(models.delta, "alice/delta", api=api)
    hub.log.clear()

    for base in ("alice/other-base", other):
        with pytest.raises(MismatchError, match="up_proj"):
            apply_delta(base, "alice/delta", tmp_path / "out", hub={"api": api})
    header_reads = hub.requests_to("/lfs-objects/", "GET")
    assert header_reads and weight_downloads(hub) == []
    assert all(s in (206, 302) for m, p, s in hub.log if m == "GET" and p.endswith(".safetensors"))
    assert not (tmp_path / "out").exists()


def test_model_cards_of_a_rebuilt_model_and_of_a_delta(hub, api, models, tmp_path):
    publish(api, models)
    base_sha = hub.seed("alice/base", {"README.md": LICENSED_CARD})  # the base's license
    delta_sha = hub.head("alice/delta")
    out = tmp_path / "out"
    result = apply_delta("alice/base", "alice/delta", out, hub={"api": api})
    pushed = push_to_hub(out, "alice/rebuilt", api=api)
    assert pushed.url == f"{hub.url}/alice/rebuilt" and pushed.commit == hub.head("alice/rebuilt")
    assert not (out / "README.md").exists()  # the card is in the commit, not in the folder

    card = ModelCard(hub.files("alice/rebuilt")["README.md"].decode())
    data = card.data.to_dict()
    assert data["base_model"] == "alice/base"
    assert data["base_model_relation"] == "finetune"
    assert (data["license"], data["license_name"]) == ("other", "llama2")
    assert data["license_link"] == "https://ai.meta.com/llama/license/"
    assert data["tags"] == ["deltamerge"] and data["library_name"] == "transformers"
    for fact in (base_sha, delta_sha, "alice/delta", result.model_digest, "0.1.0"):
        assert fact in card.text
    assert api.model_info("alice/rebuilt").card_data.base_model == "alice/base"

    delta_card = ModelCard(hub.files("alice/delta")["README.md"].decode())
    assert "deltamerge" in delta_card.data.tags
    assert "deltamerge apply BASE alice/delta" in delta_card.text and "**add** delta" in delta_card.text
    assert models.local.model_digest in delta_card.text


def test_push_cli_with_revision_and_pull_request(hub, api, models, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    runner = CliRunner()
    first = runner.invoke(main, ["push", str(models.base), "alice/model", "--private"])
    assert first.exit_code == 0, first.output
    on_main = hub.head("alice/model")
    assert hub.repos[("model", "alice/model")].private

    branch = runner.invoke(main, ["push", str(models.target), "alice/model", "--revision", "v2",
                                  "--message", "the fine-tune"])
    assert branch.exit_code == 0, branch.output
    assert f"{hub.url}/alice/model/tree/v2" in branch.output
    v2 = hub.repos[("model", "alice/model")].commits[hub.head("alice/model", "v2")]
    assert v2.title == "the fine-tune" and hub.head("alice/model") == on_main

    pr = runner.invoke(main, ["push", str(models.out), "alice/model", "--create-pr"])
    assert pr.exit_code == 0, pr.output
    assert f"{hub.url}/alice/model/discussions/1" in pr.output
    assert hub.head("alice/model") == on_main
    assert "deltamerge-result.json" in hub.files("alice/model", "refs/pr/1")
    assert DEFAULT_TOKEN not in first.output + branch.output + pr.output

    monkeypatch.delenv("HF_TOKEN")
    refused = runner.invoke(main, ["push", str(models.base), "alice/model"])
    assert refused.exit_code == 2 and "HF_TOKEN" in refused.output


def test_apply_push_to_hub_from_the_cli(hub, models, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("apply", models.base, models.delta, out, "--push-to-hub", "alice/rebuilt",
                   env={"HF_TOKEN": DEFAULT_TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert f"pushed to {hub.url}/alice/rebuilt" in proc.stdout
    files = hub.files("alice/rebuilt")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert ModelCard(files["README.md"].decode()).data.base_model is None  # a local base
    assert DEFAULT_TOKEN not in proc.stdout + proc.stderr


def test_hub_errors_are_typed_one_line_and_never_show_the_token(hub, api, models, tmp_path):
    push_to_hub(models.delta, "alice/delta", api=api)
    with pytest.raises(NotFoundError, match="alice/missing: no such repository"):
        download_input("alice/missing", api=api)
    with pytest.raises(NotFoundError, match="alice/delta@nope: no such revision"):
        download_input("alice/delta@nope", api=api)
    with pytest.raises(HubAuthError, match="HF_TOKEN") as err:
        download_input("alice/delta", api=HfApi(endpoint=hub.url, token="hf_wrong_secret"))
    assert "hf_wrong_secret" not in str(err.value)
    with pytest.raises(HubAuthError, match="HF_TOKEN"):
        push_to_hub(models.delta, "alice/other", api=HfApi(endpoint=hub.url, token=False))
    pinned = download_input(f"alice/delta@{hub.head('alice/delta')}", endpoint=hub.url)
    assert pinned.commit == hub.head("alice/delta") and (pinned.path / "deltamerge.json").is_file()


def test_disk_space_is_counted_from_the_file_list_minus_the_cache(hub, api, models):
    push_to_hub(models.delta, "alice/delta", api=api)
    repo = open_repo("alice/delta", api)
    repo.fetch(repo.small_files())
    weights = repo.weight_files()
    assert repo.missing_bytes(weights) == (models.delta / "model.safetensors").stat().st_size
    with pytest.raises(DiskSpaceError, match=r"1,000,000,000,000,000 bytes .* needed, [\d,]+ bytes"):
        check_cache_space(10**15, repo.label)
    repo.fetch(weights)
    assert repo.missing_bytes(weights) == 0
    assert shutil.disk_usage(repo.folder).free > 0


def resolved_files(hub: HubServer, repo_id: str) -> set[str]:
    """The files of ``repo_id`` the client fetched (HEAD or GET of their resolve URL)."""
    prefix = f"/{repo_id}/resolve/"
    return {p.split("/", 5)[-1] for _, p, _ in hub.requests_to(prefix)}


def test_only_the_files_the_job_needs_are_fetched(hub, api, models, tmp_path):
    sharded = save_checkpoint(llama_state(0), tmp_path / "sharded", shard_bytes=60_000)
    files = {p.name: p.read_bytes() for p in sharded.iterdir()}
    shards = {n for n in files if n.endswith(".safetensors")}
    files |= {"pytorch_model.bin": b"PK\x03\x04 the same weights as .bin", "optimizer.pt": b"\0" * 64,
              "training_args.bin": b"\0" * 32, "notes/extra.json": b"{}"}
    hub.seed("alice/both", files)
    got = download_input("alice/both", api=api)
    assert resolved_files(hub, "alice/both") == shards | {
        "model.safetensors.index.json", "config.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    from deltamerge.integrity.checks import checksum, diff

    assert checksum("alice/both", hub={"api": api}) == checksum(sharded)  # integrity commands too
    assert diff(got.path, models.base).identical

    hub.seed("alice/lora", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * 16,
                            "adapter_model.bin": b"\0" * 16, "README.md": b"# lora\n"})
    lora = open_repo("alice/lora", api)
    assert lora.small_files() == ["adapter_config.json"]
    assert lora.weight_files() == ["adapter_model.safetensors"]
    hub.seed("alice/meta", {"params.json": b"{}", "consolidated.00.pth": b"\0" * 8,
                            "consolidated.01.pth": b"\0" * 8, "tokenizer.model": b"\0tok",
                            "checklist.chk": b"md5s", "LICENSE": b"terms"})
    meta = open_repo("alice/meta", api)
    assert set(meta.small_files()) == {"params.json", "checklist.chk", "tokenizer.model"}
    assert meta.weight_files() == ["consolidated.00.pth", "consolidated.01.pth"]


def test_xor_files_delta_from_the_hub_pairs_base_files_by_name(hub, api, tmp_path):
    from releases import _oa_release, oa_encode

    base, tuned, delta = _oa_release(tmp_path)
    oa_encode(tuned, base, delta)
    (delta / "README.md").write_text("# oasst xor weights\n")
    local = apply_delta(base, delta, tmp_path / "local")
    push_to_hub(base, "alice/llama-hf", api=api)
    safetensors_copy = tmp_path / "st"
    save_checkpoint(llama_state(0), safetensors_copy)
    api.upload_file(path_or_fileobj=safetensors_copy / "model.safetensors",
                    path_in_repo="model.safetensors", repo_id="alice/llama-hf")
    push_to_hub(delta, "alice/oa-xor", api=api)
    hub.log.clear()

    result = apply_delta("alice/llama-hf", "alice/oa-xor", tmp_path / "out", hub={"api": api})
    assert result.kinds == ["xor-files"] and result.model_digest == local.model_digest
    assert "model.safetensors" not in resolved_files(hub, "alice/llama-hf")  # the .bin shards only
    assert resolved_files(hub, "alice/oa-xor") == {p.name for p in delta.iterdir()} - {"README.md"}


def test_enc_release_from_the_hub_is_fetched_whole(hub, api, tmp_path):
    """OpenBuddy's .enc files are fetched whole and decoded with the local Meta file's key."""
    from releases import fake_meta_7b, openbuddy_release

    from deltamerge.integrity.checks import checksum

    meta, key_md5 = fake_meta_7b(tmp_path)
    model, release = openbuddy_release(tmp_path, meta / "consolidated.00.pth")
    push_to_hub(release, "openbuddy/openbuddy-7b-enc", api=api)
    result = apply_delta(meta / "consolidated.00.pth", "openbuddy/openbuddy-7b-enc",
                         tmp_path / "out", key_md5=key_md5, hub={"api": api})
    assert result.kinds == ["enc"]
    assert result.model_digest == checksum(model).model_digest
    assert resolved_files(hub, "openbuddy/openbuddy-7b-enc") == {p.name for p in release.iterdir()}


def test_make_delta_and_the_integrity_commands_take_repo_ids(hub, api, models, tmp_path):
    push_to_hub(models.base, "alice/base", api=api)
    push_to_hub(models.target, "alice/target", api=api)
    push_to_hub(models.delta, "alice/delta", api=api)
    made = make_delta("alice/base", "alice/target", tmp_path / "delta", hub={"api": api})
    local = json.loads((models.delta / "deltamerge.json").read_text())
    assert made.result_digest == local["result"]["model_digest"]

    from deltamerge.integrity.checks import verify

    hub.log.clear()
    report = verify(models.out, "alice/delta", hub={"api": api})  # the manifest from the Hub
    assert report.ok and report.model_digest == models.local.model_digest
    assert resolved_files(hub, "alice/delta") == {"deltamerge.json", "config.json",
                                                  "tokenizer_config.json", "special_tokens_map.json"}
    result = CliRunner().invoke(main, ["checksum", "alice/base", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.split()[0] == local["base"]["model_digest"]
