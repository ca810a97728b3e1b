"""The numba-compiled k-quants (``sinks/gguf_kquants_numba.py``) against the torch port, byte for byte.

Both mirror ggml's ``quantize_row_q*_K_ref`` (the goldens of ``test_kquants.py`` check each against
the C code's own bytes); here they meet on rows the goldens do not hold: random rows of several
scales, flat and all-zero blocks, a huge value among small ones, tiny and subnormal magnitudes,
NaN and infinities, and random float32 bit patterns (every class of value at once). Also: that
``quantize_rows`` really takes the numba path when numba imports, and that threads quantizing side
by side (the ComputePool's) give the bytes one thread gives.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("numba", reason="numba is not installed: quantize_rows runs the torch port only")

from deltamerge.sinks import gguf_kquants_numba, gguf_quants  # noqa: E402
from deltamerge.sinks.gguf_quants import quantize_rows  # noqa: E402

KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QT = gguf.GGMLQuantizationType


def quantize_with(backend: str, rows: torch.Tensor, qtype: str,
                  monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setenv(gguf_quants.KQUANTS_ENV, backend)
    assert gguf_quants.kquants_backend() == backend
    return quantize_rows(rows, QT[qtype])


def edge_rows(width: int) -> torch.Tensor:
    """Rows (n, width) for the branches random rows rarely take."""
    g = torch.Generator().manual_seed(width)
    normal = torch.randn(12, width, generator=g)
    rows = [
        torch.zeros(width),
        torch.full((width,), 0.37),
        torch.full((width,), -2.5),
        normal[0] * 1e-3,
        normal[1] * 1e-20,  # tiny: below GROUP_MAX_EPS in places
        normal[2] * 1e-40,  # subnormal
        normal[3] * 3e37,  # near float32's limit: max - min overflows
        normal[4].abs(),  # no negative value: min clamps to 0
        -normal[5].abs(),
    ]
    huge = normal[6].clone()
    huge[width // 3] = 1e30
    rows.append(huge)
    spike = torch.zeros(width)
    spike[::97] = normal[7][::97]  # blocks with one or two nonzero values
    rows.append(spike)
    nonfinite = normal[8].clone()
    nonfinite[5], nonfinite[300 % width], nonfinite[-1] = float("nan"), float("inf"), float("-inf")
    rows.append(nonfinite)
    rows.append(torch.full((width,), float("nan")))
    rows.append(torch.full((width,), float("inf")))
    pattern = torch.tensor([0.0, -0.0, 1.0, -1.0]).repeat(width // 4)
    rows.append(pattern)
    return torch.stack(rows)


def random_rows(width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + width)
    scales = torch.logspace(-4, 2, 8)[:, None]
    normal = torch.randn(8, width, generator=g) * scales
    uniform = torch.rand(4, width, generator=g) * 2 - 1 + torch.rand(4, 1, generator=g)
    bits = torch.randint(-(2**31), 2**31, (4, width), generator=g, dtype=torch.int64).to(torch.int32)
    return torch.cat([normal, uniform, bits.view(torch.float32)])


@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("width", [256, 512, 768])
def test_numba_gives_the_torch_ports_bytes(qtype: str, width: int, monkeypatch: pytest.MonkeyPatch):
    rows = torch.cat([edge_rows(width), random_rows(width)])
    compiled = quantize_with("numba", rows, qtype, monkeypatch)
    ported = quantize_with("torch", rows, qtype, monkeypatch)
    assert compiled.dtype == torch.uint8 and compiled.shape == ported.shape
    assert torch.equal(compiled, ported)


def test_quantize_rows_takes_the_numba_path(monkeypatch: pytest.MonkeyPatch):
    """Where numba imports, ``quantize_rows`` runs the compiled kernel, unless told otherwise."""
    calls = []
    kernel = gguf_kquants_numba.KERNELS["Q4_K"]

    def spy(blocks, out):
        calls.append(blocks.shape)
        kernel(blocks, out)

    monkeypatch.setitem(gguf_kquants_numba.KERNELS, "Q4_K", spy)
    monkeypatch.delenv(gguf_quants.KQUANTS_ENV, raising=False)
    assert gguf_quants.kquants_backend() == "numba"
    rows = torch.randn(3, 512)
    out = quantize_rows(rows, QT.Q4_K)
    assert calls == [(6, 256)]
    monkeypatch.setenv(gguf_quants.KQUANTS_ENV, "torch")
    assert torch.equal(quantize_rows(rows, QT.Q4_K), out)
    assert len(calls) == 1


def test_without_numba_the_torch_port_runs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gguf_quants, "_numba_quantize", lambda: None)
    monkeypatch.delenv(gguf_quants.KQUANTS_ENV, raising=False)
    assert gguf_quants.kquants_backend() == "torch"
    rows = torch.randn(2, 256)
    monkeypatch.setenv(gguf_quants.KQUANTS_ENV, "numba")
    with pytest.raises(ImportError, match="DELTAMERGE_KQUANTS=numba"):
        quantize_rows(rows, QT.Q6_K)
    monkeypatch.setenv(gguf_quants.KQUANTS_ENV, "fast")
    with pytest.raises(ValueError, match="DELTAMERGE_KQUANTS='fast'"):
        quantize_rows(rows, QT.Q6_K)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_threads_give_one_threads_bytes(qtype: str, monkeypatch: pytest.MonkeyPatch):
    """The kernels release the GIL and share nothing: rows quantized on 4 threads at once are the
    bytes of all rows quantized in one call."""
    rows = torch.randn(64, 1024, generator=torch.Generator().manual_seed(7))
    whole = quantize_with("numba", rows, qtype, monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda r: quantize_rows(r, QT[qtype]), rows.split(3)))
    assert torch.equal(torch.cat(parts), whole)
