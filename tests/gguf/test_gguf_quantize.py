"""--outtype q4_k_m ... q5_1: what llama.cpp's llama-quantize writes from the converter's GGUF.

The tests cannot run llama.cpp (``scripts/gguf_vs_llamacpp.py --quantize`` compares the files
byte for byte); here the type mix is checked against the types llama-quantize chose for tiny
models (``gguf_quant_types.json``, recorded by ``scripts/gguf_quant_types.py``), and the file
against its parts: the converter's key/values, llama-quantize's order and mix, and each row
quantized by ``gguf_quants`` from the converter's value of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from gguf_models import (
    GGUF_NAMES,
    RECORD,
    WIDE_KV,
    assert_resumed_as,
    permuted,
    specs,
    tiny_llama,
    wide_llama,
)
from helpers import (
    GROUP,
    HIDDEN,
    PRELUDE,
    TESTS,
    apply_in_process,
    load_state,
    run_cli,
    run_in_process,
)

import deltamerge.apply
import deltamerge.sinks.gguf as gguf_module
from deltamerge import apply_delta
from deltamerge.errors import InputError
from deltamerge.options import RunOptions
from deltamerge.outputs.gguf import QUANTIZED_BLOCK_BYTES, QUANTIZED_OUTTYPES
from deltamerge.sinks import gguf_types
from deltamerge.sinks.gguf import GGUFStreamWriter, plan_gguf
from deltamerge.sinks.gguf_quants import quantize_rows
from deltamerge.sizes import DEFAULT_BLOCK_BYTES

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType
TABLE = json.loads((TESTS / "gguf_quant_types.json").read_text())
ROWS = 16  # the first and last rows of each tensor are quantized again to check them (k-quants are slow)


def write(folder: Path, out: Path, outtype: str, threads: int = 1, seed: int = 0):
    """Plan and stream every tensor in a shuffled order, in random blocks of whole heads."""
    state = load_state(folder)
    plan = plan_gguf(folder, specs(state), outtype=outtype)
    out.mkdir(parents=True)
    rnd = random.Random(seed)
    names = list(state)
    rnd.shuffle(names)
    with GGUFStreamWriter(plan, out, threads=threads) as writer:
        for name in names:
            t, r = state[name], 0
            while r < t.shape[0]:
                r1 = min(t.shape[0], r + 64 * rnd.randint(1, 3))
                writer.write_rows(name, r, r1, t[r:r1])
                r = r1
    return plan, state


def fields(path: Path) -> list[tuple[str, object]]:
    reader = gguf.GGUFReader(path)
    return [(f.name, f.types, f.contents()) for f in reader.fields.values() if not f.name.startswith("GGUF.")]


@pytest.mark.parametrize("model", sorted(TABLE))
def test_the_type_mix_is_llama_quantizes(model: str):
    entry = TABLE[model]
    info = gguf_types.ModelInfo(entry["arch"], entry["n_layer"], entry["n_head"], entry["n_head_kv"],
                                entry["n_expert"])
    tensors = [(name, tuple(shape)) for name, shape in entry["tensors"]]
    assert gguf_types.order([name for name, _ in tensors]) == entry["order"]
    assert sorted(entry["types"]) == sorted(gguf_types.OUTTYPES)
    for outtype, expected in entry["types"].items():
        types = gguf_types.quantized_types(outtype, info, tensors)
        found = [QT(types[name]).name if name in types else kept
                 for (name, _), kept in zip(tensors, entry["input"], strict=True)]
        assert found == expected, outtype


def test_falcon_and_its_ffn_down_follow_their_own_rules():
    """Rules no table model reaches (llama-quant.cpp: Falcon's output and ffn_down under Q4_K_M)."""
    info = gguf_types.ModelInfo("falcon", 32, 32, 1)
    tensors = [("output.weight", (1000, 256)), ("token_embd.weight", (1000, 256))]
    tensors += [(f"blk.{i}.ffn_down.weight", (256, 1024)) for i in range(32)]
    types = {k: QT(v).name for k, v in gguf_types.quantized_types("q4_k_m", info, tensors).items()}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_K"
    downs = [types[f"blk.{i}.ffn_down.weight"] for i in range(32)]
    assert downs[:2] == ["Q6_K", "Q6_K"]  # layer < n/16
    assert downs[2:5] == ["Q5_K", "Q5_K", "Q4_K"]  # use_more_bits: i < n/8, then (i - n/8) % 3 == 2
    assert downs[28:] == ["Q5_K"] * 4  # i >= 7n/8


@pytest.mark.parametrize(("dtype", "outtype"), [
    (torch.float16, "q4_k_m"), (torch.bfloat16, "q5_1"), (torch.float32, "q4_0")])
def test_the_file_is_the_converters_requantized(tmp_path: Path, sp_model: bytes, dtype, outtype):
    """Key/values, order, types and bytes: llama-quantize's file from the converter's at the dtype."""
    hf = wide_llama(tmp_path / "hf", sp_model, dtype)
    plan, state = write(hf, tmp_path / "q", outtype, threads=2)
    own = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}[dtype]
    converted, _ = write(hf, tmp_path / "c", own)
    assert len(plan.files) == 1 and plan.files[0].name.endswith(f"-{outtype.upper()}.gguf")
    path, source = tmp_path / "q" / plan.files[0].name, tmp_path / "c" / converted.files[0].name

    moved = ("general.quantization_version", "general.file_type")
    expected = [f for f in fields(source) if f[0] not in moved]
    expected += [(moved[0], [gguf.GGUFValueType.UINT32], 2),
                 (moved[1], [gguf.GGUFValueType.UINT32], gguf_types.file_type(outtype))]
    assert fields(path) == expected

    reader = gguf.GGUFReader(path)
    names = [t.name for t in reader.tensors]
    assert names == gguf_types.order(names) and sorted(names) == sorted(GGUF_NAMES[n] for n in state)
    info = gguf_types.ModelInfo("llama", 1, 4, WIDE_KV)
    shapes = [(t.name, tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors]
    mix = gguf_types.quantized_types(outtype, info, shapes)
    hf_names = {g: h for h, g in GGUF_NAMES.items()}
    seen = set()
    for t in reader.tensors:
        assert int(t.data_offset) % 32 == 0
        x = state[hf_names[t.name]].to(torch.float32)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            x = permuted(x, 4 if "attn_q" in t.name else WIDE_KV)
        qtype = QT(mix.get(t.name, QT.F32))
        assert t.tensor_type == qtype, t.name
        data = t.data.reshape(x.shape[0], -1) if x.dim() > 1 else t.data.reshape(1, -1)
        for rows in ([slice(None)] if x.dim() == 1 else [slice(0, ROWS), slice(-ROWS, None)]):
            if qtype == QT.F32:
                expected = x[rows].numpy()
            elif qtype == QT.F16:
                expected = x[rows].to(torch.float16).numpy()
            else:
                expected = quantize_rows(x[rows].contiguous(), qtype).numpy()
            assert data[rows].tobytes() == expected.tobytes(), t.name
        seen.add(qtype.name)
    assert {"F32"} < seen  # the norms, and what is quantized


def test_threads_change_nothing(tmp_path: Path, sp_model: bytes, monkeypatch):
    """A merge quantized on 1 and on 2 threads, in pieces of 4 rows: the same bytes, the same record."""
    monkeypatch.setattr(gguf_module, "_QUANT_CHUNK_ELEMENTS", 4 * HIDDEN)
    base = tiny_llama(tmp_path / "base", sp_model, torch.float16)
    delta = tiny_llama(tmp_path / "delta", sp_model, torch.float16)
    outs = []
    for threads in (1, 2):
        (tmp_path / str(threads)).mkdir()
        out = tmp_path / str(threads) / "model"
        result = apply_delta(base, delta, out, format="gguf", outtype="q4_k_m", threads=threads)
        outs.append((out, result))
    (a, ra), (b, rb) = outs
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in a.iterdir():
        if path.name != RECORD:
            assert path.read_bytes() == (b / path.name).read_bytes()
    assert ra.model_digest == rb.model_digest
    record = json.loads((a / RECORD).read_text())
    assert record["options"]["outtype"] == "q4_k_m" and "threads" not in record["options"]


def test_a_killed_quantized_run_resumes_to_the_same_bytes(tmp_path: Path, sp_model: bytes):
    base = tiny_llama(tmp_path / "base", sp_model, torch.float16)
    delta = tiny_llama(tmp_path / "delta", sp_model, torch.float16)
    args = ["apply", base, delta, "--format", "gguf", "--outtype", "q4_k_m", "--block-size", "3000"]
    (tmp_path / "ref").mkdir()
    reference = tmp_path / "ref" / "model"
    out = tmp_path / "model"
    with pytest.MonkeyPatch.context() as mp:  # the killed run's tensor groups (PRELUDE)
        mp.setattr(deltamerge.apply, "DEFAULT_SHARD_SIZE", GROUP)
        apply_delta(base, delta, reference, format="gguf", outtype="q4_k_m")
        killed = run_cli(*args, out, "-q", env={"DELTAMERGE_KILL_AT": "shard:2"}, prelude=PRELUDE)
        assert killed.returncode == -9, killed.stderr
        resumed = run_in_process(*args, out, "--resume", "--threads", "2")
    result = assert_resumed_as(resumed, out, reference)
    assert {t["dtype"] for t in result["tensors"].values()} >= {"Q5_0", "Q8_0", "F16", "F32"}


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "gguf", "--outtype", "q4_k_m", "--max-shard-size", "1MB"], "writes one file, as llama-q"),
])
def test_refusals_exit_2_with_nothing_at_out(tmp_path: Path, sp_model: bytes, args, message):
    import re

    base = tiny_llama(tmp_path / "base", sp_model)
    delta = tiny_llama(tmp_path / "delta", sp_model)
    code, err = apply_in_process(base, delta, tmp_path / "out", *args)
    assert code == 2, err
    assert re.search(message, err) and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta"]


def test_plan_gguf_refuses_splits_of_a_quantized_file(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model)
    with pytest.raises(InputError, match="writes one file"):
        plan_gguf(hf, specs(load_state(hf)), outtype="q4_0", split_max_size=100_000)


def test_quantized_outtypes_default_to_smaller_blocks() -> None:
    """Their runs load numba's compiler (about 100 MiB), so their blocks default to 16 MiB to keep
    a 13B-wide run under 512 MiB; the other formats keep 24 MiB, and --block-size always wins."""
    assert QUANTIZED_BLOCK_BYTES < DEFAULT_BLOCK_BYTES
    for outtype in QUANTIZED_OUTTYPES:
        assert RunOptions.of(format="gguf", outtype=outtype).block_size == QUANTIZED_BLOCK_BYTES
    for fmt, outtype in (("gguf", "f16"), ("gguf", "q8_0"), ("gguf", None), ("hf", None)):
        assert RunOptions.of(format=fmt, outtype=outtype).block_size == DEFAULT_BLOCK_BYTES
    assert RunOptions.of(format="gguf", outtype="q4_k_m", block_size="40MiB").block_size == 40 << 20
