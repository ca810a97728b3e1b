"""One run lifecycle (engine/lifecycle.py): the tensor stream and the whole-file decoders stop,
journal and resume the same way, with one fingerprint and one way of stopping threads.

Runs are stopped in process: the fault point raises KeyboardInterrupt where it is reached, as a
Ctrl-C's handler does (a real SIGINT sent to the test process was lost now and then when the
suite ran whole; tests/runs/test_interrupts.py sends real signals to real processes).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import assert_states_equal, llama_state, load_state, save_checkpoint
from releases import _decoded_files, _oa_release, oa_encode

from deltamerge import apply_delta, faults
from deltamerge.engine.journal import fingerprint
from deltamerge.engine.plan import layout_shards
from deltamerge.engine.workers import Workers
from deltamerge.errors import InputError, InterruptedRun
from deltamerge.options import MakeOptions, RunOptions


@pytest.fixture
def interrupt_at(monkeypatch):
    """A Ctrl-C at the n-th time the run reaches ``point``: raised where the point is reached,
    as the signal's handler raises it there, without a signal the test process must take."""
    def arm(point: str) -> None:
        name, _, count = point.partition(":")
        seen = Counter()

        def reached(at: str) -> None:
            seen[at] += 1
            if at == name and seen[at] == int(count or 1):
                raise KeyboardInterrupt

        monkeypatch.setattr(faults, "reached", reached)
    return arm


def _journal(partial: Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in (partial / "journal.jsonl").read_text().splitlines()]
    return lines[0], lines[1:]


def _interrupted(run, out: Path) -> tuple[dict, list[dict]]:
    with pytest.raises(InterruptedRun, match="--resume") as stopped:
        run()
    assert stopped.value.exit_code == 130 and not out.exists()
    return _journal(out.parent / f".{out.name}.deltamerge-partial")


def test_an_apply_and_a_whole_file_decode_stop_journal_and_resume_alike(
    tmp_path: Path, interrupt_at, monkeypatch
):
    base = save_checkpoint(llama_state(0), tmp_path / "base")
    delta = save_checkpoint(llama_state(1), tmp_path / "delta")
    xbase, tuned, xdelta = _oa_release(tmp_path)
    oa_encode(tuned, xbase, xdelta)
    merged, decoded = tmp_path / "merged", tmp_path / "decoded"

    interrupt_at("shard:2")
    head, shards = _interrupted(
        lambda: apply_delta(base, delta, merged, kind="add", max_shard_size="30000"), merged)
    interrupt_at("shard:2")
    xhead, files = _interrupted(lambda: apply_delta(xbase, xdelta, decoded), decoded)
    interrupt_at("none")  # disarmed: no point is named so

    # One journal: a fingerprint with its parts, then one line per finished unit.
    assert set(head) == set(xhead) == {"fingerprint", "parts"}
    assert set(head["parts"]) == set(xhead["parts"]) == {"inputs", "files", "options", "layout"}
    assert len(shards) == len(files) == 2
    assert all({"shard", "size", "tensors"} <= set(line) for line in shards + files)
    assert all(set(line["extra"]) == {"md5", "mask_md5"} for line in files)

    resumed = apply_delta(base, delta, merged, kind="add", max_shard_size="30000", resume=True)
    assert any(n.startswith("resumed: 2 finished shard(s) re-checked and kept") for n in resumed.notes)
    fresh = apply_delta(base, delta, tmp_path / "fresh", kind="add", max_shard_size="30000")
    assert resumed.model_digest == fresh.model_digest
    assert_states_equal(load_state(merged), load_state(tmp_path / "fresh"))

    xresumed = apply_delta(xbase, xdelta, decoded, resume=True)
    assert "resumed: 2 decoded file(s) kept, each hashed again" in xresumed.notes
    expected = _decoded_files(tuned, xbase, False)
    assert {p.name: p.read_bytes() for p in decoded.iterdir() if p.name in expected} == expected
    assert not (decoded / "journal.jsonl").exists()


