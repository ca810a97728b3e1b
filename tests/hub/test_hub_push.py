"""The Hub's conventions, against the test Hub: pushes that survive a dropped connection, a
push checked before the merge it ends, model cards the Hub links by, downloads verified
whatever the transport (Xet included), the huggingface-cli options, and quiet meaning quiet.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import ETA, Terminal, llama_state, run_cli, run_in_process, save_checkpoint
from hubserver import DEFAULT_TOKEN, HubServer
from huggingface_hub import ModelCard, constants
from huggingface_hub import file_download as hf_download

from deltamerge import apply_delta, make_delta, push_to_hub
from deltamerge.cli import main
from deltamerge.errors import PushError, VerificationError
from deltamerge.integrity.checks import checksum
from deltamerge.sources.hub import download_input

pytest_plugins = ["hub_fixtures"]


pytestmark = pytest.mark.usefixtures("all_routes_known")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("push")
    base = save_checkpoint(llama_state(0), root / "base")
    target = save_checkpoint(llama_state(1), root / "target", shard_bytes=60_000)
    delta = root / "delta"
    make_delta(base, target, delta, max_shard_size=60_000)
    return SimpleNamespace(root=root, base=base, target=target, delta=delta)


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_repo_holds(hub: HubServer, repo_id: str, folder: Path) -> None:
    """The repo's files are the folder's, byte for byte (sha256), plus its card and attributes."""
    remote = sha256s(hub.files(repo_id))
    local = sha256s(folder_files(folder))
    assert {n: remote[n] for n in local} == local
    assert set(remote) - set(local) <= {"README.md", ".gitattributes"}


def one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def invoke(*args: object):
    """The CLI in this process (the hub fixture points huggingface_hub at the test Hub here too)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def uploads(hub: HubServer) -> int:
    return len(hub.requests_to("/lfs-upload/", "PUT"))


