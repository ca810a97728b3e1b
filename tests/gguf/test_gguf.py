"""GGUF output: what llama.cpp's convert_hf_to_gguf.py writes, planned first and written by blocks.

The byte-for-byte comparison with the converter itself needs llama.cpp's script, which the tests
do not depend on (``scripts/gguf_vs_llamacpp.py`` runs it); here the file is checked through
what reads GGUF: transformers, ``gguf.GGUFReader`` and ``gguf.quants``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from gguf_models import CHAT_TEMPLATE, GGUF_NAMES, HEAD_DIM, permuted, sp_vocab_size, specs, tiny_llama
from helpers import HEADS, HIDDEN, LAYERS, load_state, save_checkpoint

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")
spm = pytest.importorskip("sentencepiece")

from deltamerge.errors import UnsupportedError, WorkError  # noqa: E402
from deltamerge.sinks import gguf_kv  # noqa: E402
from deltamerge.sinks.gguf import GGUFStreamWriter, plan_gguf  # noqa: E402

QT = gguf.GGMLQuantizationType
# The GGUF names llama.cpp gives LLaMA's tensors.


def write_gguf(folder: Path, out: Path, outtype: str | None = None, seed: int | None = None, **kw):
    """Plan, then stream every tensor: whole and in file order, or (``seed``) shuffled, in random blocks."""
    state = load_state(folder)
    plan = plan_gguf(folder, specs(state), outtype=outtype, **kw)
    out.mkdir(parents=True, exist_ok=True)
    names = list(state)
    rnd = random.Random(seed)
    if seed is not None:
        rnd.shuffle(names)
    with GGUFStreamWriter(plan, out) as writer:
        for name in names:
            t = state[name]
            r = 0
            while r < t.shape[0]:
                r1 = t.shape[0] if seed is None else min(t.shape[0], r + rnd.randint(1, 2 * HEAD_DIM))
                writer.write_rows(name, r, r1, t[r:r1])
                r = r1
    return plan


@pytest.mark.parametrize(("dtype", "kv_heads", "outtype"), [
    (torch.float32, HEADS, "f32"), (torch.float16, 2, "f16"), (torch.bfloat16, HEADS, "bf16")])
def test_transformers_loads_the_gguf_and_its_logits_equal_the_hf_results(
    tmp_path: Path, sp_model: bytes, dtype: torch.dtype, kv_heads: int, outtype: str
):
    """transformers dequantizes GGUF into float32, so the reference is the result read as float32."""
    from transformers import AutoModelForCausalLM

    hf = tiny_llama(tmp_path / "hf", sp_model, dtype, kv_heads)
    plan = write_gguf(hf, tmp_path / "gguf", seed=0)
    assert plan.outtype == outtype  # the default: the result's dtype
    [file] = plan.files
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=file.name)
    reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.config.num_key_value_heads == kv_heads
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 17, 42, 99, 5, 250, 3]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


def test_q8_0_tensors_are_gguf_quants_of_the_permuted_hf_tensors(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model, torch.bfloat16, kv_heads=2)
    plan = write_gguf(hf, tmp_path / "gguf", "q8_0", seed=1)
    reader = gguf.GGUFReader(tmp_path / "gguf" / plan.files[0].name)
    by_name = {t.name: t for t in reader.tensors}
    state = load_state(hf)
    assert sorted(by_name) == sorted(GGUF_NAMES[n] for n in state)
    for hf_name, t in state.items():
        x = t.float()
        if hf_name.endswith("q_proj.weight"):
            x = permuted(x, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            x = permuted(x, 2)
        got = by_name[GGUF_NAMES[hf_name]]
        if t.dim() == 1:  # norms stay f32 under q8_0
            assert got.tensor_type == QT.F32
            assert torch.equal(torch.from_numpy(got.data.copy()), x), hf_name
        elif t.shape[1] % 32:  # a row q8_0 cannot cut into blocks of 32: f16, as the converter falls back
            assert hf_name.endswith("down_proj.weight") and got.tensor_type == QT.F16
            assert torch.equal(torch.from_numpy(got.data.copy()), x.half()), hf_name
        else:
            assert got.tensor_type == QT.Q8_0, hf_name
            expected = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), QT.Q8_0), QT.Q8_0)
            actual = gguf.quants.dequantize(got.data, QT.Q8_0)
            assert torch.equal(torch.from_numpy(actual), torch.from_numpy(expected)), hf_name
            assert np.array_equal(got.data, gguf.quants.quantize(x.numpy(), QT.Q8_0)), hf_name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("outtype", ["bf16", "f16"])
def test_nans_infs_and_subnormals_convert_as_gguf_quants_does(
    tmp_path: Path, sp_model: bytes, dtype: torch.dtype, outtype: str
):
    hf = tiny_llama(tmp_path / "hf", sp_model, dtype)
    state = load_state(hf)
    q = "model.layers.0.self_attn.q_proj.weight"
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -3e-39, 6e-8, 65520.0, -0.0])
    t = state[q].view(-1)
    t[: len(special)] = special.to(dtype)
    if dtype != torch.float32:
        t.view(bits)[len(special)] = 0x7F81 if dtype == torch.bfloat16 else 0x7C01  # a signaling NaN
    save_checkpoint(state, hf, config=json.loads((hf / "config.json").read_text()), tokenizer=False)
    plan = write_gguf(hf, tmp_path / "gguf", outtype, seed=4)
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "gguf" / plan.files[0].name).tensors}
    qtype = QT.BF16 if outtype == "bf16" else QT.F16
    for name in (q, "model.layers.0.self_attn.v_proj.weight"):
        x = state[name] if dtype != torch.bfloat16 else state[name].float()
        x = permuted(x, HEADS) if name == q else x
        with np.errstate(over="ignore"):
            expected = gguf.quants.quantize(x.numpy(), qtype)
        assert np.array_equal(got[GGUF_NAMES[name]].data.view(np.uint8), expected.view(np.uint8)), name


def test_reader_reads_every_key_the_converter_writes(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "Llama-2-7b-chat-hf", sp_model, torch.float16, kv_heads=2)
    (hf / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    (hf / "README.md").write_text("---\nlicense: llama2\nlanguage:\n- en\ntags:\n- llama-2\n---\n# Llama 2\n")
    plan = write_gguf(hf, tmp_path / "gguf", "q8_0")
    assert [f.name for f in plan.files] == ["Llama-2-129K-7b-chat-hf-Q8_0.gguf"]  # the converter's name
    fields = gguf.GGUFReader(tmp_path / "gguf" / plan.files[0].name).fields
    vocab = sp_vocab_size(sp_model)
    expected = {
        "general.architecture": "llama", "general.type": "model",
        "general.sampling.top_p": pytest.approx(0.9), "general.sampling.temp": pytest.approx(0.6),
        "general.name": "Llama 2 7b Chat Hf", "general.finetune": "7b-chat-hf", "general.basename": "Llama-2",
        "general.size_label": "129K", "general.license": "llama2", "general.tags": ["llama-2"],
        "general.languages": ["en"],
        "llama.block_count": LAYERS, "llama.context_length": 128, "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": 172, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        "llama.attention.key_length": HEAD_DIM, "llama.attention.value_length": HEAD_DIM,
        "general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0, "llama.vocab_size": vocab,
        "llama.rope.dimension_count": HEAD_DIM, "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": None, "tokenizer.ggml.scores": None, "tokenizer.ggml.token_type": None,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    keys = [k for k in fields if not k.startswith("GGUF.")]
    assert keys == list(expected) == list(plan.kv)  # the converter's order, which the bytes depend on
    for key, value in expected.items():
        if value is not None:
            assert fields[key].contents() == value, key
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(sp_model)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [sp.IdToPiece(i) for i in range(vocab)]
    # added_tokens_decoder's entries (here <unk>, <s>, </s>, all special) become control tokens at -1000
    scores = fields["tokenizer.ggml.scores"].contents()
    assert scores == [-1000.0] * 3 + [pytest.approx(sp.GetScore(i)) for i in range(3, vocab)]
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3
    assert types[3:3 + 256] == [gguf.TokenType.BYTE] * 256 and set(types[259:]) == {gguf.TokenType.NORMAL}


def test_added_tokens_and_padding_follow_the_converter(tmp_path: Path, sp_model: bytes):
    """Alpaca's ``[PAD]`` from added_tokens.json, and a config vocab larger than the tokenizer's."""
    vocab = sp_vocab_size(sp_model)
    hf = tiny_llama(tmp_path / "hf", sp_model)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "vocab_size": vocab + 3}))
    (hf / "added_tokens.json").write_text(json.dumps({"[PAD]": vocab}))
    plan = plan_gguf(hf, [("model.embed_tokens.weight", torch.float16, (vocab + 3, HIDDEN))], outtype="f16")
    tokens, scores, types = (plan.kv[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert tokens[vocab:] == [b"[PAD]", f"[PAD{vocab + 1}]".encode(), f"[PAD{vocab + 2}]".encode()]
    assert scores[vocab:] == [-1000.0, -10000.0, -10000.0]
    assert types[vocab:] == [gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED, gguf.TokenType.UNUSED]


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_blocks_in_any_order_write_the_bytes_whole_tensors_do(tmp_path: Path, sp_model: bytes, outtype: str):
    hf = tiny_llama(tmp_path / "hf", sp_model, torch.float32, kv_heads=2)
    whole = write_gguf(hf, tmp_path / "whole", outtype)
    write_gguf(hf, tmp_path / "blocks", outtype, seed=2)
    [name] = [f.name for f in whole.files]
    assert (tmp_path / "blocks" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert [t.name for t in whole.tensors] == [GGUF_NAMES[n] for n in sorted(GGUF_NAMES)]


def test_tensor_order_is_the_converters_whatever_order_the_plan_lists(tmp_path: Path, sp_model: bytes):
    """It reads the weight files in name order, each one's tensors sorted by name."""
    hf = tiny_llama(tmp_path / "hf", sp_model)
    listed = specs(load_state(hf))[::-1]
    names = [name for name, _, _ in listed]
    files = [names[: len(names) // 2], names[len(names) // 2:]]  # model-00001-of-00002 holds the first
    plan = plan_gguf(hf, listed, hf_files=files)
    assert [t.hf_name for t in plan.tensors] == sorted(files[0]) + sorted(files[1])
    offsets = [t.offset for t in plan.tensors]
    assert offsets == sorted(offsets) and all(o % 32 == 0 for o in offsets)


def test_written_blocks_are_the_file_bytes_and_heads_wait_whole(tmp_path: Path, sp_model: bytes):
    """What write_rows returns is what lands in the file (for hashing); q/k rows wait for a whole head."""
    hf = tiny_llama(tmp_path / "hf", sp_model)
    state = load_state(hf)
    plan = plan_gguf(hf, specs(state), outtype="q8_0")
    q = "model.layers.0.self_attn.q_proj.weight"
    out = tmp_path / "gguf"
    out.mkdir()
    with GGUFStreamWriter(plan, out) as writer:
        got = bytearray()
        assert writer.write_rows(q, 0, 5, state[q][:5]) == ()  # mid-head: held
        for r0, r1 in ((5, 24), (24, HIDDEN)):
            [block] = writer.write_rows(q, r0, r1, state[q][r0:r1])
            assert block.offset == plan.tensor(q).offset + len(got)
            got += b"".join(block.data)
        for name, t in state.items():
            if name != q:
                writer.write_rows(name, 0, t.shape[0], t)
    tensor = plan.tensor(q)
    data = (out / plan.files[0].name).read_bytes()
    assert bytes(got) == data[tensor.offset: tensor.offset + tensor.nbytes]
    assert len(data) == plan.files[0].size


def test_resume_rewrites_only_what_is_missing(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model)
    fresh = write_gguf(hf, tmp_path / "fresh", "f16")
    state = load_state(hf)
    plan = plan_gguf(hf, specs(state), outtype="f16")
    out = tmp_path / "resumed"
    out.mkdir()
    names = list(state)
    writer = GGUFStreamWriter(plan, out)
    for name in names[:5]:
        writer.write_rows(name, 0, state[name].shape[0], state[name])
    writer.abort()  # killed here
    with GGUFStreamWriter(plan, out, done=names[:5]) as writer:
        for name in names[5:]:
            writer.write_rows(name, 0, state[name].shape[0], state[name])
    [file] = fresh.files
    assert (out / file.name).read_bytes() == (tmp_path / "fresh" / file.name).read_bytes()
    other = plan_gguf(hf, specs(state), outtype="f16", filename=file.name, dir_name="another-name")
    with pytest.raises(WorkError, match="not the planned GGUF file"):
        GGUFStreamWriter(other, out, done=names[:1])
    (out / file.name).unlink()
    with pytest.raises(WorkError, match="missing, cannot resume"):
        GGUFStreamWriter(plan, out, done=names[:1])
    GGUFStreamWriter(other, out, done=[]).abort()  # no tensor kept in it: the file is made again
    assert (out / file.name).read_bytes()[: len(other.files[0].header)] == other.files[0].header


def test_rows_out_of_order_or_of_another_dtype_are_refused(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model)
    state = load_state(hf)
    name = "model.layers.0.mlp.up_proj.weight"
    writer = GGUFStreamWriter(plan_gguf(hf, specs(state)), tmp_path)
    with pytest.raises(ValueError, match="rows from 0 expected"):
        writer.write_rows(name, 4, 8, state[name][4:8])
    with pytest.raises(ValueError, match="given as torch.float32"):
        writer.write_rows(name, 0, 4, state[name][:4].float())
    writer.abort()


def test_a_tensor_not_written_is_an_error_at_close(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model)
    state = load_state(hf)
    plan = plan_gguf(hf, specs(state), outtype="f16")
    writer = GGUFStreamWriter(plan, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    writer.write_rows(name, 0, 3, state[name][:3])
    with pytest.raises(WorkError, match="was not wholly written") as e:
        writer.close()
    assert "\n" not in str(e.value)


def test_split_files_are_named_and_keyed_as_llama_cpp_splits(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model)
    whole = write_gguf(hf, tmp_path / "whole", "f16", filename="model.gguf")
    split = write_gguf(hf, tmp_path / "split", "f16", filename="model.gguf", split_max_size=40_000, seed=3)
    n = len(split.files)
    assert n > 2
    assert [f.name for f in split.files] == [f"model-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    names, arrays = [], {}
    for i, f in enumerate(split.files):
        reader = gguf.GGUFReader(tmp_path / "split" / f.name)
        assert reader.fields["split.no"].contents() == i
        assert reader.fields["split.count"].contents() == n
        assert reader.fields["split.tensors.count"].contents() == len(whole.tensors)
        assert ("tokenizer.ggml.tokens" in reader.fields) == (i == 0)  # the metadata is in the first
        names += [t.name for t in reader.tensors]
        arrays.update({t.name: t.data for t in reader.tensors})
    assert names == [t.name for t in whole.tensors]
    for t in gguf.GGUFReader(tmp_path / "whole" / "model.gguf").tensors:
        assert np.array_equal(arrays[t.name], t.data), t.name


def test_transformers_buffers_are_dropped_as_the_converter_drops_them(tmp_path: Path, sp_model: bytes):
    hf = tiny_llama(tmp_path / "hf", sp_model)
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    plan = plan_gguf(hf, [*specs(load_state(hf)), (inv_freq, torch.float32, (HEAD_DIM // 2,))])
    assert plan.dropped == (inv_freq,) and plan.tensor(inv_freq) is None
    assert len(plan.tensors) == len(GGUF_NAMES)


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "supports LlamaForCausalLM, .*; not GPT2LMHeadModel"),
    ({"num_local_experts": 8}, "a LlamaForCausalLM with 'num_local_experts' is not supported"),
])
def test_unsupported_models_are_refused_in_one_line(
    tmp_path: Path, sp_model: bytes, change: dict, message: str
):
    hf = tiny_llama(tmp_path / "hf", sp_model, **change)
    with pytest.raises(UnsupportedError, match=message) as e:
        plan_gguf(hf, specs(load_state(hf)))
    assert "\n" not in str(e.value) and str(hf) in str(e.value)


def test_without_the_gguf_package_the_error_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setattr(gguf_kv, "gguf", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'deltamerge\[gguf\]'"):
        plan_gguf(tmp_path, [])


@pytest.mark.parametrize("config", [
    # LLaMA 1 / Vicuna v1.1 (transformers 4.28): no num_key_value_heads, no rope_theta.
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
     "intermediate_size": 172, "num_attention_heads": 4, "num_hidden_layers": 2,
     "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "vocab_size": 300},
    # LLaMA 2 with linear RoPE scaling, as 4.3x saved it.
    {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
     "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "rope_theta": 10000.0,
     "rope_scaling": {"type": "linear", "factor": 2.0}, "rms_norm_eps": 1e-5},
    # Mistral v0.2: rope_theta 1e6, most fields left to the defaults.
    {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
     "num_attention_heads": 4, "num_hidden_layers": 2, "rope_theta": 1000000.0, "sliding_window": None},
])
def test_config_defaults_are_autoconfigs(tmp_path: Path, config: dict):
    """The converter reads config.json through transformers' AutoConfig; so does the plan, without it."""
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(config))
    auto = AutoConfig.from_pretrained(tmp_path).to_dict()

    def keys(h: dict) -> dict:
        writer = gguf.GGUFWriter(None, "llama")
        gguf_kv.add_parameters(writer, h, gguf.LlamaFileType.MOSTLY_F16, tmp_path)
        return {k: (v.value, v.type) for k, v in writer.kv_data[0].items()}

    assert keys(gguf_kv.hparams(config)) == keys(auto)
