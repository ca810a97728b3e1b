"""``apply --format gguf`` writes, byte for byte, what llama.cpp's pinned converter writes.

For each architecture a tiny model is built from transformers' own config class (random
weights), with a real tokenizer: the tiny sentencepiece model test_gguf trains for LLaMA, or one
of llama.cpp's vocab GGUFs rebuilt by transformers (``scripts/fetch_llamacpp.sh`` caches them).
A small additive delta is merged twice, to safetensors and to GGUF; the converter
(``convert_hf_to_gguf.py`` run in a subprocess, see ``llamacpp.py``) converts the safetensors
result, and its file must be ours.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from llamacpp import Conversion, llamacpp_dir

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf_models import (  # noqa: E402
    RECORD,
    assert_resumed_as,
    gguf_digests,
    perturbed,
    sp_vocab_size,
    specs,
    tiny_llama,
)
from helpers import GROUP, PRELUDE, load_state, run_cli, run_in_process  # noqa: E402

import deltamerge.apply  # noqa: E402
import deltamerge.formats.files  # noqa: E402
from deltamerge.cli import main  # noqa: E402
from deltamerge.engine.journal import JOURNAL_NAME  # noqa: E402
from deltamerge.errors import UnsupportedError  # noqa: E402
from deltamerge.sinks import gguf_types  # noqa: E402
from deltamerge.sinks.folder import partial_dir  # noqa: E402
from deltamerge.sinks.gguf import GGUFStreamWriter, plan_gguf  # noqa: E402
from deltamerge.sinks.gguf_quants import quantize_rows  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 256}


# Architectures whose configs name their sizes otherwise: the test gives them all.
OWN_SIZES = ("falcon", "bloom")


def cli(*args: object) -> None:
    result = CliRunner().invoke(main, [*map(str, args), "-q"])
    assert result.exit_code == 0, (result.stderr, result.exception)


def tokenizer_files(name: str) -> Path:
    folder = llamacpp_dir() / "tokenizers" / name
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: scripts/fetch_llamacpp.sh rebuilds it")
    return folder


def hf_model(folder: Path, model_type: str, tokenizer: str, dtype: torch.dtype = torch.float16,
             **config: object) -> Path:
    """A tiny model of transformers' own classes for ``model_type``, with a real tokenizer's files."""
    shutil.copytree(tokenizer_files(tokenizer), folder, ignore=shutil.ignore_patterns("done"))
    return tiny_model(folder, model_type, tokenizer_length(tokenizer), dtype, **config)


@functools.cache
def tokenizer_length(name: str) -> int:
    """The number of tokens of a cached tokenizer, read once a session (Qwen2's 151k take seconds)."""
    return len(transformers.AutoTokenizer.from_pretrained(tokenizer_files(name)))


def tiny_model(folder: Path, model_type: str, vocab: int, dtype: torch.dtype, **config: object) -> Path:
    sizes = {} if model_type in OWN_SIZES else TINY
    cfg = transformers.AutoConfig.for_model(model_type, **{**sizes, "vocab_size": vocab, **config})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # norms of ones (and zeros for Gemma's) would hide the +1 and a wrong order
        for t in model.parameters():
            if t.dim() == 1:
                t.add_(torch.randn(t.shape, dtype=torch.float32).to(dtype) * 0.1)
    model.save_pretrained(folder)
    return folder


def sentencepiece_model(folder: Path, model_type: str, sp: bytes, dtype: torch.dtype,
                        **config: object) -> Path:
    """A tiny model with test_gguf's sentencepiece tokenizer (Gemma's kind)."""
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sp)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    return tiny_model(folder, model_type, sp_vocab_size(sp), dtype, **config)