# -- pushes that survive a dropped connection ------------------------------------------------
def test_a_push_cut_at_its_commit_is_finished_by_running_it_again(hub, models, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    hub.drop_connections("/commit/", "POST")
    first = run_in_process("push", models.target, "alice/model", "-q")
    assert first.returncode == 1, first.stderr
    line = one_line(first)
    assert f"run `deltamerge push {models.target} alice/model` again" in line
    assert "nothing was committed" in line and DEFAULT_TOKEN not in line
    assert set(hub.files("alice/model")) == {".gitattributes"}
    sent = uploads(hub)
    assert sent == len(list(models.target.glob("*.safetensors")))  # every object went up

    monkeypatch.delenv("HF_TOKEN")
    second = invoke("push", models.target, "alice/model", "--token", DEFAULT_TOKEN, "-q")
    assert second.exit_code == 0, second.output
    assert uploads(hub) == sent  # none sent again: the storage kept them
    assert_repo_holds(hub, "alice/model", models.target)


def test_a_push_whose_uploads_were_cut_sends_only_what_is_missing(hub, api, models, monkeypatch):
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    drop = hub.drop_connections("/lfs-upload/", "PUT", after=2, times=None)  # the network goes
    with pytest.raises(PushError, match=r"run `deltamerge push .* alice/model` again") as err:
        push_to_hub(models.target, "alice/model", api=api)
    assert err.value.exit_code == 1
    assert set(hub.files("alice/model")) == {".gitattributes"}
    stored = len(hub.repos[("model", "alice/model")].lfs)
    assert stored == 2 and hub.dropped

    drop.stop()  # the network is back
    hub.log.clear()
    pushed = push_to_hub(models.target, "alice/model", api=api)
    shards = len(list(models.target.glob("*.safetensors")))
    assert uploads(hub) == shards - stored
    assert pushed.commit == hub.head("alice/model")
    assert_repo_holds(hub, "alice/model", models.target)


def test_push_to_hub_is_checked_before_the_merge_and_a_failed_push_keeps_the_result(
    hub, models, tmp_path
):
    out = tmp_path / "out"
    base, delta = models.base, models.delta
    no_token = invoke("apply", base, delta, out, "--push-to-hub", "alice/rebuilt")
    assert no_token.exit_code == 2 and "HF_TOKEN" in no_token.stderr
    bad_id = invoke("apply", base, delta, out, "--push-to-hub", "alice/two words", "--token",
                    DEFAULT_TOKEN)
    assert bad_id.exit_code == 2 and "alice/two words" in bad_id.stderr
    assert list(tmp_path.iterdir()) == []  # refused before any work: no OUT, no partial folder
    assert ("model", "alice/rebuilt") not in hub.repos

    hub.drop_connections("/commit/", "POST")
    cut = run_cli("apply", base, delta, out, "--push-to-hub", "alice/rebuilt", "-q",
                  env={"HF_TOKEN": DEFAULT_TOKEN})
    assert cut.returncode == 1, cut.stderr
    line = one_line(cut)
    assert f"{out} is finished and kept" in line and f"run `deltamerge push {out} alice/rebuilt`" in line
    assert (out / "model.safetensors").is_file() and (out / "deltamerge-result.json").is_file()
    assert set(hub.files("alice/rebuilt")) == {".gitattributes"}  # created before the merge

    again = invoke("push", out, "alice/rebuilt", "-q", "--token", DEFAULT_TOKEN)
    assert again.exit_code == 0, again.output
    assert_repo_holds(hub, "alice/rebuilt", out)


# -- cards the Hub links models by ------------------------------------------------------------
def test_a_delta_card_names_its_base_and_its_relation(hub, api, models, tmp_path):
    base_sha = push_to_hub(models.base, "alice/base", api=api).commit
    delta = tmp_path / "hub-delta"
    make_delta("alice/base", models.target, delta, hub={"api": api})
    manifest = json.loads((delta / "deltamerge.json").read_text())
    assert manifest["base_source"] == {"repo_id": "alice/base", "revision": base_sha}

    push_to_hub(delta, "alice/delta", api=api)
    card = ModelCard(hub.files("alice/delta")["README.md"].decode())
    assert card.data.base_model == "alice/base"
    assert card.data.base_model_relation == "adapter"
    assert f"deltamerge apply alice/base@{base_sha} alice/delta" in card.text
    assert api.model_info("alice/delta").card_data.base_model == "alice/base"

    local = json.loads((models.delta / "deltamerge.json").read_text())
    assert local["base_source"] == {"folder": "base"}  # a name, never a path
    push_to_hub(models.delta, "alice/local-delta", api=api)
    card = ModelCard(hub.files("alice/local-delta")["README.md"].decode())
    assert card.data.base_model is None and "a local folder (`base`)" in card.text
    assert "base_model_relation" not in card.data.to_dict()  # no relation to an unnamed base

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "alice/base", "r": 2}))
    (lora / "adapter_model.safetensors").write_bytes((models.base / "model.safetensors").read_bytes())
    push_to_hub(lora, "alice/lora", api=api)
    card = ModelCard(hub.files("alice/lora")["README.md"].decode())
    data = card.data.to_dict()
    assert (data["base_model"], data["base_model_relation"], data["library_name"]) == (
        "alice/base", "adapter", "peft")


