"""A killed merge resumes; a stopped one stops cleanly; a full disk is refused before any work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import (
    assert_states_equal,
    file_holding,
    fine_tune,
    flip_bit,
    llama_state,
    load_state,
    run_cli,
    run_in_process,
    save_checkpoint,
    with_manifest_format,
)

from deltamerge.formats.safetensors import read_header
from deltamerge.make import make_delta

SHARD = "30000"  # about nine output shards for the tiny model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    base = save_checkpoint(llama_state(0), root / "base", shard_bytes=40_000)
    delta = save_checkpoint(llama_state(1), root / "delta", "bin", shard_bytes=50_000)
    reference = root / "reference"
    proc = run_in_process("apply", base, delta, reference, "--max-shard-size", SHARD, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return base, delta, reference


def shard_stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("model-*")}


@pytest.mark.parametrize("point,workers", [
    ("header:2", "1"), ("block:7", "2"), ("shard:3", "2"), ("publish", "1"),
])
def test_killed_run_resumes_to_the_same_result(tmp_path: Path, inputs, point: str, workers: str):
    base, delta, reference = inputs
    out = tmp_path / "out"
    args = ("apply", base, delta, out, "--max-shard-size", SHARD, "--quiet", "--workers", workers,
            "--block-size", "4096")
    killed = run_cli(*args, env={"DELTAMERGE_KILL_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    partial = tmp_path / ".out.deltamerge-partial"
    assert partial.is_dir()
    journal = (partial / "journal.jsonl").read_text().splitlines()
    finished = [line.split('"shard": "')[1].split('"')[0] for line in journal[1:]]
    before = {n: s for n, s in shard_stats(partial).items() if n in finished}

    refused = run_in_process(*args)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert "Traceback" not in refused.stderr

    resumed = run_in_process(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_states_equal(load_state(out), load_state(reference))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    after = shard_stats(out)
    assert all(after[n] == s for n, s in before.items()), "finished shards were rewritten"
    if point in ("shard:3", "publish"):
        assert before, "the kill came after shards were finished"
    assert not partial.exists()


def test_resume_refuses_a_partial_folder_from_other_options(tmp_path: Path, inputs):
    base, delta, _ = inputs
    out = tmp_path / "out"
    killed = run_cli("apply", base, delta, out, "--max-shard-size", SHARD, "--quiet",
                     env={"DELTAMERGE_KILL_AT": "shard:2"})
    assert killed.returncode == -9
    other = run_in_process("apply", base, delta, out, "--max-shard-size", SHARD, "--dtype", "float32",
                           "--resume")
    assert other.returncode == 2 and "other inputs or options" in other.stderr


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, Path]:
    """A base and a delta made by make-delta, with its manifest."""
    root = tmp_path_factory.mktemp("published")
    state = llama_state(0)
    base = save_checkpoint(state, root / "base", shard_bytes=40_000)
    target = save_checkpoint(fine_tune(state, 5), root / "target")
    make_delta(base, target, root / "delta", max_shard_size="40KB")
    return base, root / "delta"


def _kill_after_shards(tmp_path: Path, base: Path, delta: Path) -> tuple[tuple, list[str]]:
    out = tmp_path / "out"
    args = ("apply", base, delta, out, "--max-shard-size", SHARD, "--workers", "2",
            "--block-size", "4096")
    killed = run_cli(*args, "--quiet", env={"DELTAMERGE_KILL_AT": "shard:3"})
    assert killed.returncode == -9, killed.stderr
    journal = (tmp_path / ".out.deltamerge-partial" / "journal.jsonl").read_text().splitlines()
    return args, [json.loads(line)["shard"] for line in journal[1:]]


@pytest.mark.parametrize("fmt", [2, 1])
def test_a_resumed_run_still_checks_the_delta_behind_the_shards_it_kept(tmp_path, published, fmt):
    """The kept shards' delta rows are not read again, so their check is made after the run: a
    delta changed between the kill and the resume (size and mtime kept) is still caught."""
    base, made = published
    delta = tmp_path / "delta"
    shutil.copytree(made, delta)
    algorithm = with_manifest_format(fmt, delta, base, tmp_path / "scratch")
    args, kept = _kill_after_shards(tmp_path, base, delta)
    partial = tmp_path / ".out.deltamerge-partial"
    tensor = next(iter(read_header(partial / kept[0]).tensors))
    victim = file_holding(delta, tensor)
    st = victim.stat()
    flip_bit(victim, tensor)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # the plan's fingerprint still fits
    resumed = run_in_process(*args, "--resume", "--quiet")
    assert resumed.returncode == 1, resumed.stderr
    assert victim.name in resumed.stderr and algorithm in resumed.stderr
    if fmt == 2:
        assert f"tensor {tensor!r}" in resumed.stderr
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_of_a_published_delta_is_verified(tmp_path, published):
    base, delta = published
    args, kept = _kill_after_shards(tmp_path, base, delta)
    assert kept
    resumed = run_in_process(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "(matches the publisher's result)" in resumed.stdout


# As from a terminal: a child of a background job starts with SIGINT ignored, and Python then
# installs no Ctrl-C handler at all, so the child sets the default one itself.
FOREGROUND = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"


@pytest.mark.parametrize("signal_name,workers,status", [("TERM", "2", 143), ("INT", "1", 130)])
def test_signals_stop_cleanly_and_keep_the_partial_folder(
    tmp_path: Path, inputs, signal_name: str, workers: str, status: int
):
    base, delta, reference = inputs
    out = tmp_path / "out"
    args = ("apply", base, delta, out, "--max-shard-size", SHARD, "--workers", workers,
            "--block-size", "4096")
    stopped = run_cli(*args, env={"DELTAMERGE_KILL_AT": "block:9",
                                  "DELTAMERGE_KILL_SIGNAL": signal_name}, prelude=FOREGROUND)
    assert stopped.returncode == status, stopped.stderr
    assert "Traceback" not in stopped.stderr and "--resume" in stopped.stderr
    assert not out.exists() and (tmp_path / ".out.deltamerge-partial").is_dir()
    resumed = run_in_process(*args, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert_states_equal(load_state(out), load_state(reference))


def test_too_little_disk_is_refused_before_any_work(tmp_path: Path, inputs):
    """A real small filesystem: a 64 KiB tmpfs cannot hold the ~280 KB result."""
    base, delta, _ = inputs
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        proc = run_cli("apply", base, delta, mnt / "out")
        assert proc.returncode == 1, proc.stderr
        assert "not enough free space" in proc.stderr and "bytes" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
