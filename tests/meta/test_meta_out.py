"""Meta's layout written from HF tensors (sinks/meta_pth.py), through the streaming .pth writer."""

from __future__ import annotations

import json
import random
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import transformers
from helpers import assert_states_equal, load_state
from meta_helpers import MODELS, VOCAB, hf_shapes, hf_state, hf_to_meta

from deltamerge.conversion import convert
from deltamerge.errors import FormatError, UnsupportedError, WorkError
from deltamerge.integrity.digest import raw_bytes
from deltamerge.sinks import torch_zip
from deltamerge.sinks.meta_pth import MetaLayout, MetaWriter, meta_params
from deltamerge.sinks.torch_pickle import STORAGE_TYPES, PthTensor
from deltamerge.sinks.torch_zip import TorchZipWriter
from deltamerge.sinks.torch_zip_sums import crc32_combine
from deltamerge.sources.folders import detect_layout
from deltamerge.sources.meta import MetaCheckpoint, hf_config

# ---------------------------------------------------------------------------------------------
# The .pth writer


def specs_of(state: dict[str, torch.Tensor]) -> list[PthTensor]:
    return [PthTensor(name, t.dtype, tuple(t.shape)) for name, t in state.items()]


def write_streamed(path: Path, state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Each tensor cut at random points, the pieces of all tensors written in a random order."""
    rng = random.Random(seed)
    pieces = []
    for name, tensor in state.items():
        data = raw_bytes(tensor.contiguous())
        cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1))) if len(data) > 1 else []
        edges = [0, *cuts, len(data)]
        pieces += [(name, a, data[a:b]) for a, b in zip(edges, edges[1:]) if b > a]
    rng.shuffle(pieces)
    writer = TorchZipWriter(path, specs_of(state))
    for name, offset, data in pieces:
        writer.write(name, offset, data)
    writer.close()
    assert path.stat().st_size == writer.size


def mixed_state(count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(count)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int8]
    state = {
        f"layers.{i}.weight": (torch.randn(i % 5, 1 + i % 3, generator=g) * 100).to(dtypes[i % len(dtypes)])
        for i in range(count)
    }
    # torch.save pickles a tensor's strides, and arithmetic on an empty tensor leaves other
    # strides than a fresh tensor's for its dims of size 0 or 1: the writer pickles a fresh one's
    state = {name: torch.empty(t.shape, dtype=t.dtype).copy_(t) for name, t in state.items()}
    state |= {
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "mask": torch.rand(3, 2, 2, generator=g) > 0.5,
        "wide": torch.randn(1, 300, generator=g).to(torch.uint8),
    }
    return state


@pytest.mark.parametrize("count", [3, 130])  # 130 records: torch's name set rehashes 4 times
def test_archive_is_byte_identical_to_torch_save(tmp_path, count):
    state = mixed_state(count)
    (tmp_path / "ref").mkdir()
    torch.save(state, tmp_path / "ref/weights.pth")
    write_streamed(tmp_path / "weights.pth", state)
    assert (tmp_path / "weights.pth").read_bytes() == (tmp_path / "ref/weights.pth").read_bytes()
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "weights.pth", weights_only=True, mmap=mmap)
        assert_states_equal(loaded, state)


def test_storage_classes_are_torchs():
    for dtype, name in STORAGE_TYPES.items():
        assert torch.storage._dtype_to_storage_type_map()[dtype] == name


def test_zip64_fields_load(tmp_path, monkeypatch):
    """Sizes and offsets past the zip64 limit (lowered here) go in zip64 extra fields."""
    monkeypatch.setattr(torch_zip, "ZIP64_LIMIT", 700)
    state = {"big": torch.randn(40, 30), "after": torch.arange(7, dtype=torch.float16)}
    write_streamed(tmp_path / "z.pth", state)
    with zipfile.ZipFile(tmp_path / "z.pth") as archive:
        assert archive.testzip() is None  # every CRC right
        infos = {info.filename: info for info in archive.infolist()}
    assert infos["z/data/0"].file_size == 4800 and infos["z/data/1"].header_offset > 700
    assert all(infos[f"z/data/{i}"].extra.startswith(b"\x01\x00") for i in (0, 1))
    for mmap in (False, True):
        assert_states_equal(torch.load(tmp_path / "z.pth", weights_only=True, mmap=mmap), state)


def test_crc32_combine():
    rng = random.Random(0)
    data = rng.randbytes(5000)
    for cut in (0, 1, 7, 2500, 4999, 5000):
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


def test_bytes_unwritten_twice_or_past_the_end_are_refused(tmp_path):
    specs = [PthTensor("a", torch.float32, (4,))]
    writer = TorchZipWriter(tmp_path / "a.pth", specs)
    writer.write("a", 0, b"\0" * 8)
    with pytest.raises(WorkError, match="twice"):
        writer.write("a", 4, b"\0" * 8)
    with pytest.raises(WorkError, match="past the end"):
        writer.write("a", 12, b"\0" * 8)
    with pytest.raises(WorkError, match=r"tensor 'a': bytes from 8 never written"):
        writer.close()


def test_checksums_taken_apart_from_the_write(tmp_path):
    """The engine's checksum stage: runs written with ``checksum=False`` get their CRC-32 later,
    in any order; the archive is torch.save's, and one never checksummed is refused at close."""
    t = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "a.pth"
    writer = TorchZipWriter(path, [PthTensor("a", torch.float32, (12,))])
    raw = bytes(t.view(torch.uint8).tolist())
    writer.write("a", 0, raw[:20], checksum=False)
    writer.write("a", 20, raw[20:], checksum=False)
    writer.checksum("a", 20, raw[20:])
    writer.checksum("a", 0, raw[:20])
    writer.close()
    (tmp_path / "saved").mkdir()
    torch.save({"a": t}, tmp_path / "saved" / "a.pth")
    assert path.read_bytes() == (tmp_path / "saved" / "a.pth").read_bytes()
    writer = TorchZipWriter(tmp_path / "c.pth", [PthTensor("a", torch.float32, (12,))])
    writer.write("a", 0, raw, checksum=False)
    with pytest.raises(WorkError, match="never written"):
        writer.close()


def test_writer_memory_is_independent_of_tensor_size(tmp_path):
    """A 64 MiB tensor written from one reused 1 MiB block: the writer holds less than a block."""
    block = bytes(1 << 20)
    spec = PthTensor("zeros", torch.float16, (64 * 1024, 512))
    writer = TorchZipWriter(tmp_path / "z.pth", [spec])
    tracemalloc.start()
    try:
        for offset in range(0, 64 << 20, len(block)):
            writer.write("zeros", offset, block)
        writer.close(sync=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(block) // 4
    with zipfile.ZipFile(tmp_path / "z.pth") as archive:
        assert archive.getinfo("z/data/0").CRC == zlib.crc32(bytes(64 << 20))


# ---------------------------------------------------------------------------------------------
# Meta's layout


def model_config(kind: str, vocab: int = VOCAB, **extra: object) -> dict:
    """A transformers 5 ``config.json`` of the tiny model."""
    hidden, heads, kv, ffn = MODELS[kind]
    config = transformers.LlamaConfig(
        hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=ffn, num_hidden_layers=2, vocab_size=vocab, rms_norm_eps=1e-5,
        max_position_embeddings=4096, **extra,
    )  # fmt: skip
    return config.to_dict()


def write_meta(
    folder: Path, state: dict, config: dict, mp: int, rows: int = 3, seed: int | None = 0
) -> MetaLayout:
    """Blocks of ``rows`` rows of every tensor, all shuffled together unless ``seed`` is None."""
    folder.mkdir(parents=True, exist_ok=True)
    layout = MetaLayout(config, specs_of(state), mp)
    writer = MetaWriter(folder, layout)
    blocks = [
        (name, r0, min(r0 + rows, len(t)))
        for name, t in state.items()
        for r0 in range(0, len(t), rows)
    ]
    if seed is not None:
        random.Random(seed).shuffle(blocks)
    for name, r0, r1 in blocks:
        writer.write_rows(name, r0, r1, state[name][r0:r1])
    writer.close(sync=False)
    for name, data in layout.aux_files({}).items():
        (folder / name).write_bytes(data)
    return layout


def read_back(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor through deltamerge's Meta reader, a few rows at a time."""
    buffer = torch.empty(1 << 16, dtype=torch.uint8)
    with MetaCheckpoint(detect_layout(folder)) as checkpoint:
        return {
            name: torch.cat([
                checkpoint.read_rows(name, r, min(r + 5, spec.rows), buffer).clone()
                for r in range(0, spec.rows, 5)
            ])
            for name, spec in checkpoint.specs.items()
        }  # fmt: skip


CASES = [("mha", 1), ("mha", 2), ("mha", 4), ("mha", 8), ("gqa", 2), ("gqa", 8)]


@pytest.mark.parametrize(("kind", "mp"), CASES, ids=lambda v: str(v))
def test_meta_shards_are_the_conversions_inverse(tmp_path, kind, mp):
    state, config = hf_state(kind), model_config(kind)
    layout = write_meta(tmp_path / "out", state, config, mp)
    params = json.loads((tmp_path / "out/params.json").read_text())
    hidden, heads, kv, _ = MODELS[kind]
    assert params == {
        "dim": hidden, "multiple_of": 16 if kind == "mha" else 8, "n_heads": heads,
        **({"n_kv_heads": kv} if kv != heads else {}), "n_layers": 2, "norm_eps": 1e-5,
        "vocab_size": -1,
    }  # fmt: skip
    hf_to_meta(state, params, mp, tmp_path / "ref")  # transformers' rules, inverted
    (tmp_path / "saved").mkdir()
    for index, filename in enumerate(layout.filenames):
        shard = torch.load(tmp_path / "out" / filename, weights_only=True)
        expected = torch.load(tmp_path / "ref" / filename, weights_only=True)
        del expected["rope.freqs"]
        assert_states_equal(shard, expected)
        assert list(shard) == [t.name for t in layout.shards[index]]
        # and byte for byte what torch.save writes for those tensors in that order
        torch.save({name: expected[name] for name in shard}, tmp_path / "saved" / filename)
        assert (tmp_path / "out" / filename).read_bytes() == (tmp_path / "saved" / filename).read_bytes()
    assert_states_equal(read_back(tmp_path / "out"), state)
    with MetaCheckpoint(detect_layout(tmp_path / "out")) as checkpoint:
        back = json.loads(checkpoint.aux_files()["config.json"])
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "num_hidden_layers", "rms_norm_eps", "vocab_size", "max_position_embeddings"):
        assert back[key] == config[key], key


def test_block_size_and_order_do_not_matter(tmp_path):
    state, config = hf_state("gqa", seed=1), model_config("gqa")
    write_meta(tmp_path / "whole", state, config, 2, rows=1 << 20, seed=None)
    for rows in (1, 5, 13):  # 13: blocks that cut through q and k heads of 8 rows
        layout = write_meta(tmp_path / f"rows{rows}", state, config, 2, rows=rows, seed=rows)
        for filename in layout.filenames:
            whole = (tmp_path / "whole" / filename).read_bytes()
            assert (tmp_path / f"rows{rows}" / filename).read_bytes() == whole, (rows, filename)


def test_convert_of_the_output_gives_the_hf_tensors_back(tmp_path):
    state = hf_state("mha", seed=2, dtype=torch.float16)
    write_meta(tmp_path / "meta", state, model_config("mha"), 4)
    convert(tmp_path / "meta", tmp_path / "hf", block_size=4096)
    assert_states_equal(load_state(tmp_path / "hf"), state)


def test_rotary_buffers_are_dropped(tmp_path):
    state = hf_state("mha", seed=3)
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4) for i in range(2)}
    layout = MetaLayout(model_config("mha"), specs_of(state | buffers), 2)
    assert layout.dropped == set(buffers)
    writer = MetaWriter(tmp_path, layout)
    for name, tensor in (state | buffers).items():
        writer.write_rows(name, 0, len(tensor), tensor)
    writer.close(sync=False)
    (tmp_path / "params.json").write_bytes(layout.params_json())
    assert_states_equal(read_back(tmp_path), state)