# -- downloads verified whatever the transport -----------------------------------------------
def test_xet_downloads_are_checked_on_disk_against_the_hub_sha256(hub, api, models, monkeypatch):
    """With Xet on, huggingface_hub does not fetch a file through the HTTP redirect: it takes it
    from its shared blob store (checked by size only) or through hf_xet. The test Hub serves no
    Xet CAS, so the bytes are put where hf_xet would put them; the real client decides the path."""
    files = folder_files(models.base)
    hub.seed("alice/base", files)
    hub.xet = True
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
    weights = files["model.safetensors"]
    oid = hashlib.sha256(weights).hexdigest()
    damaged = bytearray(weights)
    damaged[len(damaged) // 2] ^= 1

    store = Path(constants.HF_HUB_CACHE) / "blobs"
    entry = store / hub.xet_hash(oid)[:2] / hub.xet_hash(oid)
    entry.parent.mkdir(parents=True)
    (store / ".huggingface-shared-blobs").write_text("1\n")
    entry.write_bytes(bytes(damaged))  # a shared blob of the right size, wrong bytes
    with pytest.raises(VerificationError, match=r"model\.safetensors: sha256 .* the Hub's"):
        download_input("alice/base", api=api)
    storage = Path(constants.HF_HUB_CACHE) / "models--alice--base"
    assert not entry.exists() and not (storage / "blobs" / oid).is_symlink()  # no dangling link

    transfers = []

    def xet_transfer(*, incomplete_path, xet_file_data, expected_size, **_):
        """hf_xet's download, stood in: the bytes it reconstructs land in incomplete_path."""
        transfers.append(xet_file_data.file_hash)
        Path(incomplete_path).write_bytes(bytes(damaged) if len(transfers) == 1 else weights)

    monkeypatch.setattr(hf_download, "xet_get", xet_transfer)
    with pytest.raises(VerificationError, match=r"model\.safetensors: sha256"):
        download_input("alice/base", api=api)
    got = download_input("alice/base", api=api)
    assert transfers == [hub.xet_hash(oid)] * 2
    assert (got.path / "model.safetensors").read_bytes() == weights
    assert (got.path / "model.safetensors").resolve() == entry  # served from Xet's shared store
    assert [e for e in hub.requests_to("/lfs-objects/", "GET") if e[2] == 200] == []
    assert checksum(got.path) == checksum(models.base)


# -- the huggingface-cli options, -q, and progress ---------------------------------------------
def test_token_revision_and_cache_dir_as_huggingface_cli_spells_them(hub, models, tmp_path):
    first = hub.seed("alice/private", folder_files(models.base), private=True)
    hub.seed("alice/private", folder_files(models.target) | {"model.safetensors": b"\0" * 8})
    cache = tmp_path / "cache"
    proc = run_cli("checksum", "alice/private", "--revision", first, "--cache-dir", cache,
                   "--token", DEFAULT_TOKEN, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [checksum(models.base).model_digest, f"alice/private@{first}"]
    assert (cache / "models--alice--private" / "snapshots" / first / "model.safetensors").is_file()
    assert not (Path(constants.HF_HUB_CACHE) / "models--alice--private").exists()
    assert DEFAULT_TOKEN not in proc.stdout + proc.stderr

    two = invoke("apply", "alice/a", "alice/b", tmp_path / "out", "--revision", "v1")
    assert two.exit_code == 2 and "REPO@REV" in two.stderr
    denied = invoke("checksum", "alice/private", "-q")  # no token: private looks missing
    assert denied.exit_code == 2 and "no such repository" in denied.stderr


def test_quiet_silences_huggingface_hub_bars_too(hub, api, models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    loud = run_cli("push", models.delta, "alice/delta")
    assert loud.returncode == 0 and "%|" in loud.stderr  # huggingface_hub's own upload bars
    quiet = run_cli("push", models.delta, "alice/delta2", "--quiet")
    assert quiet.returncode == 0 and (quiet.stdout, quiet.stderr) == ("", "")

    push_to_hub(models.base, "alice/base", api=api)
    rebuilt = run_cli("apply", "alice/base", "alice/delta", tmp_path / "out", "-q")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (rebuilt.stdout, rebuilt.stderr) == ("", "")  # no download bars either


def test_hub_preflight_and_download_checks_show_progress(hub, api, models, tmp_path, monkeypatch):
    push_to_hub(models.base, "alice/base", api=api)
    push_to_hub(models.delta, "alice/delta", api=api)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    apply_delta("alice/base", "alice/delta", tmp_path / "out", hub={"api": api}, progress=True)
    shown = terminal.getvalue()
    assert "Hub preflight: 100%" in shown and "2/2" in shown
    assert "sha256 of alice/delta@" in shown and ETA.search(shown)