def merged_both_ways(tmp_path: Path, base: Path, outtype: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(our GGUF of the merged result, the converter's GGUF of the same result in safetensors)."""
    return gguf_both_ways(tmp_path, base, *merged_to_safetensors(tmp_path, base), outtype)


def merged_to_safetensors(root: Path, base: Path) -> tuple[Path, Path]:
    """(a delta of a fine-tune of ``base``, the result of applying it in safetensors)."""
    target = perturbed(base, root / "target", seed=1)
    (root / "hf").mkdir()
    cli("make-delta", base, target, root / "delta")
    cli("apply", base, root / "delta", root / "hf" / "tiny-merged")
    return root / "delta", root / "hf" / "tiny-merged"


def gguf_both_ways(tmp_path: Path, base: Path, delta: Path, merged: Path,
                   outtype: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(our GGUF of ``base`` + ``delta``, the converter's of ``merged``), the two made at once."""
    (tmp_path / "gguf").mkdir()
    with Conversion(merged, tmp_path / "converted", outtype) as conversion:
        cli("apply", base, delta, tmp_path / "gguf" / merged.name, "--format", "gguf", "--outtype", outtype)
        ours = {p.name: p.read_bytes() for p in sorted((tmp_path / "gguf" / merged.name).glob("*.gguf"))}
        return ours, conversion.files()


def assert_same_files(ours: dict[str, bytes], theirs: dict[str, bytes]) -> None:
    assert list(ours) == list(theirs)
    for name in ours:
        if ours[name] != theirs[name]:
            first = next(i for i, (x, y) in enumerate(zip(ours[name], theirs[name])) if x != y)
            pytest.fail(f"{name}: {len(ours[name])} bytes, the converter's {len(theirs[name])}; "
                        f"first difference at byte {first}")


def pre_tokenizer(folder: Path) -> str:
    [path] = folder.glob("*.gguf")
    return gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents()


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory, sp_model: bytes) -> tuple[Path, Path, Path]:
    """(base, delta, merged result in safetensors): made once, converted to each outtype."""
    root = tmp_path_factory.mktemp("sentencepiece-llama")
    base = tiny_llama(root / "base", sp_model, kv_heads=2)
    return base, *merged_to_safetensors(root, base)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_llama_with_sentencepiece(tmp_path: Path, sentencepiece_llama: tuple[Path, Path, Path], outtype: str):
    ours, theirs = gguf_both_ways(tmp_path, *sentencepiece_llama, outtype)
    assert_same_files(ours, theirs)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(("model_type", "tokenizer", "config", "pre"), [
    # Llama 3.x's layout (llama3 RoPE: rope_freqs) with a GPT-2 BPE, as SmolLM has: the Llama 3
    # vocabulary itself (128k tokens, ggml-vocab-llama-bpe) would cost the suite seconds per run.
    ("llama", "gpt-2", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}, "gpt-2"),
    # (transformers reads a GPT-2 BPE in a Qwen folder as Qwen's, which llama.cpp does not know)
    ("qwen2", "qwen2", {"tie_word_embeddings": True}, "qwen2"),
    ("qwen3", "qwen2", {"tie_word_embeddings": True, "head_dim": 32}, "qwen2"),
], ids=["llama3-bpe", "qwen2", "qwen3"])
def test_bpe_architectures(tmp_path: Path, model_type: str, tokenizer: str, config: dict, pre: str):
    base = hf_model(tmp_path / "base", model_type, tokenizer, **config)
    ours, theirs = merged_both_ways(tmp_path, base, "f16")
    assert pre_tokenizer(tmp_path / "converted") == pre
    assert_same_files(ours, theirs)


@pytest.mark.parametrize(("model_type", "dtype", "config"), [
    ("gemma", torch.bfloat16, {"head_dim": 16}),  # +1 on the norms after widening to f32
    ("gemma2", torch.float16, {"head_dim": 16}),  # +1 in f16, as the converter adds it
], ids=["gemma", "gemma2"])  # Gemma 3: test_gemma3_embedding_is_cut_to_the_tokenizers_vocabulary
def test_gemma(tmp_path: Path, sp_model: bytes, model_type: str, dtype: torch.dtype, config: dict):
    base = sentencepiece_model(tmp_path / "base", model_type, sp_model, dtype, **config)
    ours, theirs = merged_both_ways(tmp_path, base, "f16")
    assert_same_files(ours, theirs)


def test_gemma3_embedding_is_cut_to_the_tokenizers_vocabulary(tmp_path: Path):
    """With a tokenizer.json, Gemma 3's embedding keeps the tokenizer's rows only (as they stream)."""
    base = hf_model(tmp_path / "base", "gemma3_text", "gpt-2", head_dim=16, sliding_window=32,
                    vocab_size=50257 + 15)  # gpt-2's 50257 tokens, and rows beyond them
    ours, theirs = merged_both_ways(tmp_path, base, "f16")
    assert_same_files(ours, theirs)
    plan = plan_gguf(base, specs(load_state(base)), outtype="f16")
    embedding = plan.tensor("model.embed_tokens.weight")
    # the converter counts vocab plus added_tokens, so gpt-2's <|endoftext|> twice: 50258 rows kept
    assert embedding.shape[0] == 50258 and embedding.source_rows == 50257 + 15


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0 + i / 4 for i in range(8)],
            "short_factor": [1.0 + i / 8 for i in range(8)], "original_max_position_embeddings": 128}


