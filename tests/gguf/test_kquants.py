"""The k-quant port (``sinks/gguf_quants.py``) gives ggml's own bytes.

``tests/data/kquants`` holds rows and the blocks llama.cpp's C quantizers made of them
(``scripts/kquant_golden.py`` made them; ``golden.json`` names the build): random rows of two
widths, rows meant for the C code's rare branches (empty, constant, huge, tiny, subnormal) and
rows with NaN and infinities. The k-quants are checked through both of ``quantize_rows``' paths:
the numba-compiled C code (``gguf_kquants_numba``) and the torch port.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TESTS

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from deltamerge.sinks import gguf_quants  # noqa: E402
from deltamerge.sinks.gguf_quants import quantize_rows  # noqa: E402

DATA = TESTS / "data" / "kquants"
GOLDEN = json.loads((DATA / "golden.json").read_text())
PORTED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
QT = gguf.GGMLQuantizationType


def rows_of(case: str) -> torch.Tensor:
    shape = GOLDEN["cases"][case]
    data = bytearray((DATA / f"{case}.f32").read_bytes())
    return torch.frombuffer(data, dtype=torch.float32).reshape(shape["rows"], shape["width"])


def golden(case: str, qtype: str) -> torch.Tensor:
    data = bytearray((DATA / f"{case}.{qtype}.bin").read_bytes())
    return torch.frombuffer(data, dtype=torch.uint8).reshape(GOLDEN["cases"][case]["rows"], -1)


BACKENDS = ("numba", "torch")


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Make ``quantize_rows`` run the k-quants on ``backend`` (``DELTAMERGE_KQUANTS``)."""
    if backend == "numba":
        pytest.importorskip("numba", reason="numba is not installed: only the torch port of k-quants runs")
    monkeypatch.setenv(gguf_quants.KQUANTS_ENV, backend)


# gguf-py's legacy quantizers (the converter's) part from ggml's on NaN and infinities; they have
# one path, the k-quants two.
CASES = [(case, qtype, backend) for case in sorted(GOLDEN["cases"]) for qtype in PORTED + LEGACY
         if case != "nonfinite" or qtype in PORTED for backend in (BACKENDS if qtype in PORTED else ("",))]


@pytest.mark.parametrize(("case", "qtype", "backend"), CASES)
def test_bytes_are_ggmls(case: str, qtype: str, backend: str, monkeypatch: pytest.MonkeyPatch):
    assert qtype in GOLDEN["types"]
    if backend:
        use_backend(monkeypatch, backend)
        assert gguf_quants.kquants_backend() == backend
    out = quantize_rows(rows_of(case), QT[qtype])
    assert out.dtype == torch.uint8
    assert torch.equal(out, golden(case, qtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_rows_and_chunks_quantize_alone(qtype: str, backend: str, monkeypatch: pytest.MonkeyPatch):
    """Super-blocks are independent: how rows are grouped, or chunked inside, changes no byte."""
    use_backend(monkeypatch, backend)
    x = torch.cat([rows_of("weights"), rows_of("normal")])
    whole = quantize_rows(x, QT[qtype])
    assert torch.equal(torch.cat([quantize_rows(x[:5], QT[qtype]), quantize_rows(x[5:], QT[qtype])]), whole)
    monkeypatch.setattr(gguf_quants, "_CHUNK_SUPERBLOCKS", 7)  # chunks that end mid-row
    assert torch.equal(quantize_rows(x, QT[qtype]), whole)


@pytest.mark.parametrize(("qtype", "bound"), [("Q2_K", 0.5), ("Q3_K", 0.25), ("Q4_K", 0.1), ("Q5_K", 0.05),
                                             ("Q6_K", 0.025)])
def test_round_trip_through_ggufs_dequantizer(qtype: str, bound: float):
    x = rows_of("weights")
    q = quantize_rows(x, QT[qtype])
    y = torch.from_numpy(gguf.quants.dequantize(q.numpy(), QT[qtype]).copy()).reshape(x.shape)
    blocks, got = x.reshape(-1, 256), y.reshape(-1, 256)
    worst = ((got - blocks).abs().amax(1) / blocks.abs().amax(1)).max().item()
    assert 0 < worst < bound


def test_refuses_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_rows(torch.zeros(2, 128), QT.Q4_K)
    with pytest.raises(ValueError, match="float32"):
        quantize_rows(torch.zeros(2, 256, dtype=torch.float16), QT.Q6_K)
