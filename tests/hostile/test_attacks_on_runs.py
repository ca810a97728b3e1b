"""Adversarial suite (issue 12): what a hostile or unlucky user does, and what deltamerge does then.

One test per attack, named for it; its docstring reads ``attack: ... -> outcome: ...`` (the
outcome on its own line), so ``grep -A3 "attack:" tests/hostile/test_attacks_on_runs.py`` lists them.
Sections follow the issue's items; add an attack at the end of its section (or a new section),
using the shared inputs and helpers below.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    apply_in_process,
    assert_states_equal,
    llama_state,
    load_state,
    run_cli,
    save_checkpoint,
)
from meta_helpers import hf_to_meta

from deltamerge.apply import apply_delta
from deltamerge.cli import main
from deltamerge.conversion import convert
from deltamerge.errors import InputError, OutputBusyError
from deltamerge.integrity.checks import checksum
from deltamerge.make import make_delta

SHARD = "30000"  # about nine output shards for the tiny model
META_PARAMS = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4,
               "vocab_size": -1}


@dataclass(frozen=True)
class Inputs:
    root: Path
    base: Path
    target: Path
    delta: Path  # made by make-delta --max-shard-size SHARD: it has a manifest
    reference: Path  # apply base delta --max-shard-size SHARD, uninterrupted
    killed: Path  # the partial folder of that apply, killed after its third shard


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("adversarial")
    base = save_checkpoint(llama_state(0), root / "base", shard_bytes=40_000)
    target = save_checkpoint(llama_state(1), root / "target")
    delta = root / "delta"
    make_delta(base, target, delta, max_shard_size=SHARD)
    reference = root / "reference"
    assert apply_delta(base, delta, reference, max_shard_size=SHARD).verified
    proc = run_cli("apply", base, delta, root / "killed", "--max-shard-size", SHARD, "-q",
                   env={"DELTAMERGE_KILL_AT": "shard:3"})
    assert proc.returncode == -9, proc.stderr
    return Inputs(root, base, target, delta, reference, root / ".killed.deltamerge-partial")


def apply_args(inputs: Inputs, out: Path) -> tuple:
    return ("apply", inputs.base, inputs.delta, out, "--max-shard-size", SHARD, "-q")


def killed_copy(inputs: Inputs, out: Path) -> Path:
    """A copy of the killed run's partial folder, as the partial folder of ``out``."""
    partial = out.parent / f".{out.name}.deltamerge-partial"
    shutil.copytree(inputs.killed, partial, symlinks=True)
    return partial


def journaled(partial: Path) -> list[str]:
    lines = (partial / "journal.jsonl").read_text().splitlines()[1:]
    return [json.loads(line)["shard"] for line in lines]


def data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def resume(inputs: Inputs, out: Path):
    return apply_delta(inputs.base, inputs.delta, out, max_shard_size=SHARD, resume=True)


def assert_is_reference(out: Path, inputs: Inputs) -> None:
    assert_states_equal(load_state(out), load_state(inputs.reference))
    assert checksum(out).model_digest == checksum(inputs.reference).model_digest


