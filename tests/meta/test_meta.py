"""Reading Meta's original LLaMA layout as the Hugging Face model transformers' conversion makes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from meta_helpers import hf_to_meta, meta_to_hf, train_tokenizer

from deltamerge.errors import FormatError, UnsupportedError, VerificationError
from deltamerge.sources.folders import detect_layout
from deltamerge.sources.meta import MetaCheckpoint, file_md5, hf_config

VOCAB = 96


def params_for(kv_heads: int) -> dict:
    """params.json of the tiny model: multiple_of 4 gives transformers' 172-wide FFN for dim 64."""
    params = {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-5, "multiple_of": 4}
    if kv_heads != 4:
        params["n_kv_heads"] = kv_heads
    return params | {"vocab_size": -1}


def tiny_model(kv_heads: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def states() -> dict[int, dict[str, torch.Tensor]]:
    """bf16 state dicts (LLaMA 2's stored dtype) of a multi-head and a grouped-query model."""
    return {kv: tiny_model(kv).to(torch.bfloat16).state_dict() for kv in (4, 2)}


def make_meta(state: dict, kv_heads: int, shards: int, folder: Path) -> Path:
    hf_to_meta(state, params_for(kv_heads), shards, folder)
    return folder


def open_meta(folder: Path, **kwargs: bool) -> MetaCheckpoint:
    return MetaCheckpoint(detect_layout(folder), **kwargs)


def read_all(checkpoint: MetaCheckpoint, rows: int = 3) -> dict[str, torch.Tensor]:
    """Every tensor read ``rows`` at a time through one reused buffer, as the engine reads."""
    buffer = torch.empty(1 << 16, dtype=torch.uint8)
    result = {}
    for name, spec in checkpoint.specs.items():
        blocks = [
            checkpoint.read_rows(name, start, min(start + rows, spec.rows), buffer).clone()
            for start in range(0, spec.rows, rows)
        ]
        result[name] = torch.cat(blocks)
    return result


@pytest.mark.parametrize(
    ("kv_heads", "shards"), [(4, 1), (4, 2), (4, 4), (2, 1), (2, 2)], ids=lambda v: str(v)
)
def test_streamed_tensors_equal_original(states, tmp_path, kv_heads, shards):
    state = states[kv_heads]
    folder = make_meta(state, kv_heads, shards, tmp_path)
    with open_meta(folder) as checkpoint:
        assert list(checkpoint.specs) == list(state)  # HF order, rope.freqs dropped
        for name, spec in checkpoint.specs.items():
            assert (spec.dtype, spec.shape) == (state[name].dtype, tuple(state[name].shape))
        got = read_all(checkpoint)
    reference = meta_to_hf(folder)  # the script's whole-tensor way
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name
        assert torch.equal(reference[name], tensor), name


def test_block_size_does_not_matter(states, tmp_path):
    folder = make_meta(states[2], 2, 2, tmp_path)
    with open_meta(folder) as checkpoint:
        whole = read_all(checkpoint, rows=1 << 20)
        for rows in (1, 5, 17):
            for name, tensor in read_all(checkpoint, rows=rows).items():
                assert torch.equal(tensor, whole[name]), (rows, name)


def test_more_shards_than_kv_heads_is_unsupported(states, tmp_path):
    folder = make_meta(states[4], 4, 4, tmp_path)
    params = params_for(2)
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(UnsupportedError, match="shards"):
        open_meta(folder, verify_checklist=False)


def test_checklist_mismatch_names_file_and_both_md5s(states, tmp_path):
    folder = make_meta(states[4], 4, 2, tmp_path)
    shard = folder / "consolidated.01.pth"
    expected = file_md5(shard)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(VerificationError) as err:
        open_meta(folder)
    message = str(err.value)
    assert "consolidated.01.pth" in message
    assert expected in message and file_md5(shard) in message


def test_checklist_skipped_on_request(states, tmp_path):
    folder = make_meta(states[4], 4, 1, tmp_path)
    with open(folder / "params.json", "a") as f:
        f.write("\n")
    with pytest.raises(VerificationError, match="params.json"):
        open_meta(folder)
    open_meta(folder, verify_checklist=False).close()


def test_shard_missing_from_checklist_is_refused(states, tmp_path):
    folder = make_meta(states[4], 4, 2, tmp_path)
    lines = (folder / "checklist.chk").read_text().splitlines(keepends=True)
    (folder / "checklist.chk").write_text("".join(line for line in lines if ".01." not in line))
    with pytest.raises(VerificationError, match="consolidated.01.pth"):
        open_meta(folder)


@pytest.mark.parametrize("checklist", [True, False])
@pytest.mark.parametrize("missing", ["01", "03"])
def test_missing_shard_is_named(states, tmp_path, missing, checklist):
    folder = make_meta(states[4], 4, 4, tmp_path)
    (folder / f"consolidated.{missing}.pth").unlink()
    if not checklist:
        (folder / "checklist.chk").unlink()
    with pytest.raises(FormatError, match=rf"consolidated\.{missing}\.pth"):
        open_meta(folder)


@pytest.mark.parametrize(
    ("key", "value"),
    [("dim", "64"), ("n_heads", 4.0), ("norm_eps", "1e-5"), ("n_kv_heads", True), ("dim", None)],
)
def test_params_of_wrong_type_are_refused(states, tmp_path, key, value):
    folder = make_meta(states[4], 4, 1, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params | {key: value}))
    with pytest.raises(FormatError, match=rf"params\.json.*{key}"):
        open_meta(folder, verify_checklist=False)