def test_phi3_with_longrope(tmp_path: Path, sp_model: bytes):
    """qkv and gate_up stay fused; LongRoPE's factors are tensors written first."""
    base = sentencepiece_model(tmp_path / "base", "phi3", sp_model, torch.float16, pad_token_id=0,
                               original_max_position_embeddings=128, max_position_embeddings=512,
                               rope_parameters=LONGROPE)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "LlamaTokenizer"  # the converter reads it
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    ours, theirs = merged_both_ways(tmp_path, base, "f16")
    assert_same_files(ours, theirs)
    plan = plan_gguf(base, specs(load_state(base)), outtype="f16")
    assert [t.name for t in plan.generated] == ["rope_factors_long.weight", "rope_factors_short.weight"]
    assert plan.kv["phi3.rope.scaling.attn_factor"] > 1


@pytest.mark.parametrize(("model_type", "tokenizer", "config"), [
    # Falcon 40B's layout: kv groups of query heads, a key and a value in one fused tensor; with
    # Falcon's own tokenizer (TokenizersBackend: read by bpe_direct, without transformers).
    ("falcon", "falcon", {"hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2,
                          "num_hidden_layers": 2, "new_decoder_architecture": True, "bias": False}),
    ("bloom", "gpt-2", {"hidden_size": 64, "n_head": 4, "n_layer": 2}),
], ids=["falcon", "bloom"])
def test_fused_qkv_architectures(tmp_path: Path, model_type: str, tokenizer: str, config: dict):
    """Their fused qkv rows are regrouped across the tensor, which converts once whole."""
    base = hf_model(tmp_path / "base", model_type, tokenizer, **config)
    ours, theirs = merged_both_ways(tmp_path, base, "f16")
    assert_same_files(ours, theirs)


# Rows of 256 values (the k-quants apply); BLOOM's heads are 64 rows, Falcon's 32 (kv groups of
# 4 query heads, a key and a value).
FUSED = {
    "bloom": {"hidden_size": 256, "n_head": 4, "n_layer": 2},
    "falcon": {"hidden_size": 256, "num_attention_heads": 8, "num_kv_heads": 2, "num_hidden_layers": 2,
               "new_decoder_architecture": True, "bias": False},
}
FEW_HEADS = str(128 * 256 * 4)  # --block-size: blocks of 128 rows (their fp32 work buffer)


def fused_merge(root: Path, model_type: str) -> tuple[Path, Path]:
    """(base, delta) of a tiny model with a fused qkv."""
    base = hf_model(root / "base", model_type, "gpt-2", **FUSED[model_type])
    cli("make-delta", base, perturbed(base, root / "target", seed=1), root / "delta")
    return base, root / "delta"


def test_a_regrouped_qkv_in_blocks_is_given_back_in_file_order(tmp_path: Path):
    """Blocks of a run and a half (a head's q, k or v): the runs go to their places, those past
    bytes still to come written ahead and given back once those are, so what comes back is the
    tensor's bytes in the file's order; the file is the one the tensor written whole makes."""
    base = hf_model(tmp_path / "base", "bloom", "gpt-2", **FUSED["bloom"])
    state = load_state(base)
    plan = plan_gguf(base, specs(state), outtype="q8_0")
    [tensor] = [t for t in plan.tensors if t.name == "blk.0.attn_qkv.weight"]
    assert tensor.head_rows == 64 and len(tensor.row_order) == 768
    rows = state[tensor.hf_name]
    files = {}
    for step in (rows.shape[0], 96):
        out = tmp_path / str(step)
        out.mkdir()
        given, ahead = bytearray(), 0
        with GGUFStreamWriter(plan, out) as writer:
            for r0 in range(0, rows.shape[0], step):
                for block in writer.write_rows(tensor.hf_name, r0, r0 + step, rows[r0 : r0 + step]):
                    if block.ahead:
                        ahead += 1
                        continue
                    assert block.offset == tensor.offset + len(given)
                    given += b"".join(block.data)
            for name, t in state.items():
                if name != tensor.hf_name:
                    writer.write_rows(name, 0, t.shape[0], t)
        files[step] = (out / plan.files[0].name).read_bytes()
        assert bytes(given) == files[step][tensor.offset : tensor.offset + tensor.nbytes]
        assert (ahead > 0) == (step < rows.shape[0])
    assert files[96] == files[rows.shape[0]]