# Meta's own params.json files (LLaMA 1 7B, 13B, 33B; LLaMA 2 70B, 13B; Code Llama 7B)
RELEASED = [
    {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06},
    {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-06},
    {"dim": 6656, "multiple_of": 256, "n_heads": 52, "n_layers": 60, "norm_eps": 1e-06},
    {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
     "n_layers": 80, "norm_eps": 1e-05},
    {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05},
    {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
     "norm_eps": 1e-5, "rope_theta": 1000000},
]  # fmt: skip


@pytest.mark.parametrize("released", RELEASED)
def test_params_of_released_models_round_trip(released):
    config = hf_config(released | {"vocab_size": -1}, 32000, torch.float16)
    params = meta_params(config)
    assert hf_config(params, 32000, torch.float16) == config
    if "rope_theta" not in released:  # LLaMA 1 and 2: Meta's file itself, keys in its order
        assert json.dumps(params) == json.dumps(released | {"vocab_size": -1})


def test_transformers_5_rope_parameters_are_read():
    config = model_config("mha", rope_theta=1e6)
    assert meta_params(config)["rope_theta"] == 1000000


def test_absent_keys_take_transformers_defaults():
    absent = ("rms_norm_eps", "num_key_value_heads")
    config = {k: v for k, v in model_config("gqa").items() if k not in absent}
    params = meta_params(config)
    assert params["norm_eps"] == 1e-6 and "n_kv_heads" not in params


