"""Mixtral as GGUF: each layer's experts stacked into ``blk.N.ffn_{gate,down,up}_exps.weight``.

The f16 file is compared byte for byte with llama.cpp's pinned converter (``llamacpp.py``) on a
tiny Mixtral of transformers' own classes with test_gguf's sentencepiece tokenizer; q4_k_m with
the parts of llama-quantize's file (the suite cannot run llama-quantize:
``scripts/gguf_vs_llamacpp.py --quantize`` compares whole files). Each expert's rows are written
at their slot of the stacked tensor as they stream, and hashed as that slot. Of the other test
files it takes only the suite's shared helpers (``load_state``, ``run_cli``, ``GROUP``,
``PRELUDE``, the ``sp_model`` fixture).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gguf_models import RECORD, assert_resumed_as, perturbed
from helpers import GROUP, PRELUDE, load_state, run_cli, run_in_process
from safetensors.torch import load_file, save_file

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from llamacpp import Conversion  # noqa: E402

import deltamerge.apply  # noqa: E402
from deltamerge import apply_delta  # noqa: E402
from deltamerge.cli import main  # noqa: E402
from deltamerge.errors import FormatError  # noqa: E402
from deltamerge.integrity.digest import new_hash  # noqa: E402
from deltamerge.sinks import gguf_types  # noqa: E402
from deltamerge.sinks.gguf import GGUFStreamWriter, plan_gguf  # noqa: E402
from deltamerge.sinks.gguf_quants import quantize_rows  # noqa: E402

QT = gguf.GGMLQuantizationType
# Ten experts: the converter reads a file's tensors by name, experts.1, experts.10, experts.2...,
# and stacks them in their numbers' order once the last one (experts.9.w3) has come.
EXPERTS = 10
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 256, "num_local_experts": EXPERTS}
KINDS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def expert(layer: int, e: int, kind: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{kind}.weight"


def specs(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]


def cli(*args: object) -> None:
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert result.exit_code == 0, (result.stderr, result.exception)


def mixtral(folder: Path, sp: bytes, dtype: torch.dtype = torch.float16, **config: object) -> Path:
    """A tiny Mixtral of transformers' own classes (random weights, norms not ones) with the
    suite's sentencepiece tokenizer, LLaMA's kind."""
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_proto=sp).vocab_size()
    cfg = transformers.MixtralConfig(**{**TINY, "vocab_size": vocab, **config})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():
        for t in model.parameters():
            if t.dim() == 1:
                t.add_(torch.randn(t.shape, dtype=torch.float32).to(dtype) * 0.1)
    model.save_pretrained(folder)
    return folder


def merged_both_ways(tmp_path: Path, base: Path, outtype: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(our GGUF of a merged fine-tune, the converter's GGUF of the same result in safetensors)."""
    target = perturbed(base, tmp_path / "target", seed=1)
    (tmp_path / "hf").mkdir()
    (tmp_path / "gguf").mkdir()
    cli("make-delta", base, target, tmp_path / "delta")
    cli("apply", base, tmp_path / "delta", tmp_path / "hf" / "tiny-merged")
    with Conversion(tmp_path / "hf" / "tiny-merged", tmp_path / "converted", outtype) as conversion:
        cli("apply", base, tmp_path / "delta", tmp_path / "gguf" / "tiny-merged", "--format", "gguf",
            "--outtype", outtype)
        ours = {p.name: p.read_bytes() for p in sorted((tmp_path / "gguf" / "tiny-merged").glob("*.gguf"))}
        return ours, conversion.files()


def shuffled(folder: Path, out: Path, outtype: str, seed: int) -> dict[str, bytes]:
    """The GGUF planned from ``folder`` and streamed in a shuffled order, in random blocks of rows."""
    state = load_state(folder)
    plan = plan_gguf(folder, specs(state), outtype=outtype)
    out.mkdir()
    rnd = random.Random(seed)
    names = list(state)
    rnd.shuffle(names)
    with GGUFStreamWriter(plan, out) as writer:
        for name in names:
            t, r = state[name], 0
            while r < t.shape[0]:
                r1 = min(t.shape[0], r + rnd.randint(1, 40))
                writer.write_rows(name, r, r1, t[r:r1])
                r = r1
    return {f.name: (out / f.name).read_bytes() for f in plan.files}


def assert_same_files(ours: dict[str, bytes], theirs: dict[str, bytes]) -> None:
    assert list(ours) == list(theirs)
    for name in ours:
        if ours[name] != theirs[name]:
            first = next(i for i, (x, y) in enumerate(zip(ours[name], theirs[name])) if x != y)
            pytest.fail(f"{name}: {len(ours[name])} bytes, the converter's {len(theirs[name])}; "
                        f"first difference at byte {first}")