@pytest.mark.parametrize(("model_type", "outtype"), [("bloom", "f16"), ("falcon", "q4_k_m")])
def test_fused_qkv_in_blocks_of_a_few_heads(tmp_path: Path, model_type: str, outtype: str):
    """Small blocks write the file one block of the whole tensor writes, and the digests recorded
    are those of its bytes, hashed afresh in the file's order."""
    base, delta = fused_merge(tmp_path, model_type)
    files = {}
    for label, block in (("whole", []), ("blocks", ["--block-size", FEW_HEADS])):
        (tmp_path / label).mkdir()
        out = tmp_path / label / "model"
        cli("apply", base, delta, out, "--format", "gguf", "--outtype", outtype, *block)
        [path] = out.glob("*.gguf")
        files[label] = path.read_bytes()
        record = json.loads((out / RECORD).read_text())
        assert record["result"]["tensors"] == gguf_digests([path])
    assert files["blocks"] == files["whole"]


def test_a_killed_fused_qkv_run_resumes_keeping_what_it_journaled(tmp_path: Path):
    """The digests journaled of a regrouped qkv written in blocks are its file bytes': a resume
    re-checks them and keeps them."""
    base, delta = fused_merge(tmp_path, "bloom")
    args = ["apply", base, delta, "--format", "gguf", "--outtype", "f16", "--block-size", FEW_HEADS]
    (tmp_path / "ref").mkdir()
    reference, out = tmp_path / "ref" / "model", tmp_path / "model"
    with pytest.MonkeyPatch.context() as mp:  # the killed run's tensor groups (PRELUDE)
        mp.setattr(deltamerge.apply, "DEFAULT_SHARD_SIZE", GROUP)
        cli(*args[:3], reference, *args[3:])
        killed = run_cli(*map(str, args), str(out), "-q", env={"DELTAMERGE_KILL_AT": "shard:9"},
                         prelude=PRELUDE)
        assert killed.returncode == -9, killed.stderr
        assert "attn_qkv" in (partial_dir(out) / JOURNAL_NAME).read_text()
        resumed = run_in_process(*args, out, "--resume")
    assert_resumed_as(resumed, out, reference)