def test_unusual_ffn_width_is_still_exact():
    config = model_config("mha") | {"intermediate_size": 100}
    params = meta_params(config)
    assert hf_config(params, VOCAB, torch.float16)["intermediate_size"] == 100


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tie_word_embeddings": True}, "tied"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type"),
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"vocab_size": 128256}, "Llama 3"),
    ],
)
def test_models_meta_cannot_hold_are_refused(change, match):
    with pytest.raises(UnsupportedError, match=rf"config\.json: .*{match}"):
        meta_params(model_config("mha") | change)


@pytest.mark.parametrize(
    ("kind", "mp", "match"), [("mha", 3, "8 heads"), ("gqa", 16, "8 key/value heads"), ("mha", 0, "--mp")]
)
def test_shard_counts_that_do_not_divide_are_refused(kind, mp, match):
    with pytest.raises(UnsupportedError, match=match):
        MetaLayout(model_config(kind), specs_of(hf_state(kind)), mp)


def test_vocabulary_that_does_not_divide_is_refused():
    state = hf_state("mha")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][:-1]
    with pytest.raises(UnsupportedError, match=r"lm_head\.weight.*95 rows"):
        MetaLayout(model_config("mha"), specs_of(state), 2)


def test_tensors_that_do_not_fit_are_named():
    state = hf_state("mha")
    bias = {"model.layers.0.self_attn.q_proj.bias": state["model.norm.weight"]}
    with pytest.raises(UnsupportedError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        MetaLayout(model_config("mha"), specs_of(state | bias))
    missing = dict(state)
    del missing["lm_head.weight"]
    with pytest.raises(FormatError, match=r"'lm_head\.weight' is missing"):
        MetaLayout(model_config("mha"), specs_of(missing))
    wrong = state | {"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(FormatError, match=r"up_proj.*\[64, 64\].*\[176, 64\]"):
        MetaLayout(model_config("mha"), specs_of(wrong))


def test_meta_writer_holds_no_rows(tmp_path):
    """A 16 MiB embedding split over 2 shards, in 256 KiB blocks: the writer keeps less than one."""
    shapes = hf_shapes("wide", vocab=8192)
    specs = [PthTensor(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    writer = MetaWriter(tmp_path, MetaLayout(model_config("wide", vocab=8192), specs, 2))
    embedding = torch.zeros(shapes["model.embed_tokens.weight"], dtype=torch.bfloat16)
    block = 128 * 1024 * 2
    tracemalloc.start()
    try:
        for r0 in range(0, len(embedding), 128):
            writer.write_rows("model.embed_tokens.weight", r0, r0 + 128, embedding[r0 : r0 + 128])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        writer.abort()
    assert peak < block