def slot_digests(out: Path, hf_state: dict[str, torch.Tensor]) -> None:
    """Every slot of the stacked tensors in OUT's file is its expert, converted to f16, and its
    digest in OUT's record (named NAME[E], one expert's shape) is of the slot's bytes alone."""
    record = json.loads((out / RECORD).read_text())["result"]["tensors"]
    [path] = out.glob("*.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == QT.F32  # the router
    for layer in range(TINY["num_hidden_layers"]):
        for kind, stacked in KINDS.items():
            name = f"blk.{layer}.{stacked}.weight"
            t = tensors[name]
            assert t.data.shape[0] == EXPERTS and name not in record
            for e in range(EXPERTS):
                slot = torch.from_numpy(t.data[e].copy())
                assert torch.equal(slot, hf_state[expert(layer, e, kind)].to(torch.float16))
                digest = record[f"{name}[{e}]"]
                assert digest["shape"] == list(slot.shape) and digest["dtype"] == "F16"
                assert digest["blake3"] == new_hash("blake3", slot.numpy().tobytes()).hexdigest()


def test_f16_is_the_converters_file(tmp_path: Path, sp_model: bytes):  # noqa: F811
    """The merged Mixtral, byte for byte the converter's, streamed in plan order and shuffled;
    kept as f16, a slot's bytes are its expert's own, and so is its digest."""
    base = mixtral(tmp_path / "base", sp_model)
    ours, theirs = merged_both_ways(tmp_path, base, "f16")
    assert_same_files(ours, theirs)
    assert_same_files(shuffled(tmp_path / "hf" / "tiny-merged", tmp_path / "shuffled", "f16", seed=3), theirs)
    out = tmp_path / "gguf" / "tiny-merged"
    slot_digests(out, load_state(tmp_path / "hf" / "tiny-merged"))
    record = json.loads((out / RECORD).read_text())
    for e in range(EXPERTS):
        merged = record["merged"]["tensors"][expert(1, e, "w2")]
        assert record["result"]["tensors"][f"blk.1.ffn_down_exps.weight[{e}]"]["blake3"] == merged["blake3"]


def test_each_expert_is_a_slot_converted_and_hashed_alone(tmp_path: Path, sp_model: bytes):  # noqa: F811
    """A bf16 Mixtral written as f16: each expert's rows, converted, go to their slot's offset,
    and each slot is hashed as the bytes it holds."""
    base = mixtral(tmp_path / "base", sp_model, torch.bfloat16)
    target = perturbed(base, tmp_path / "target", seed=1)
    cli("make-delta", base, target, tmp_path / "delta")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m"
    result = apply_delta(base, tmp_path / "delta", out, format="gguf", outtype="f16")
    merged = apply_delta(base, tmp_path / "delta", tmp_path / "hf").out
    slot_digests(out, load_state(merged))
    plan = plan_gguf(merged, specs(load_state(merged)), outtype="f16")
    first = plan.tensor(expert(0, 0, "w2"))
    for e in range(EXPERTS):
        slot = plan.tensor(expert(0, e, "w2"))
        assert (slot.name, slot.slot, slot.slots) == ("blk.0.ffn_down_exps.weight", e, EXPERTS)
        assert slot.shape == (64, 128) and slot.offset == first.offset + e * slot.nbytes
    assert result.model_digest == json.loads((out / RECORD).read_text())["result"]["model_digest"]


def test_a_killed_run_resumes_with_a_layers_experts_in_several_groups(tmp_path: Path, sp_model: bytes):  # noqa: F811
    """Tensor groups of 30 kB cut each layer's experts apart; the re-check hashes kept slots."""
    base = mixtral(tmp_path / "base", sp_model)
    target = perturbed(base, tmp_path / "target", seed=1)
    cli("make-delta", base, target, tmp_path / "delta")
    args = ["apply", base, tmp_path / "delta", "--format", "gguf", "--outtype", "q8_0",
            "--block-size", "3000"]
    (tmp_path / "ref").mkdir()
    reference = tmp_path / "ref" / "model"
    out = tmp_path / "model"
    with pytest.MonkeyPatch.context() as mp:  # the killed run's tensor groups (PRELUDE)
        mp.setattr(deltamerge.apply, "DEFAULT_SHARD_SIZE", GROUP)
        apply_delta(base, tmp_path / "delta", reference, format="gguf", outtype="q8_0")
        killed = run_cli(*args, out, "-q", env={"DELTAMERGE_KILL_AT": "shard:3"}, prelude=PRELUDE)
        assert killed.returncode == -9, killed.stderr
        resumed = run_in_process(*args, out, "--resume")
    assert_resumed_as(resumed, out, reference)


WIDE = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1, "num_local_experts": 8}