def test_llama3_rope_freqs_come_first(tmp_path: Path):
    base = hf_model(tmp_path / "base", "llama", "gpt-2", tie_word_embeddings=True,
                    rope_parameters=LLAMA3_ROPE)
    plan = plan_gguf(base, specs(load_state(base)), outtype="f16")
    [extra] = plan.generated
    assert extra.name == "rope_freqs.weight" and extra.offset < min(t.offset for t in plan.tensors)
    factors = torch.frombuffer(bytearray(extra.data), dtype=torch.float32)
    assert factors.shape == (TINY["hidden_size"] // TINY["num_attention_heads"] // 2,)
    assert factors[0] == 1 and factors[-1] == 8  # high frequencies kept, low ones scaled by the factor


def test_other_architectures_are_refused_naming_them_and_the_supported(tmp_path: Path, sp_model: bytes):
    base = tiny_llama(tmp_path / "base", sp_model, architectures=["GPTJForCausalLM"])
    with pytest.raises(UnsupportedError) as e:
        plan_gguf(base, specs(load_state(base)))
    message = str(e.value)
    assert "\n" not in message and "not GPTJForCausalLM" in message
    assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message and "Qwen3ForCausalLM" in message


WIDE = {"hidden_size": 256, "intermediate_size": 256}  # rows of 256 values: the k-quants apply


def test_q4_k_m_is_the_converters_file_requantized(tmp_path: Path, sp_model: bytes):
    """llama-quantize's file from the converter's: the same key/values (file type and quantization
    version moved last), its tensor order and type mix, the generated rope_freqs kept F32, and every
    quantized row ``gguf_quants``' quantization of the converter's value (sampled rows; the suite
    cannot run llama-quantize: scripts/gguf_vs_llamacpp.py --quantize compares whole files, and
    did for Qwen2, Gemma and Falcon's fused qkv too). Llama 3's layout with a small vocabulary."""
    base = sentencepiece_model(tmp_path / "base", "llama", sp_model, torch.float16, **WIDE,
                               tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    target = perturbed(base, tmp_path / "target", seed=1)
    cli("make-delta", base, target, tmp_path / "delta")
    (tmp_path / "hf").mkdir()
    (tmp_path / "q").mkdir()
    cli("apply", base, tmp_path / "delta", tmp_path / "hf" / "m")
    with Conversion(tmp_path / "hf" / "m", tmp_path / "c", "f16") as conversion:  # the model's own dtype
        cli("apply", base, tmp_path / "delta", tmp_path / "q" / "m", "--format", "gguf",
            "--outtype", "q4_k_m")
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
    kv = dict((f[0], f[2]) for f in expected)
    arch = kv["general.architecture"]
    info = gguf_types.ModelInfo(arch, kv[f"{arch}.block_count"], kv[f"{arch}.attention.head_count"],
                                kv.get(f"{arch}.attention.head_count_kv", kv[f"{arch}.attention.head_count"]))
    mix = gguf_types.quantized_types("q4_k_m", info, [(n, tuple(map(int, reversed(t.shape))))
                                                      for n, t in source.items()])
    qt = gguf.GGMLQuantizationType
    assert {qt.Q4_K, qt.Q6_K} <= set(map(qt, mix.values()))
    for t in reader.tensors:
        was = source[t.name]
        if t.name not in mix:  # norms, and the generated rope_freqs: the converter's bytes
            assert t.tensor_type == was.tensor_type == qt.F32 and bytes(t.data) == bytes(was.data), t.name
            continue
        assert t.tensor_type == mix[t.name], t.name
        x = torch.from_numpy(was.data.copy()).to(torch.float32)
        data = t.data.reshape(x.shape[0], -1)
        for rows in (slice(0, 8), slice(-8, None)):
            expected = quantize_rows(x[rows].contiguous(), qt(t.tensor_type))
            assert data[rows].tobytes() == expected.numpy().tobytes(), t.name
    assert source["rope_freqs.weight"].tensor_type == qt.F32


def test_a_gguf_run_parses_the_tokenizer_json_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The base's and the delta's checks and the GGUF plan share one parse of the equal
    tokenizer.json files (formats.files.json_parsed_once), dropped before the engine runs."""
    base = hf_model(tmp_path / "base", "falcon", "falcon", hidden_size=64, num_attention_heads=8,
                    num_kv_heads=2, num_hidden_layers=2, new_decoder_architecture=True, bias=False)
    cli("make-delta", base, perturbed(base, tmp_path / "target", seed=1), tmp_path / "delta")
    tokenizer = (base / "tokenizer.json").read_bytes()
    assert (tmp_path / "delta" / "tokenizer.json").read_bytes() == tokenizer
    parses = []
    real = json.loads

    def counting(s, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - json.loads's own
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("deltamerge") and len(s) > len(tokenizer) // 2:  # text or bytes
            parses.append(caller)
        return real(s, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    cli("apply", base, tmp_path / "delta", tmp_path / "out", "--format", "gguf", "--outtype", "f16")
    assert parses == ["deltamerge.formats.files"]
    assert deltamerge.formats.files._PARSED.get() is None


FALCON_7B_LAYOUT = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                    "multi_query": True, "new_decoder_architecture": False}


def test_a_falcon_the_converter_cannot_regroup_is_refused_before_any_work(tmp_path: Path):
    """Falcon-7B's layout (``multi_query``: one key and one value head) is read by transformers
    with ``num_kv_heads`` = ``num_attention_heads``, and the pinned converter's view of its qkv
    fails; the apply says so in one line (exit 2), leaving nothing at OUT, not a partial file."""
    base, delta, merged = falcon_merge(tmp_path, FALCON_7B_LAYOUT)
    with Conversion(merged, tmp_path / "converted", "f16") as conversion:
        with pytest.raises(AssertionError, match="is invalid for input of size"):
            conversion.files()
    out = tmp_path / "gguf" / "model"
    out.parent.mkdir()
    refused = run_cli("apply", str(base), str(delta), str(out), "--format", "gguf", "-q")
    assert refused.returncode == 2, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert "query_key_value" in line and "multi_query" in line and "num_kv_heads 4" in line
    assert list(out.parent.iterdir()) == []


def test_a_falcon_regrouping_that_moves_nothing_is_written_as_it_is(tmp_path: Path):
    """One kv group: the converter's regrouping keeps every row where it is, so the fused qkv is a
    tensor like any other (written from the rows, not run by run and read back); the file is the
    converter's."""
    config = {**FALCON_7B_LAYOUT, "new_decoder_architecture": True, "num_kv_heads": 1}
    base, delta, merged = falcon_merge(tmp_path, config)
    shape = tuple(load_state(base)["transformer.h.0.self_attention.query_key_value.weight"].shape)
    tensor = next(t for t in plan_gguf(base, specs(load_state(base))).tensors
                  if t.hf_name == "transformer.h.0.self_attention.query_key_value.weight")
    assert tensor.shape == shape and tensor.row_order == ()
    assert_same_files(*gguf_both_ways(tmp_path, base, delta, merged, "f16"))


def falcon_merge(root: Path, config: dict) -> tuple[Path, Path, Path]:
    """(base, delta, the hf result) of a tiny Falcon with Falcon's tokenizer."""
    base = hf_model(root / "base", "falcon", "falcon", **config)
    delta, merged = merged_to_safetensors(root, base)
    return base, delta, merged
