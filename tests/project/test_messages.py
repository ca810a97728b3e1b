"""Messages and exit statuses that say what happened, as docs/errors.md documents them."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import llama_state, save_checkpoint
from hub_fixtures import hub  # noqa: F401
from hubserver import HubServer

from deltamerge.errors import InputError, WorkError


def cli(*args: object) -> tuple[int, str]:
    """A command through click in this process (the CLI's error handling, no start-up cost):
    its exit status and its one line of stderr."""
    from click.testing import CliRunner

    from deltamerge.cli import main

    result = CliRunner().invoke(main, [*map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) <= 1, result.stderr
    return result.exit_code, lines[0] if lines else ""


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    return (save_checkpoint(llama_state(0), tmp_path / "base"),
            save_checkpoint(llama_state(1), tmp_path / "target"))


def _seed(server: HubServer, repo_id: str, folder: Path) -> None:
    server.seed(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()})


# -- a Hub that fails is reported as failing ----------------------------------------------------
def test_hub_server_error_on_a_weight_download_is_a_work_error(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
):
    """huggingface_hub calls any failed request for an uncached file "not in the local cache":
    a Hub answering 500 is a Hub failure (exit 1, retry later), named with its status and file."""
    import huggingface_hub.utils._http as http

    from deltamerge.sources.hub import NotCachedError, download_input

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)  # its retries, without the waits
    _seed(hub, "owner/model", save_checkpoint(llama_state(0), tmp_path / "model"))
    hub.fail_requests("/model.safetensors", 500)
    with pytest.raises(WorkError) as caught:
        download_input("owner/model")
    assert not isinstance(caught.value, (InputError, NotCachedError))
    assert caught.value.exit_code == 1
    message = str(caught.value)
    assert "answered HTTP 500" in message and "model.safetensors" in message
    assert "not in the cache" not in message


# -- mistyped local paths ---------------------------------------------------------------------
def test_verify_with_a_mistyped_manifest_path_says_no_such_file(models, tmp_path: Path):
    """``nodir/deltamerge.json`` reads like a repo id, but a manifest's file name is a file to
    read: no Hub (or cache) is asked, and the message says the file is missing."""
    base, _ = models
    code, line = cli("verify", base, "-m", "nodir/deltamerge.json", "-q")
    assert code == 2
    assert line == "deltamerge: error: nodir/deltamerge.json: no such file (manifest)"


@pytest.mark.parametrize("command", ["make-delta", "make-delta-target", "convert", "apply"])
def test_a_weight_file_given_for_a_folder_is_one_input_error(models, tmp_path: Path, command):
    base, target = models
    weights = base / "model.safetensors"
    out = tmp_path / "out"
    args = {
        "make-delta": ["make-delta", weights, target, out],
        "make-delta-target": ["make-delta", base, target / "model.safetensors", out],
        "convert": ["convert", weights, out],
        "apply": ["apply", weights, target, out],
    }[command]
    code, line = cli(*args, "-q")
    given = args[1] if command != "make-delta-target" else args[2]
    role = {"convert": "META_DIR", "make-delta-target": "TARGET"}.get(command, "BASE")
    assert code == 2
    assert line == (f"deltamerge: error: {given}: a file, not a folder: {role} is the folder "
                    f"that holds the model's files (give {Path(given).parent})")
    assert not out.exists()


# -- Ctrl-C --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["checksum", "verify", "inspect", "diff"])
def test_an_interrupted_command_without_out_does_not_mention_one(
    models, monkeypatch: pytest.MonkeyPatch, command
):
    """checksum, verify, inspect and diff write no OUT: Ctrl-C during them says so in their
    own terms (exit 130), not "nothing was written to OUT"."""
    import deltamerge.integrity.checks as checks

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checks, command, stopped)
    base, target = models
    args = {"checksum": [base], "verify": [base, "-m", base / "config.json"],
            "inspect": [base], "diff": [base, target]}[command]
    code, line = cli(command, *args, "-q")
    assert code == 130
    assert line.startswith("deltamerge: error: interrupted")
    assert "OUT" not in line


def test_an_interrupted_apply_before_any_work_says_out_is_untouched(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import deltamerge.apply as apply

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply, "apply_delta", stopped)
    base, target = models
    code, line = cli("apply", base, target, tmp_path / "out", "-q")
    assert (code, line) == (130, "deltamerge: error: interrupted; nothing was written to OUT")


# -- the summary prints names as the errors do ----------------------------------------------------
def test_the_summary_escapes_control_characters_in_paths(models, tmp_path: Path):
    """A newline in OUT's name does not split a summary line, and an escape sequence in it does
    not reach the terminal: printed as errors print them (``\\n``, ``\\x1b``)."""
    from click.testing import CliRunner

    from deltamerge.cli import main

    base, target = models
    delta = tmp_path / "delta"
    result = CliRunner().invoke(main, ["make-delta", str(base), str(target), str(delta), "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "vicuna\n\x1b]0;pwned\x07"
    result = CliRunner().invoke(main, ["apply", str(base), str(delta), str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_dir()
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    first = result.stdout.splitlines()[0]
    assert first.startswith("rebuilt ") and "vicuna\\n\\x1b]0;pwned\\x07 from " in first


# -- --resume -------------------------------------------------------------------------------------
def test_resume_with_the_journal_deleted_says_the_journal_is_missing(models, tmp_path: Path):
    base, target = models
    delta = tmp_path / "delta"
    assert cli("make-delta", base, target, delta, "-q") == (0, "")
    partial = tmp_path / ".out.deltamerge-partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"left by a run whose journal was deleted")
    code, line = cli("apply", base, delta, tmp_path / "out", "--resume", "-q")
    assert code == 2
    assert f"{partial}: its journal journal.jsonl is missing" in line
    assert "other inputs or options" not in line
    assert not (tmp_path / "out").exists()


# -- free space -----------------------------------------------------------------------------------
def test_the_free_space_check_counts_the_non_weight_files(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A disk with room for the weights but not for the tokenizer beside them is refused
    before any work, not filled part way."""
    import shutil
    from collections import namedtuple

    import deltamerge.sinks.folder as folder
    from deltamerge import apply_delta
    from deltamerge.errors import DiskSpaceError

    base, target = models
    (target / "tokenizer.json").write_bytes(b"{}" + b" " * 1_000_000)
    delta = tmp_path / "delta"
    assert cli("make-delta", base, target, delta, "-q") == (0, "")
    weights = sum(t.numel() * t.element_size() for t in llama_state(0).values())
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(folder.shutil, "disk_usage", lambda path: usage(
        real(path).total, 0, weights + 100_000))
    out = tmp_path / "out"
    with pytest.raises(DiskSpaceError, match="not enough free space"):
        apply_delta(base, delta, out)
    assert not out.exists() and not (tmp_path / ".out.deltamerge-partial").exists()


# -- the same delta twice -------------------------------------------------------------------------
def test_the_same_delta_twice_in_a_chain_is_refused_unless_allowed(models, tmp_path: Path):
    from helpers import assert_states_equal, load_state

    from deltamerge import apply_delta

    base, target = models
    delta = tmp_path / "delta"
    assert cli("make-delta", base, target, delta, "-q", "--kind", "xor") == (0, "")
    out = tmp_path / "out"
    code, line = cli("apply", base, delta, f"{tmp_path}/./delta/", out, "-q")
    assert code == 2
    assert f"./delta/: the same delta as {delta}, given twice" in line
    assert not out.exists() and not (tmp_path / ".out.deltamerge-partial").exists()
    with pytest.raises(InputError, match="given twice"):
        apply_delta(base, [delta, delta], out)
    # XORed twice is the base again: what --allow-repeat was asked for, done
    assert cli("apply", base, delta, delta, out, "-q", "--allow-repeat", "--no-verify") == (0, "")
    assert_states_equal(load_state(out), load_state(base))


# -- --push-to-hub --------------------------------------------------------------------------------
def test_push_to_hub_creates_no_repo_for_a_merge_that_fails(
    hub: HubServer, models, tmp_path: Path  # noqa: F811
):
    """The token is checked before the merge, but the repo is created by the push: a merge that
    fails leaves no empty repo on the Hub; one that succeeds is pushed to a repo made then."""
    from hub_fixtures import DEFAULT_TOKEN

    base, target = models
    delta = tmp_path / "delta"
    assert cli("make-delta", base, target, delta, "-q") == (0, "")
    mismatched = save_checkpoint(llama_state(2, vocab=97), tmp_path / "other-base")
    code, line = cli("apply", mismatched, delta, tmp_path / "bad", "-q", "--no-verify",
                     "--push-to-hub", "alice/merged", "--token", DEFAULT_TOKEN)
    assert code == 2 and "in the base" in line
    assert ("model", "alice/merged") not in hub.repos
    assert hub.requests_to("/api/repos/create") == []
    code, line = cli("apply", base, delta, tmp_path / "out", "-q", "--push-to-hub",
                     "alice/merged", "--token", DEFAULT_TOKEN)
    assert (code, line) == (0, "")
    assert hub.files("alice/merged")["model.safetensors"] == (
        tmp_path / "out" / "model.safetensors").read_bytes()


def test_push_to_hub_refuses_a_bad_token_before_any_work(
    hub: HubServer, models, tmp_path: Path  # noqa: F811
):
    base, target = models
    code, line = cli("make-delta", base, target, tmp_path / "delta", "-q", "--push-to-hub",
                     "alice/delta", "--token", "hf_not_a_valid_token")
    assert code == 2 and "HF_TOKEN" in line and "hf_not_a_valid_token" not in line
    assert not (tmp_path / "delta").exists()
    assert ("model", "alice/delta") not in hub.repos


# -- OUT at publish time ---------------------------------------------------------------------------
def test_an_out_filled_during_the_run_is_not_replaced_without_force(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """OUT was absent when the run started and another program filled it meanwhile: the run
    refuses to replace it (one line, exit 2), keeps it as it is, and keeps its finished partial
    folder, which --resume publishes once OUT is moved away."""
    from helpers import assert_states_equal, load_state

    from deltamerge import apply_delta, faults
    from deltamerge.errors import OutputExistsError

    base, target = models
    delta = tmp_path / "delta"
    assert cli("make-delta", base, target, delta, "-q", "--kind", "xor") == (0, "")
    out, partial = tmp_path / "out", tmp_path / ".out.deltamerge-partial"

    def someone_else(point: str) -> None:
        if point == "publish":
            out.mkdir()
            (out / "theirs.txt").write_text("not deltamerge's")

    monkeypatch.setattr(faults, "reached", someone_else)
    with pytest.raises(OutputExistsError) as refused:
        apply_delta(base, delta, out)
    assert refused.value.exit_code == 2
    assert "appeared during the run" in str(refused.value) and "--resume" in str(refused.value)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert (partial / "model.safetensors").is_file()
    monkeypatch.undo()
    out.rename(tmp_path / "theirs")
    apply_delta(base, delta, out, resume=True)
    assert_states_equal(load_state(out), load_state(target))
    assert not partial.exists()

    monkeypatch.setattr(faults, "reached", lambda point: (
        (tmp_path / "forced").mkdir() if point == "publish" else None))
    apply_delta(base, delta, tmp_path / "forced", force=True)
    assert_states_equal(load_state(tmp_path / "forced"), load_state(target))


# -- make-delta names the tensors whose delta overflowed -------------------------------------------
def test_make_delta_names_the_tensors_whose_fp16_delta_overflowed(tmp_path: Path):
    from click.testing import CliRunner

    from deltamerge import make_delta
    from deltamerge.cli import main

    base_state, target_state = llama_state(0), llama_state(1)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        base_state[name][0] = -60000.0
        target_state[name][0] = 60000.0  # 120000 apart: beyond float16's 65504
    base = save_checkpoint(base_state, tmp_path / "base")
    target = save_checkpoint(target_state, tmp_path / "target")
    result = make_delta(base, target, tmp_path / "delta")
    assert result.overflowed == ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    assert any("'model.layers.1.mlp.up_proj.weight', 'model.norm.weight'" in n and "Inf" in n
               for n in result.notes), result.notes
    printed = CliRunner().invoke(main, ["make-delta", str(base), str(target), str(tmp_path / "d2")])
    assert printed.exit_code == 0, printed.output
    assert "'model.norm.weight'" in printed.stdout and "Inf" in printed.stdout


def test_a_resumed_make_delta_still_names_the_overflows_of_the_shards_it_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from deltamerge import faults, make_delta
    from deltamerge.errors import InterruptedRun

    base_state, target_state = llama_state(0), llama_state(1)
    base_state["model.embed_tokens.weight"][0] = -60000.0  # the first tensor: the first shard
    target_state["model.embed_tokens.weight"][0] = 60000.0
    base = save_checkpoint(base_state, tmp_path / "base")
    target = save_checkpoint(target_state, tmp_path / "target")
    shards = []

    def stop_after_two(point: str) -> None:
        if point == "shard":
            shards.append(point)
            if len(shards) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(faults, "reached", stop_after_two)
    with pytest.raises(InterruptedRun):
        make_delta(base, target, tmp_path / "delta", max_shard_size="40KB")
    monkeypatch.undo()
    result = make_delta(base, target, tmp_path / "delta", max_shard_size="40KB", resume=True)
    assert any(n.startswith("resumed: 2 ") for n in result.notes), result.notes
    assert result.overflowed == ["model.embed_tokens.weight"]


# -- a stop just after publishing ------------------------------------------------------------------
def test_a_rerun_after_a_stop_just_after_publishing_finds_out_finished(
    models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C after OUT was published: OUT is complete, and the same command run again says so
    (exit 0, OUT untouched); another command, or other options, is still refused."""
    from deltamerge import faults

    base, target = models
    delta = tmp_path / "delta"
    assert cli("make-delta", base, target, delta, "-q", "--kind", "xor") == (0, "")
    out = tmp_path / "out"

    def stop_after_publishing(point: str) -> None:
        if point == "published":
            raise KeyboardInterrupt

    monkeypatch.setattr(faults, "reached", stop_after_publishing)
    code, line = cli("apply", base, delta, out, "-q")
    monkeypatch.undo()
    assert code == 130
    assert f"{out} was published, complete" in line
    assert (out / "journal.jsonl").is_file()  # the stop came before its removal
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "journal.jsonl"}

    from click.testing import CliRunner

    from deltamerge.cli import main

    again = CliRunner().invoke(main, ["apply", str(base), str(delta), str(out)])
    assert again.exit_code == 0, again.output
    assert "already finished by this same command" in again.stdout
    assert "matches the publisher's result" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    code, line = cli("apply", base, delta, out, "-q", "--dtype", "float32")
    assert code == 2 and "exists and is not empty" in line
    other = save_checkpoint(llama_state(3), tmp_path / "other")
    code, line = cli("make-delta", base, other, out, "-q")
    assert code == 2 and "exists and is not empty" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
