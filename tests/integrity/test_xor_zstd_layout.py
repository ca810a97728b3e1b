"""The compressed XOR delta's layouts (formats/xor_zstd.py): the masked-top layout written now
(low byte planes, a bitmap of the elements whose top byte is non-zero, those top bytes) round
trips bit-exactly for every width and for sizes that are no multiple of 8, and a delta of the
planes layout written before it (no ``layout`` in its index) still applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_states_equal, llama_state, load_state, save_checkpoint

from deltamerge import apply_delta, make_delta
from deltamerge.errors import FormatError
from deltamerge.formats.safetensors import read_header
from deltamerge.formats.xor_zstd import INDEX_KEY, MASKED, PLANES, pack_bits, parse_index, unpack_bits
from deltamerge.sinks.xor_zstd import ZstdXorSink
from deltamerge.tensor_spec import TensorSpec

pytest.importorskip("zstandard")

BITS = {2: torch.int16, 4: torch.int32}


def _with_odd_tensors(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Tensors whose element counts are no multiple of 8 (the bitmap's last byte is partial)."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(iter(state.values())).dtype
    return {**state, "extra.odd": torch.randn(7, 13, generator=g).to(dtype),
            "extra.three": torch.randn(3, generator=g).to(dtype)}


def _fine_tune(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Low bits moved everywhere and, for about one element in ten, the top byte too (the sign
    and that byte's two low bits: no NaN appears), so the masked stream holds some bytes and
    its bitmap some ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        width = t.element_size()
        low = torch.randint(0, 1 << 12, t.shape, generator=g)
        top = (torch.rand(t.shape, generator=g) < 0.1) * (torch.randint(1, 256, t.shape, generator=g) & 0x83)
        noise = (low | (top << (8 * (width - 1)))).to(BITS[width])
        out[name] = (t.view(BITS[width]) ^ noise).view(t.dtype)
    return out


def _index(folder: Path) -> dict[str, dict]:
    index: dict[str, dict] = {}
    for path in folder.glob("*.safetensors"):
        index.update(json.loads(read_header(path).metadata[INDEX_KEY]))
    return index


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [MASKED, PLANES])
def test_each_layout_round_trips_bit_exactly(tmp_path: Path, dtype: torch.dtype, layout: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Made with blocks of 4096 bytes, applied with 8192: rows come from frames they do not
    start; PLANES is written as deltas made before the masked layout were (no ``layout``)."""
    monkeypatch.setattr(ZstdXorSink, "layout", layout)
    base_state = _with_odd_tensors(llama_state(0, dtype), 0)
    target_state = _fine_tune(base_state, 1)
    base = save_checkpoint(base_state, tmp_path / "base")
    target = save_checkpoint(target_state, tmp_path / "target")
    make_delta(base, target, tmp_path / "delta", kind="xor", compress=True, block_size=4096)
    width = dtype.itemsize
    index = _index(tmp_path / "delta")
    assert sorted(index) == sorted(base_state)
    for entry in index.values():
        assert entry.get("layout", PLANES) == layout
        assert ("layout" in entry) == (layout != PLANES)
        assert {len(sizes) for _, _, sizes in entry["blocks"]} == {width + (layout == MASKED)}
    assert any(len(e["blocks"]) > 1 for e in index.values())

    monkeypatch.undo()  # apply reads with the code as it is, whatever wrote the delta
    apply_delta(base, tmp_path / "delta", tmp_path / "out", block_size=8192)
    assert_states_equal(load_state(tmp_path / "out"), target_state)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 1000])
def test_bitmap_round_trips(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    expected = [sum(int(mask[i]) << (i % 8) for i in range(k * 8, min(n, k * 8 + 8)))
                for k in range(bits.numel())]
    assert bits.tolist() == expected
    assert torch.equal(unpack_bits(bits, n), mask)


@pytest.mark.parametrize("layout,sizes", [("bit-planes", [1, 1]), (MASKED, [1, 1]), (PLANES, [1, 1, 1])])
def test_unknown_layout_or_wrong_stream_count_is_refused(tmp_path: Path, layout: str,
                                                         sizes: list[int]) -> None:
    """An fp16 tensor has 2 streams in PLANES and 3 in MASKED; another layout is not guessed."""
    path = tmp_path / "d.safetensors"
    index = {"w": {"dtype": "F16", "shape": [4], "layout": layout, "blocks": [[0, 4, sizes]]}}
    blob = TensorSpec("w", torch.uint8, (sum(sizes),))
    with pytest.raises(FormatError, match=r"d\.safetensors: tensor 'w': .* index is damaged"):
        parse_index(path, {INDEX_KEY: json.dumps(index)}, {"w": blob})


@pytest.mark.parametrize("stream", [0, -1], ids=["low-plane", "top-bytes"])
def test_a_corrupt_frame_is_refused_naming_file_and_tensor(tmp_path: Path, stream: int) -> None:
    """Frames decode on threads of their own: a frame zstd cannot read still stops the run with
    the one-line error naming the file, the tensor and its rows, and leaves no output."""
    base_state = llama_state(0, torch.float16)
    target_state = _fine_tune(base_state, 1)
    base = save_checkpoint(base_state, tmp_path / "base")
    target = save_checkpoint(target_state, tmp_path / "target")
    make_delta(base, target, tmp_path / "delta", kind="xor", compress=True)
    [path] = (tmp_path / "delta").glob("*.safetensors")
    header = read_header(path)
    name = max(header.tensors, key=lambda n: header.tensors[n].spec.numel)
    _, _, sizes = json.loads(header.metadata[INDEX_KEY])[name]["blocks"][0]
    at = header.tensors[name].offset + sum(sizes[:stream % len(sizes)])
    with open(path, "r+b") as f:  # the frame's magic number gone
        f.seek(at)
        f.write(b"\0\0\0\0")
    with pytest.raises(FormatError, match=rf"{path.name}: tensor {name!r}: the compressed frame of rows "
                                          r"0-\d+ is corrupt"):
        apply_delta(base, tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()