def test_q4_k_m_is_the_converters_file_requantized(tmp_path: Path, sp_model: bytes):  # noqa: F811
    """llama-quantize's file from the converter's: its key/values, order and MoE type mix (8
    experts: attn_v and attn_k Q8_0, attn_output Q5_K), and each slot's rows quantized from the
    converter's values (the first and last rows of every slot)."""
    base = mixtral(tmp_path / "base", sp_model, **WIDE)
    target = perturbed(base, tmp_path / "target", seed=1)
    cli("make-delta", base, target, tmp_path / "delta")
    (tmp_path / "hf").mkdir()
    (tmp_path / "q").mkdir()
    cli("apply", base, tmp_path / "delta", tmp_path / "hf" / "m")
    with Conversion(tmp_path / "hf" / "m", tmp_path / "c", "f16") as conversion:
        cli("apply", base, tmp_path / "delta", tmp_path / "q" / "m", "--format", "gguf",
            "--outtype", "q4_k_m", "--threads", "2")
        [name] = conversion.files()
    [ours] = (tmp_path / "q" / "m").glob("*.gguf")
    theirs = gguf.GGUFReader(tmp_path / "c" / name)
    reader = gguf.GGUFReader(ours)

    def fields(r: gguf.GGUFReader) -> list[tuple[str, object]]:
        return [(f.name, f.types, f.contents()) for f in r.fields.values() if not f.name.startswith("GGUF.")]

    moved = ("general.quantization_version", "general.file_type")
    expected = [f for f in fields(theirs) if f[0] not in moved]
    expected += [(moved[0], [gguf.GGUFValueType.UINT32], 2), (moved[1], [gguf.GGUFValueType.UINT32], 15)]
    assert fields(reader) == expected
    source = {t.name: t for t in theirs.tensors}
    assert [t.name for t in reader.tensors] == gguf_types.order(list(source))
    info = gguf_types.ModelInfo("llama", 1, 32, 8, 8)
    mix = gguf_types.quantized_types("q4_k_m", info, [(n, tuple(map(int, reversed(t.shape))))
                                                      for n, t in source.items()])
    assert QT(mix["blk.0.attn_v.weight"]) == QT(mix["blk.0.attn_k.weight"]) == QT.Q8_0
    assert QT(mix["blk.0.attn_output.weight"]) == QT.Q5_K
    assert QT(mix["blk.0.ffn_down_exps.weight"]) == QT.Q6_K  # use_more_bits: layer 0 of 1
    assert "blk.0.ffn_gate_inp.weight" not in mix
    for t in reader.tensors:
        was = source[t.name]
        if t.name not in mix:  # norms and the router: the converter's F32 bytes
            assert t.tensor_type == was.tensor_type == QT.F32 and bytes(t.data) == bytes(was.data), t.name
            continue
        assert t.tensor_type == mix[t.name], t.name
        x = torch.from_numpy(was.data.copy()).to(torch.float32)
        slots = x if x.dim() == 3 else x[None]
        data = t.data.reshape(*slots.shape[:2], -1)
        for e in range(slots.shape[0]):
            for rows in (slice(0, 4), slice(-4, None)):
                expected_rows = quantize_rows(slots[e, rows].contiguous(), QT(t.tensor_type))
                assert data[e, rows].tobytes() == expected_rows.numpy().tobytes(), (t.name, e)


def _without(folder: Path, out: Path, drop: str = "", change: dict[str, torch.Tensor] | None = None) -> Path:
    shutil.copytree(folder, out)
    state = load_file(out / "model.safetensors")
    state.pop(drop, None)
    state.update(change or {})
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_experts_the_converter_cannot_stack_are_refused(tmp_path: Path, sp_model: bytes):  # noqa: F811
    base = mixtral(tmp_path / "base", sp_model)
    state = load_state(base)
    missing = _without(base, tmp_path / "missing", drop=expert(1, 2, "w3"))
    with pytest.raises(FormatError, match=r"experts found\): llama.cpp's converter fails on it") as e:
        plan_gguf(missing, specs(load_state(missing)))
    assert "\n" not in str(e.value) and "model.layers.1.block_sparse_moe.experts" in str(e.value)

    extra = _without(base, tmp_path / "extra", change={expert(0, EXPERTS, "w1"): state[expert(0, 0, "w1")]})
    with pytest.raises(FormatError, match=rf"experts.{EXPERTS}.w1.weight is not an expert weight of a "
                                          rf"Mixtral of {EXPERTS} experts"):
        plan_gguf(extra, specs(load_state(extra)))

    other = _without(base, tmp_path / "other", change={expert(0, 1, "w2"): state[expert(0, 1, "w2")].float()})
    with pytest.raises(FormatError, match=r"experts.1.w2.weight is torch.float32 \[64, 128\], but "
                                          r".*experts.0.w2.weight, stacked with it, is torch.float16"):
        plan_gguf(other, specs(load_state(other)))