def entries(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry's size and mtime: to prove a refused run changed nothing."""
    return {p.name: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.iterdir()}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "?"


@contextmanager
def paused(*args: object, point: str) -> Iterator[subprocess.Popen]:
    """A run stopped (SIGSTOP, by itself) at a fault point; killed on the way out if still alive."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltamerge", *map(str, args)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "DELTAMERGE_STOP_AT": point},
    )
    try:
        deadline = time.monotonic() + 120
        while _state(proc.pid) != "T":
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never reached its pause point"
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    proc.send_signal(signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# --- 1. resume trusts nothing it did not check in this run -------------------------------------


def test_resume_after_a_byte_flipped_in_a_finished_shard(tmp_path: Path, inputs: Inputs):
    """attack: flip one byte inside a journaled shard of the partial folder, then --resume
    -> outcome: the shard is re-hashed, found different, redone; the result is the publisher's.
    """
    out = tmp_path / "out"
    partial = killed_copy(inputs, out)
    victim = journaled(partial)[1]
    flip_byte(partial / victim, data_start(partial / victim) + 10)
    result = resume(inputs, out)
    assert result.verified
    assert_is_reference(out, inputs)
    note = " ".join(result.notes)
    assert "2 finished shard(s) re-checked and kept" in note
    assert f"{victim} redone: tensor" in note and "digest differs from the journal" in note


def test_resume_after_a_finished_shard_header_rewritten(tmp_path: Path, inputs: Inputs):
    """attack: overwrite the header of a journaled shard with other bytes, same size, then --resume
    -> outcome: the header is parsed again, refused, the shard redone.
    """
    out = tmp_path / "out"
    partial = killed_copy(inputs, out)
    victim = journaled(partial)[0]
    data = bytearray((partial / victim).read_bytes())
    data[8:24] = b'{"x":{"dtype":1}'
    (partial / victim).write_bytes(bytes(data))
    result = resume(inputs, out)
    assert result.verified and f"{victim} redone" in " ".join(result.notes)
    assert_is_reference(out, inputs)


def test_journal_digest_edited_to_claim_other_bytes(tmp_path: Path, inputs: Inputs):
    """attack: edit a digest in the journal (the shard file itself is fine), then --resume
    -> outcome: file and journal disagree, the shard is redone; the digests reported are the ones this
        run computed.
    """
    out = tmp_path / "out"
    partial = killed_copy(inputs, out)
    lines = (partial / "journal.jsonl").read_text().splitlines()
    entry = json.loads(lines[1])
    name = next(iter(entry["tensors"]))
    algorithm = next(k for k in ("blake3", "sha256") if k in entry["tensors"][name])
    entry["tensors"][name][algorithm] = "0" * 64
    lines[1] = json.dumps(entry)
    (partial / "journal.jsonl").write_text("\n".join(lines) + "\n")
    result = resume(inputs, out)
    assert result.verified, result.notes
    assert f"{entry['shard']} redone: tensor {name!r} digest differs" in " ".join(result.notes)
    assert_is_reference(out, inputs)


def test_finished_shard_swapped_for_a_symlink_to_a_copy(tmp_path: Path, inputs: Inputs):
    """attack: replace a journaled shard by a symlink to an identical copy elsewhere, then --resume
    -> outcome: not kept (not a regular file), redone as a real file; the copy elsewhere is untouched.
    """
    out = tmp_path / "out"
    partial = killed_copy(inputs, out)
    victim = journaled(partial)[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(partial / victim, outside)
    before = outside.read_bytes()
    (partial / victim).unlink()
    (partial / victim).symlink_to(outside)
    result = resume(inputs, out)
    assert result.verified and f"{victim} redone: not a regular file" in " ".join(result.notes)
    assert not (out / victim).is_symlink()
    assert outside.read_bytes() == before
    assert_is_reference(out, inputs)


def test_file_planted_in_the_partial_folder(tmp_path: Path, inputs: Inputs):
    """attack: drop extra files (a script, a stray shard, a symlink out) into the partial folder, then
        --resume
    -> outcome: removed before the run goes on; OUT holds only what this run made.
    """
    out = tmp_path / "out"
    partial = killed_copy(inputs, out)
    secret = tmp_path / "secret.txt"
    secret.write_text("keep me")
    (partial / "run_me.py").write_text("print('hello')")
    shutil.copyfile(partial / journaled(partial)[0], partial / "model-99999.safetensors")
    (partial / "generation_config.json").symlink_to(secret)
    resume(inputs, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in inputs.reference.iterdir())
    assert secret.read_text() == "keep me"
    assert_is_reference(out, inputs)


def test_file_planted_in_a_partial_folder_with_no_finished_shard(tmp_path: Path, inputs: Inputs):
    """attack: plant a file in a partial folder whose journal lists no finished shard yet, then
    --resume
    -> outcome: removed all the same; nothing that was not made by this run reaches OUT.
    """
    out = tmp_path / "out"
    partial = killed_copy(inputs, out)
    journal = partial / "journal.jsonl"
    journal.write_text(journal.read_text().splitlines()[0] + "\n")
    (partial / "added_tokens.json").write_text('{"<evil>": 96}')
    result = resume(inputs, out)
    assert result.verified and not result.notes
    assert not (out / "added_tokens.json").exists()
    assert_is_reference(out, inputs)


def test_partial_folder_replaced_by_a_symlink(tmp_path: Path, inputs: Inputs):
    """attack: make .OUT.deltamerge-partial a symlink to another folder, then --resume
    -> outcome: refused (exit 2) before anything is read or written there.
    """
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(inputs.killed, elsewhere)
    before = entries(elsewhere)
    (tmp_path / ".out.deltamerge-partial").symlink_to(elsewhere)
    code, err = apply_in_process(*apply_args(inputs, out)[1:], "--resume")
    assert code == 2 and "symlink" in err
    assert entries(elsewhere) == before and not out.exists()


def test_convert_killed_then_damaged_then_resumed(tmp_path: Path):
    """attack: kill a convert, flip a byte in a finished shard, run convert --resume
    -> outcome: convert has --resume, re-checks, redoes that shard; the result equals an uninterrupted
        convert.
    """
    meta = tmp_path / "meta"
    hf_to_meta(llama_state(3), META_PARAMS, 2, meta)
    reference = tmp_path / "reference"
    convert(meta, reference, max_shard_size=SHARD)
    out = tmp_path / "out"
    args = ("convert", meta, out, "--max-shard-size", SHARD)
    assert run_cli(*args, "-q", env={"DELTAMERGE_KILL_AT": "shard:2"}).returncode == -9
    partial = tmp_path / ".out.deltamerge-partial"
    victim = journaled(partial)[0]
    flip_byte(partial / victim, (partial / victim).stat().st_size - 1)
    resumed = CliRunner().invoke(main, [*map(str, args), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"{victim} redone: tensor" in resumed.stdout
    assert_states_equal(load_state(out), load_state(reference))


# --- 2. one writer per OUT ---------------------------------------------------------------------


def test_second_apply_while_the_first_is_paused_mid_shard(tmp_path: Path, inputs: Inputs):
    """attack: pause a run mid-way (SIGSTOP) and start the same command on the same OUT: plain, --resume,
        --force
    -> outcome: each refused at once (exit 2) naming the first run's pid, the partial folder
        untouched; the first finishes with the publisher's result.
    """
    out = tmp_path / "out"
    args = apply_args(inputs, out)
    with paused(*args, point="shard:2") as first:
        partial = tmp_path / ".out.deltamerge-partial"
        before = entries(partial)
        for extra in ((), ("--resume",), ("--force",), ("--resume", "--force")):
            code, err = apply_in_process(*args[1:], *extra)
            assert code == 2, (extra, err)
            assert f"pid {first.pid}" in err and "deltamerge apply" in err
        assert entries(partial) == before
        done = finish(first)
    assert done.returncode == 0, done.stderr
    assert_is_reference(out, inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_second_apply_in_the_instant_before_the_partial_folder_exists(tmp_path: Path, inputs: Inputs):
    """attack: start a second run just after the first took OUT but before it made its partial folder
    -> outcome: refused naming the first (the lock is taken before the partial folder is looked for);
        the first finishes.
    """
    out = tmp_path / "out"
    with paused(*apply_args(inputs, out), point="locked") as first:
        assert not (tmp_path / ".out.deltamerge-partial").exists()
        code, err = apply_in_process(*apply_args(inputs, out)[1:], "--resume")
        assert code == 2 and f"pid {first.pid}" in err, err
        assert not (tmp_path / ".out.deltamerge-partial").exists()
        done = finish(first)
    assert done.returncode == 0, done.stderr
    assert_is_reference(out, inputs)


def test_second_make_delta_while_the_first_is_paused(tmp_path: Path, inputs: Inputs):
    """attack: pause a make-delta mid-way and run make-delta again on the same OUT (it would have deleted
        the first's partial folder)
    -> outcome: refused (exit 2) naming the first; the first's delta is byte for byte the reference
        delta.
    """
    out = tmp_path / "delta"
    args = ("make-delta", inputs.base, inputs.target, out, "--max-shard-size", SHARD, "-q")
    with paused(*args, point="header:2") as first:
        for force in (False, True):
            with pytest.raises(OutputBusyError, match=f"pid {first.pid}") as refused:
                make_delta(inputs.base, inputs.target, out, max_shard_size=SHARD, force=force)
            assert refused.value.exit_code == 2
        done = finish(first)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in inputs.delta.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (inputs.delta / name).read_bytes(), name


def test_second_convert_while_the_first_is_paused(tmp_path: Path):
    """attack: pause a convert mid-way and run convert --resume on the same OUT
    -> outcome: refused (exit 2) naming the first; the first's result is an uninterrupted convert's.
    """
    meta = tmp_path / "meta"
    hf_to_meta(llama_state(3), META_PARAMS, 2, meta)
    reference = tmp_path / "reference"
    convert(meta, reference, max_shard_size=SHARD)
    out = tmp_path / "out"
    args = ("convert", meta, out, "--max-shard-size", SHARD, "-q")
    with paused(*args, point="shard:1") as first:
        with pytest.raises(OutputBusyError, match=f"pid {first.pid}: deltamerge convert"):
            convert(meta, out, max_shard_size=SHARD, resume=True)
        done = finish(first)
    assert done.returncode == 0, done.stderr
    assert_states_equal(load_state(out), load_state(reference))


def test_killed_run_leaves_a_lock_file_that_does_not_block_its_resume(tmp_path: Path, inputs: Inputs):
    """attack: SIGKILL a run (its lock file stays, naming a dead pid) and resume
    -> outcome: the kernel released the lock with the process; the resume runs, and removes the lock
        file.
    """
    stale = inputs.root / ".killed.deltamerge-lock"
    assert stale.is_file() and stale.read_text().split("\n")[0].isdigit()
    out = tmp_path / "out"
    killed_copy(inputs, out)
    shutil.copyfile(stale, tmp_path / ".out.deltamerge-lock")
    assert resume(inputs, out).verified
    assert_is_reference(out, inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 3. OUT never inside an input, an input never inside OUT -----------------------------------


@pytest.mark.parametrize("spelling", ["base/merged", "base/../base/merged", "link-to-base/merged",
                                      "base/sub/../merged"])
def test_out_inside_the_base_whatever_the_spelling(tmp_path: Path, inputs: Inputs, spelling: str,
                                                   monkeypatch):
    """attack: OUT inside the base folder, spelled relative, with .., or through a symlink
    -> outcome: refused (exit 2) before any work; nothing is written into the base.
    """
    base = tmp_path / "base"
    shutil.copytree(inputs.base, base)
    (base / "sub").mkdir()
    (tmp_path / "link-to-base").symlink_to(base)
    before = entries(base)
    monkeypatch.chdir(tmp_path)
    code, err = apply_in_process("base", inputs.delta, spelling)
    assert code == 2 and "inside the input folder base" in err, err
    assert entries(base) == before


def test_out_equal_to_the_base_does_not_suggest_force(tmp_path: Path, inputs: Inputs):
    """attack: OUT is the base itself, with and without --force
    -> outcome: refused (exit 2) as the input folder, never suggesting --force (which is refused too).
    """
    for extra in ((), ("--force",)):
        code, err = apply_in_process(inputs.base, inputs.delta, inputs.base, *extra)
        assert code == 2 and "is the input folder" in err and "--force" not in err, err


def test_out_that_holds_an_input_with_force(tmp_path: Path, inputs: Inputs):
    """attack: OUT is a folder that holds the base (its parent), with --force
    -> outcome: refused (exit 2); --force never removes an input.
    """
    code, err = apply_in_process(inputs.base, inputs.delta, inputs.root, "--force")
    assert code == 2 and "holds the input folder" in err
    assert inputs.base.is_dir()


def test_out_a_symlink_to_the_delta(tmp_path: Path, inputs: Inputs):
    """attack: OUT is a symlink to the delta folder, with --force
    -> outcome: refused (exit 2): a symlink is a spelling of its target.
    """
    (tmp_path / "out").symlink_to(inputs.delta)
    code, err = apply_in_process(inputs.base, inputs.delta, tmp_path / "out", "--force")
    assert code == 2 and "a symlink to" in err and "input folder" in err


def test_base_is_the_partial_folder_of_out(tmp_path: Path, inputs: Inputs):
    """attack: give OUT's own partial folder as the base (a resume would write into it)
    -> outcome: refused (exit 2).
    """
    partial = killed_copy(inputs, tmp_path / "out")
    shutil.copytree(inputs.base, partial / "base-copy")
    code, err = apply_in_process(partial / "base-copy", inputs.delta, tmp_path / "out", "--resume")
    assert code == 2 and "its partial folder" in err, err


def test_make_delta_out_inside_the_target(tmp_path: Path, inputs: Inputs):
    """attack: make-delta with OUT inside the target folder
    -> outcome: refused (exit 2); the target is not written.
    """
    target = tmp_path / "target"
    shutil.copytree(inputs.target, target)
    before = entries(target)
    with pytest.raises(InputError, match="inside the input folder"):
        make_delta(inputs.base, target, target / "delta")
    assert entries(target) == before


def test_convert_out_inside_the_meta_folder(tmp_path: Path):
    """attack: convert with OUT inside Meta's folder
    -> outcome: refused (exit 2).
    """
    meta = tmp_path / "meta"
    hf_to_meta(llama_state(3), META_PARAMS, 1, meta)
    with pytest.raises(InputError, match="inside the input folder"):
        convert(meta, meta / "hf")
    assert not (meta / "hf").exists()


def test_out_inside_the_hub_cache_of_a_hub_input(tmp_path: Path, inputs: Inputs, monkeypatch):
    """attack: a Hub repo id as base and OUT inside that repo's folder of the Hub cache
    -> outcome: refused (exit 2) before any request.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = cache / "models--someone--llama" / "merged"
    out.parent.mkdir(parents=True)
    with pytest.raises(InputError, match="inside the input folder someone/llama"):
        apply_delta("someone/llama", inputs.delta, out, hub={"endpoint": "http://127.0.0.1:9"})


def test_out_inside_the_cache_repository_of_a_local_snapshot(tmp_path: Path, inputs: Inputs):
    """attack: the base is a Hub cache snapshot path (files symlinked into blobs/) and OUT is inside that
        repository's blobs/
    -> outcome: refused (exit 2): the blobs are the base's bytes.
    """
    repo = tmp_path / "models--someone--llama"
    snapshot = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in inputs.base.iterdir():
        shutil.copyfile(f, repo / "blobs" / f.name)
        (snapshot / f.name).symlink_to(f"../../blobs/{f.name}")
    code, err = apply_in_process(snapshot, inputs.delta, repo / "blobs" / "merged")
    assert code == 2 and "input folder" in err, err


# --- 7. leave nothing behind -------------------------------------------------------------------


def test_out_a_symlink_to_an_empty_folder(tmp_path: Path, inputs: Inputs):
    """attack: OUT is a symlink to an empty folder
    -> outcome: the link itself is replaced by the result; its target stays, empty; no
        .OUT.deltamerge-old link is left.
    """
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    out = tmp_path / "out"
    assert apply_delta(inputs.base, inputs.delta, out, max_shard_size=SHARD).verified
    assert out.is_dir() and not out.is_symlink()
    assert_is_reference(out, inputs)
    assert list(target.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]


def test_force_over_a_symlinked_out_with_data_behind_it(tmp_path: Path, inputs: Inputs):
    """attack: --force over an OUT that is a symlink to a folder of data
    -> outcome: the link is replaced, the data behind it is never deleted; nothing left beside OUT.
    """
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious.txt").write_text("data")
    (tmp_path / "out").symlink_to(target)
    assert apply_delta(inputs.base, inputs.delta, tmp_path / "out", force=True).verified
    assert not (tmp_path / "out").is_symlink()
    assert (target / "precious.txt").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]


def test_out_a_dangling_symlink(tmp_path: Path, inputs: Inputs):
    """attack: OUT is a symlink to nothing
    -> outcome: replaced by the result; nothing left beside it.
    """
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    assert apply_delta(inputs.base, inputs.delta, tmp_path / "out").verified
    assert (tmp_path / "out").is_dir() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_run_leaves_no_lock_and_no_partial(tmp_path: Path, inputs: Inputs):
    """attack: a run that fails its verification (the wrong base)
    -> outcome: exit 1, and nothing at all beside OUT: no partial folder, no lock file.
    """
    wrong = save_checkpoint(llama_state(7), tmp_path / "wrong")
    code, err = apply_in_process(wrong, inputs.delta, tmp_path / "out")
    assert code == 1 and "publisher's base" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong"]
