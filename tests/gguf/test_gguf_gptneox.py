"""GPT-NeoX (Pythia) as GGUF: the file llama.cpp's pinned converter writes under transformers 4.

The converter reads ``rotary_pct`` from ``AutoConfig(...).to_dict()``; transformers 5 moves it
into ``rope_parameters`` and the converter dies on a KeyError, while under transformers 4 it
converts Pythia's config.json (``rotary_pct`` at its top level) as users of that pin got it. So
the models here have a Pythia-style config.json, and the converter runs through
``llamacpp_rotary_pct.py``, which gives its hparams config.json's ``rotary_pct`` as transformers 4
did and changes nothing else. The rotary factor is 0.5, not GPTNeoXConfig's default 0.25, and
the rope dimension count is checked against the test's own arithmetic, so neither reading could
pass by falling back to the default. f16 is compared byte for byte; q4_k_m with the parts of
llama-quantize's file, as test_gguf_architectures does for LLaMA (the suite cannot run
llama-quantize: ``scripts/gguf_vs_llamacpp.py --quantize`` compares whole files, and found this
model's identical at every quantized outtype).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gguf_models import perturbed, specs
from helpers import TESTS, load_state
from llamacpp import Conversion, llamacpp_dir

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from deltamerge.cli import main  # noqa: E402
from deltamerge.errors import FormatError, UnsupportedError  # noqa: E402
from deltamerge.sinks import gguf_types  # noqa: E402
from deltamerge.sinks.gguf import plan_gguf  # noqa: E402
from deltamerge.sinks.gguf_quants import quantize_rows  # noqa: E402

QT = gguf.GGMLQuantizationType
SHIM = TESTS / "llamacpp_rotary_pct.py"
ROTARY_PCT = 0.5
ROPE_DIMS = "gptneox.rope.dimension_count"
HIDDEN, HEADS = 256, 4  # rows of 256 values: the k-quants apply


def cli(*args: object) -> None:
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert result.exit_code == 0, (result.stderr, result.exception)


def pythia(folder: Path, hidden: int, heads: int, layers: int, ffn: int) -> Path:
    """A tiny GPT-NeoX of transformers' own classes (random weights, norms not ones), with the
    GPT-2 tokenizer the suite caches and config.json written as Pythia's is: ``rotary_pct`` and
    ``rotary_emb_base`` at the top level, no ``rope_parameters`` (which transformers 5 saves)."""
    tokenizer = llamacpp_dir() / "tokenizers" / "gpt-2"
    if not tokenizer.is_dir():
        pytest.fail(f"{tokenizer} is missing: scripts/fetch_llamacpp.sh rebuilds it")
    shutil.copytree(tokenizer, folder, ignore=shutil.ignore_patterns("done"))
    vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
    cfg = transformers.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                                     num_hidden_layers=layers, intermediate_size=ffn,
                                     max_position_embeddings=256, rotary_pct=ROTARY_PCT)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float16)
    with torch.no_grad():
        for t in model.parameters():
            if t.dim() == 1:
                t.add_(torch.randn(t.shape, dtype=torch.float32).to(t.dtype) * 0.1)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert rope["partial_rotary_factor"] == ROTARY_PCT
    config |= {"rotary_pct": ROTARY_PCT, "rotary_emb_base": rope["rope_theta"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@dataclass(frozen=True)
class Merge:
    base: Path
    delta: Path
    ours: Path  # our f16 GGUF of base + delta
    theirs: Path  # the converter's f16 GGUF of the merged result in safetensors


@pytest.fixture(scope="module")
def merge(tmp_path_factory) -> Merge:
    """A delta merged to safetensors and to GGUF f16, and the merged safetensors converted at f16
    (once: the f16 test compares it, the q4_k_m test requantizes it). Rows of 256 values, so that
    the k-quants apply; one layer."""
    root = tmp_path_factory.mktemp("pythia")
    base = pythia(root / "base", hidden=HIDDEN, heads=HEADS, layers=1, ffn=256)
    target = perturbed(base, root / "target", seed=1)
    cli("make-delta", base, target, root / "delta")
    (root / "hf").mkdir()
    (root / "gguf").mkdir()
    merged = root / "hf" / "tiny-pythia"
    cli("apply", base, root / "delta", merged)
    assert json.loads((merged / "config.json").read_text())["rotary_pct"] == ROTARY_PCT
    with Conversion(merged, root / "converted", "f16", via=SHIM) as conversion:
        cli("apply", base, root / "delta", root / "gguf" / merged.name, "--format", "gguf",
            "--outtype", "f16")
        [theirs] = conversion.files()
    [ours] = (root / "gguf" / merged.name).glob("*.gguf")
    return Merge(base, root / "delta", ours, root / "converted" / theirs)


def test_f16_is_the_converters_file(merge: Merge):
    assert merge.ours.name == merge.theirs.name
    ours, theirs = merge.ours.read_bytes(), merge.theirs.read_bytes()
    if ours != theirs:
        first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        pytest.fail(f"{merge.ours.name}: {len(ours)} bytes, the converter's {len(theirs)}; "
                    f"first difference at byte {first}")
    # (its key/values are read in the q4_k_m test: reading the file's 50k tokens costs seconds)
    record = json.loads((merge.ours.parent / "deltamerge-result.json").read_text())
    assert record["gguf"]["file_type"] == "F16"


def test_q4_k_m_is_the_converters_file_requantized(tmp_path: Path, merge: Merge):
    """llama-quantize's file from the converter's f16: its key/values (file type and quantization
    version moved last; the rope dimension count config.json's rotary_pct gives), its tensor
    order and type mix (the fused attn_qkv among them), the norms and biases kept F32, and
    every quantized row ``gguf_quants``' quantization of the converter's value (sampled rows)."""
    cli("apply", merge.base, merge.delta, tmp_path / "tiny-pythia", "--format", "gguf", "--outtype", "q4_k_m")
    [ours] = (tmp_path / "tiny-pythia").glob("*.gguf")
    reader = gguf.GGUFReader(ours)
    theirs = gguf.GGUFReader(merge.theirs)

    def fields(r: gguf.GGUFReader) -> list[tuple[str, object]]:
        return [(f.name, f.types, f.contents()) for f in r.fields.values() if not f.name.startswith("GGUF.")]

    moved = ("general.quantization_version", "general.file_type")
    converted = fields(theirs)
    assert "general.file_type" not in {f[0] for f in converted}  # GPTNeoXModel writes none
    expected = [f for f in converted if f[0] not in moved]
    expected += [(moved[0], [gguf.GGUFValueType.UINT32], 2), (moved[1], [gguf.GGUFValueType.UINT32], 15)]
    assert fields(reader) == expected
    kv = {f[0]: f[2] for f in expected}
    assert kv[ROPE_DIMS] == int(ROTARY_PCT * HIDDEN // HEADS) == 32
    source = {t.name: t for t in theirs.tensors}
    assert [t.name for t in reader.tensors] == gguf_types.order(list(source))
    info = gguf_types.ModelInfo("gptneox", kv["gptneox.block_count"], kv["gptneox.attention.head_count"],
                                kv["gptneox.attention.head_count"])
    mix = gguf_types.quantized_types("q4_k_m", info, [(n, tuple(map(int, reversed(t.shape))))
                                                      for n, t in source.items()])
    # llama-quantize 0.3.36's types for this model (scripts/gguf_vs_llamacpp.py --quantize found
    # its whole file identical): it counts the fused attn_qkv as an attn_v, Q6_K in its one layer
    assert {n: QT(t).name for n, t in mix.items()} == {
        "output.weight": "Q6_K", "token_embd.weight": "Q4_K", "blk.0.attn_output.weight": "Q4_K",
        "blk.0.attn_qkv.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "blk.0.ffn_up.weight": "Q4_K"}
    for t in reader.tensors:
        was = source[t.name]
        if t.name not in mix:  # norms and biases: the converter's bytes
            assert t.tensor_type == was.tensor_type == QT.F32 and bytes(t.data) == bytes(was.data), t.name
            continue
        assert t.tensor_type == mix[t.name], t.name
        x = torch.from_numpy(was.data.copy()).to(torch.float32)
        data = t.data.reshape(x.shape[0], -1)
        for rows in (slice(0, 8), slice(-8, None)):
            expected_rows = quantize_rows(x[rows].contiguous(), QT(t.tensor_type))
            assert data[rows].tobytes() == expected_rows.numpy().tobytes(), t.name


def test_rotary_pct_and_what_transformers_5_saves_give_the_same_file(tmp_path: Path):
    """config.json's ``rotary_pct`` (Pythia's), or only ``rope_parameters``' factor (transformers
    5's save_pretrained): the same number, the same plan; GPTNeoXConfig's default 0.25 when
    neither is there."""
    base = pythia(tmp_path / "base", hidden=64, heads=4, layers=1, ffn=64)
    tensors = specs(load_state(base))
    hub = plan_gguf(base, tensors, outtype="f16")
    config = json.loads((base / "config.json").read_text())
    saved = {k: v for k, v in config.items() if k not in ("rotary_pct", "rotary_emb_base")}
    (base / "config.json").write_text(json.dumps(
        {**saved, "rope_parameters": {"rope_type": "default", "rope_theta": config["rotary_emb_base"],
                                      "partial_rotary_factor": ROTARY_PCT}}))
    assert plan_gguf(base, tensors, outtype="f16").files == hub.files
    assert hub.kv[ROPE_DIMS] == 8
    (base / "config.json").write_text(json.dumps(saved))
    assert plan_gguf(base, tensors, outtype="f16").kv[ROPE_DIMS] == int(0.25 * 16)


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"rotary_pct": 0.25, "rope_parameters": {"rope_theta": 10000, "partial_rotary_factor": 0.5}},
     UnsupportedError, "'rotary_pct' 0.25 and rope_parameters' 'partial_rotary_factor' 0.5 disagree"),
    ({"rotary_pct": "quarter"}, FormatError, "'rotary_pct' must be a positive number"),
    ({"rope_parameters": {"partial_rotary_factor": -1}}, FormatError,
     "'partial_rotary_factor' must be a positive number"),
], ids=["two-factors", "not-a-number", "negative-factor"])
def test_a_rotary_factor_in_doubt_is_refused_in_one_line(tmp_path: Path, fields: dict, error: type,
                                                         message: str):
    base = pythia(tmp_path / "base", hidden=64, heads=4, layers=1, ffn=64)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(error, match=message) as e:
        plan_gguf(base, specs(load_state(base)), outtype="f16")
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