def test_params_contradicting_weights_are_refused(states, tmp_path):
    folder = make_meta(states[4], 4, 1, tmp_path)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params | {"multiple_of": 256}))
    with pytest.raises(FormatError, match="feed_forward.w1"):
        open_meta(folder, verify_checklist=False)


def test_llama3_is_unsupported():
    params = {"dim": 4096, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-5, "vocab_size": 128256}
    with pytest.raises(UnsupportedError, match="Llama 3"):
        hf_config(params, 128256, torch.bfloat16)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_config_rebuilds_the_model(tmp_path, kv_heads):
    model = tiny_model(kv_heads, seed=1)
    folder = make_meta(model.state_dict(), kv_heads, 2, tmp_path)
    with open_meta(folder) as checkpoint:
        weights = read_all(checkpoint, rows=7)
        config = json.loads(checkpoint.aux_files()["config.json"])
    assert config == hf_config(params_for(kv_heads), VOCAB, torch.float32)
    assert config["intermediate_size"] == 172 and config["num_key_value_heads"] == kv_heads
    assert config["torch_dtype"] == "float32" and config["max_position_embeddings"] == 4096
    rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    rebuilt.load_state_dict(weights, strict=True)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


# Meta's own params.json files, and the values of the Hugging Face conversions of them.
KNOWN = [
    ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06}, 11008, 2048),
    ({"dim": 6656, "multiple_of": 256, "n_heads": 52, "n_layers": 60, "norm_eps": 1e-06}, 17920, 2048),
    ({"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05}, 22016, 4096),
    ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05}, 13824, 4096),
    (
        {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
         "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05},
        28672,
        4096,
    ),
    (
        {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256,
         "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000},
        11008,
        16384,
    ),
]  # fmt: skip


@pytest.mark.parametrize(("params", "ffn", "context"), KNOWN)
def test_config_values_of_released_models(params, ffn, context):
    config = hf_config(params | {"vocab_size": -1}, 32000, torch.float16)
    assert config["intermediate_size"] == ffn
    assert config["max_position_embeddings"] == context
    assert config["num_key_value_heads"] == params.get("n_kv_heads", params["n_heads"])
    assert config["rope_theta"] == float(params.get("rope_theta", 10000.0))
    assert config["rms_norm_eps"] == params["norm_eps"]
    transformers.LlamaConfig(**config)


def meta_download(states: dict, root: Path) -> Path:
    """Meta's downloads: the tokenizer and its checklist beside the size folders."""
    train_tokenizer(root / "tokenizer.model")
    tokenizer_md5 = file_md5(root / "tokenizer.model")
    (root / "tokenizer_checklist.chk").write_text(f"{tokenizer_md5}  tokenizer.model\n")
    return make_meta(states[4], 4, 1, root / "7B")


def write_aux(checkpoint: MetaCheckpoint, out: Path) -> Path:
    out.mkdir()
    for name, value in checkpoint.aux_files().items():
        if isinstance(value, Path):
            shutil.copyfile(value, out / name)
        else:
            (out / name).write_bytes(value)
    return out


def test_aux_files_of_a_meta_download(states, tmp_path):
    folder = meta_download(states, tmp_path)
    with open_meta(folder) as checkpoint:
        aux = checkpoint.aux_files()
        out = write_aux(checkpoint, tmp_path / "out")
    assert set(aux) == {
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert aux["tokenizer.model"] == tmp_path / "tokenizer.model"
    settings = json.loads(aux["tokenizer_config.json"])
    assert settings["tokenizer_class"] == "LlamaTokenizer" and settings["add_bos_token"]
    special = json.loads(aux["special_tokens_map.json"])
    assert [special[k]["content"] for k in ("bos_token", "eos_token", "unk_token")] == [
        "<s>",
        "</s>",
        "<unk>",
    ]
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)

    (tmp_path / "tokenizer_checklist.chk").write_text(f"{'0' * 32}  tokenizer.model\n")
    with pytest.raises(VerificationError, match="tokenizer.model"):
        open_meta(folder)


def test_tokenizer_loads_in_transformers(states, tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with it")
    with open_meta(meta_download(states, tmp_path)) as checkpoint:
        out = write_aux(checkpoint, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("alpha beta")["input_ids"]
    assert ids[0] == 1 and tokenizer.decode(ids, skip_special_tokens=True) == "alpha beta"


def test_no_tokenizer_means_no_tokenizer_settings(states, tmp_path):
    folder = make_meta(states[4], 4, 1, tmp_path / "model")
    with open_meta(folder) as checkpoint:
        assert set(checkpoint.aux_files()) == {"config.json", "generation_config.json"}