def test_the_fingerprint_differs_when_an_option_or_an_input_does(tmp_path: Path):
    folder = save_checkpoint(llama_state(0), tmp_path / "base")
    layout = ["model.safetensors"]
    first = fingerprint([folder], {"dtype": "float16", "version": "1"}, layout)
    assert fingerprint([folder], {"dtype": "float16", "version": "1"}, layout) == first
    other = fingerprint([folder], {"dtype": "bfloat16", "version": "1"}, layout)
    assert other.digest != first.digest
    assert other.differences(first.parts) == ["--dtype differs (float16 then, bfloat16 now)"]
    relaid = fingerprint([folder], {"dtype": "float16", "version": "1"}, ["other.safetensors"])
    assert relaid.digest != first.digest
    one_file = fingerprint([folder / "config.json"], {"dtype": "float16", "version": "1"}, layout)
    assert list(one_file.parts["files"]) == [str(folder / "config.json")]
    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    changed = fingerprint([folder / "config.json"], {"dtype": "float16", "version": "1"}, layout)
    assert changed.digest != one_file.digest
    assert changed.differences(one_file.parts) == [
        f"input file {folder / 'config.json'} changed (size or modification time)"]


def test_workers_stop_the_others_at_the_first_failure_and_raise_it():
    pool = Workers(3, "test")
    started = threading.Barrier(3, timeout=10)
    stopped = []

    def task(i: int) -> int:
        started.wait()
        if i == 1:
            raise ValueError("task 1 failed")
        for _ in range(10_000):  # ends at the next check once the pool stops
            try:
                pool.check()
            except Exception:
                stopped.append(i)
                raise
            time.sleep(0.001)
        return i

    with pytest.raises(ValueError, match="task 1 failed"):
        pool.map(task, [0, 1, 2])
    assert sorted(stopped) == [0, 2]
    assert Workers(2, "test").map(lambda i: i * i, list(range(7))) == [i * i for i in range(7)]
    assert Workers(1, "test").map(lambda i: -i, [1, 2]) == [-1, -2]


def test_the_options_object_yields_the_fingerprint_and_the_record(tmp_path: Path):
    folder = save_checkpoint(llama_state(0), tmp_path / "base")
    shards: list = layout_shards([], 1000)
    half = RunOptions.of(dtype="float16", format="gguf", outtype="q8_0")
    assert half.record() == {"dtype": "float16", "new_rows": "zero", "format": "gguf",
                             "outtype": "q8_0", "split_max_size": 0}
    first = half.fingerprint([folder], ["add"], "blake3", shards)
    assert half.fingerprint([folder], ["add"], "blake3", shards) == first
    assert {k: first.parts["options"][k] for k in half.record()} == half.record()
    brain = RunOptions.of(dtype="bfloat16", format="gguf", outtype="q8_0")
    assert brain.fingerprint([folder], ["add"], "blake3", shards).differences(first.parts) == [
        "--dtype differs (float16 then, bfloat16 now)"]
    lora = RunOptions.of(dtype="float16", format="gguf", outtype="q8_0", lora_alpha=16)
    assert lora.record() == half.record()  # not recorded, but it changes the bytes:
    assert lora.fingerprint([folder], ["add"], "blake3", shards).digest != first.digest
    assert RunOptions.of(qlora="nf4").record()["qlora"] == "nf4"
    with pytest.raises(InputError, match="--qlora-dtype .* needs --qlora"):
        RunOptions.of(qlora_dtype="float16")
    xor = MakeOptions.of(kind="xor", compress=True, compress_level=5)
    assert xor.kind == "xor-zstd"
    made = xor.fingerprint([folder], shards)
    assert made.parts["options"]["compress_level"] == 5
    assert MakeOptions.of(kind="xor", compress=True, compress_level=6).fingerprint(
        [folder], shards).digest != made.digest
