"""peft FourierFT adapters: a sparse spectrum whose inverse 2-D FFT is added to the weight.

peft's ``get_delta_weight`` places the module's ``fourierft_spectrum`` (``n_frequency`` values,
fp32) at positions of an ``(out, in)`` zero matrix that it never saves: the first
``n_frequency`` of ``torch.randperm(out * in)`` from a CPU generator seeded with the config's
``random_loc_seed``, as ``(p // in, p % in)``; the delta is ``ifft2(dense).real * scaling`` in
fp32, and ``merge`` adds it (transposed on Conv1D) to the weight in the weight's dtype, rounded
once. ``n_frequency`` is per module from ``n_frequency_pattern`` (the first key ``k`` with
``re.match(rf".*\\.{k}$", module)``, else the module's own name, else ``n_frequency``).

Up to ``HOLD_BYTES`` of complex spectrum the delta is formed whole, by peft's own calls
(``dense_delta``). A larger one (13B's MLP: peft's complex input and output are 540 MiB each,
its fp32 result 270 MiB) goes by windows of the weight's rows (``SpectrumDelta``), each value
the same bits, because of what MKL's ``ifft2`` (torch's ``_fft_c2c`` over both dims, scaled by
``1 / (out * in)``) is: the 1-D transforms of the rows, then of the columns, each line alone
(a block of lines is the same values as the whole batch), the scale applied after the rows'
pass when ``in <= out`` and after the columns' otherwise (``late_scale``). Measured with MKL
2024.2 (torch 2.13, AVX2) against peft's whole ``ifft2``: every shape from 5 x 5 to 69 x 69,
300 others up to 3000 x 3000, 13B's 13824 x 5120, 5120 x 13824 and 5120 x 5120, on 1, 2, 4
and 16 torch threads alike; shapes with a side of 1, 2 or 4 scale otherwise, so a side under
``MIN_SIDE`` goes whole, as does every delta where torch's FFTs are not MKL's or where two
small spectra do not come out so (``ifft2_is_separable``, once per process). So the rows that
hold the spectrum's values (at most ``n_frequency``; every other row stays zero through the
rows' pass) are transformed and held (complex, ``rows x in``, up to ``LINES_BYTES``: 95 MiB
at 13B's ``down_proj`` with peft's default 1000 values; a larger one is formed again for every
window, in slabs of its columns), and each window of the weight's rows takes the columns' pass
``COLUMN_BYTES`` of columns at a time: of a Linear
layer's delta, the window's rows of every column, so each window repeats the columns' pass
(the price of not holding the fp32 delta); of a Conv1D's (the weight stored ``(in, out)``),
the window's columns, each transformed once.

The positions are peft's without its ``out * in`` int64 permutation (540 MiB at 13B's MLP):
below ``2**32 / 20`` elements torch's CPU ``randperm`` is a forward Fisher-Yates shuffle, whose
first ``n`` values are final after ``n`` swaps, each drawn as ``torch.randint(0, size - i)``
draws it (``first_of_randperm``); checked against ``randperm`` once per process
(``draws_as_randperm``), ``randperm`` itself otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from . import Scratch
from .adapter import AdapterKind, RowDelta, is_number
from .dense_delta import DenseDelta
from .lora import ADAPTER_CONFIG, FactorSource
from .patterns import suffix_pattern_values

HOLD_BYTES = 64 * 1024 * 1024  # the complex spectrum (out x in) formed whole up to this
WINDOW_BYTES = 64 * 1024 * 1024  # a window of the fp32 delta's rows beyond it
LINES_BYTES = 96 * 1024 * 1024  # the rows' pass (complex, rows x in) held whole up to this
COLUMN_BYTES = 4 * 1024 * 1024  # complex columns (out x some) per piece of the columns' pass
MIN_SIDE = 8  # a delta with a side under this goes whole (MKL scales 1-, 2- and 4-wide otherwise)
SHUFFLED_BELOW = 2**32 // 20  # torch's randperm is a forward Fisher-Yates shuffle below this
MAX_DRAWS = 1 << 16  # positions drawn one by one up to this many; randperm whole beyond


def first_of_randperm(size: int, n: int, seed: int) -> torch.Tensor:
    """``torch.randperm(size)[:n]`` from a generator seeded with ``seed``, without the
    permutation: swap ``i`` exchanges ``i`` and ``i + randint(0, size - i)``; the values moved
    are kept in a dict."""
    g = torch.Generator().manual_seed(seed)
    moved: dict[int, int] = {}
    drawn = []
    for i in range(n):
        z = i + int(torch.randint(0, size - i, (), generator=g))
        drawn.append(moved.get(z, z))
        moved[z] = moved.get(i, i)
    return torch.tensor(drawn, dtype=torch.int64)


@cache
def draws_as_randperm() -> bool:
    """Whether ``first_of_randperm`` is this torch's ``randperm`` (a small one, compared)."""
    return torch.equal(first_of_randperm(1000, 60, 7),
                       torch.randperm(1000, generator=torch.Generator().manual_seed(7))[:60])


def positions(out_dim: int, in_dim: int, n: int, seed: int) -> torch.Tensor:
    """peft's ``indices``: rows and columns of the spectrum's values, ``(2, n)``."""
    size = out_dim * in_dim
    if n < size < SHUFFLED_BELOW and n <= MAX_DRAWS and draws_as_randperm():
        drawn = first_of_randperm(size, n, seed)
    else:
        drawn = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([drawn // in_dim, drawn % in_dim], dim=0)


def delta(spectrum: torch.Tensor, out_dim: int, in_dim: int, seed: int, scaling: float) -> torch.Tensor:
    """peft's ``FourierFTLayer.get_delta_weight`` with fp32 parameters (its autocast)."""
    indices = positions(out_dim, in_dim, spectrum.shape[0], seed)
    dense = torch.zeros(out_dim, in_dim)
    dense[indices[0, :], indices[1, :]] = spectrum.float()
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


def held_whole(out_dim: int, in_dim: int) -> bool:
    """Whether peft's whole ``ifft2`` forms the delta (small, narrow, or an FFT that is not the
    rows' then the columns' transforms as measured)."""
    return (out_dim * in_dim * 8 <= HOLD_BYTES or min(out_dim, in_dim) < MIN_SIDE
            or not torch.backends.mkl.is_available() or not ifft2_is_separable())


@cache
def ifft2_is_separable() -> bool:
    """Whether this torch's ``ifft2`` gives the bits the windows rely on, on two small sparse
    spectra (taller and wider: both places of the scale): a guard, once per process, against
    an MKL that splits the 2-D transform otherwise than the one measured."""
    generator = torch.Generator().manual_seed(5)
    for out_dim, in_dim in ((90, 56), (56, 90)):
        dense = torch.zeros(out_dim, in_dim)
        dense.view(-1)[torch.randperm(out_dim * in_dim, generator=generator)[:200]] = torch.randn(
            200, generator=generator)
        factor = 1.0 / (out_dim * in_dim)
        lines = torch.fft.ifft(dense.to(torch.complex64), dim=1, norm="forward")
        if not late_scale(out_dim, in_dim):
            torch.view_as_real(lines).mul_(factor)
        both = torch.fft.ifft(lines, dim=0, norm="forward").real
        if late_scale(out_dim, in_dim):
            both = both * factor
        if not torch.equal(both, torch.fft.ifft2(dense).real):
            return False
    return True


def late_scale(out_dim: int, in_dim: int) -> bool:
    """Whether MKL's ``ifft2`` scales after the columns' pass (wider than tall), not the rows'."""
    return in_dim > out_dim


def rows_pass(entries: dict[str, torch.Tensor], in_dim: int, factor: float | None, s0: int, s1: int,
              out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Columns ``[s0, s1)`` of the rows' pass into ``out`` (``(rows, s1 - s0)``, complex): each
    row holding spectrum values, dense, through its unnormalized 1-D transform (times ``factor``
    when given), ``COLUMN_BYTES`` of rows at a time in ``scratch``'s buffers."""
    starts = entries["starts"]
    count = starts.shape[0] - 1
    step = max(1, COLUMN_BYTES // (in_dim * 8))
    for i in range(0, count, step):
        j = min(count, i + step)
        dense = scratch.get("fourierft-in", torch.complex64, (j - i, in_dim))
        dense.zero_()
        e0, e1 = int(starts[i]), int(starts[j])
        dense[entries["which"][e0:e1] - i, entries["cols"][e0:e1]] = entries["values"][e0:e1]
        done = torch.fft.ifft(dense, dim=1, norm="forward",
                              out=scratch.get("fourierft-out", torch.complex64, (j - i, in_dim)))
        if factor is not None:
            torch.view_as_real(done).mul_(factor)
        out[i:j] = done[:, s0:s1]
    return out


def columns(rows: torch.Tensor, lines: torch.Tensor, out_dim: int, scratch: Scratch) -> torch.Tensor:
    """The columns' pass of the rows' pass ``lines`` (``(rows, some)``, at ``rows``; the other
    rows zero): ``(out, some)``, complex, unnormalized, in ``scratch``'s buffers."""
    piece = scratch.get("fourierft-in", torch.complex64, (out_dim, lines.shape[1]))
    piece.zero_()
    piece[rows] = lines
    done = scratch.get("fourierft-out", torch.complex64, tuple(piece.shape))
    return torch.fft.ifft(piece, dim=0, norm="forward", out=done)


class SpectrumDelta(RowDelta):
    """Rows of peft's delta added to the weight's fp32 rows (rounded once, as peft's
    ``W += delta``), a window of ``WINDOW_BYTES`` of them at a time from the spectrum's rows'
    pass, held whole up to ``LINES_BYTES`` and otherwise formed again for every window,
    ``LINES_BYTES`` of its columns at a time; ``transposed``: the weight is stored ``(in, out)``
    (Conv1D, ``fan_in_fan_out``)."""

    def __init__(self, source: FactorSource, parts: dict[str, str], shape: tuple[int, int],
                 seed: int, scaling: float, transposed: bool):
        super().__init__(source, parts)
        self.out_dim, self.in_dim = shape
        self.seed, self.scaling, self.transposed = seed, scaling, transposed
        self.rows, width = (self.in_dim, self.out_dim) if transposed else shape
        self.window_rows = min(self.rows, max(1, WINDOW_BYTES // (width * 4)))
        self.span = (0, 0)  # the weight's rows the window holds
        self.factor = 1.0 / (self.out_dim * self.in_dim)  # MKL's scale, as torch sets it
        self.late = late_scale(self.out_dim, self.in_dim)

    def prepare(self, tensors: dict[str, torch.Tensor]) -> None:
        """The spectrum's values by row: the rows holding any (``held_rows``), and for each
        value its row's index among them, its column and itself (complex), in that order."""
        spectrum = tensors.pop("fourierft_spectrum")
        indices = positions(self.out_dim, self.in_dim, spectrum.shape[0], self.seed)
        rows, which = torch.unique(indices[0], return_inverse=True)
        order = torch.argsort(which, stable=True)
        tensors["held_rows"] = rows
        tensors["which"] = which[order]
        tensors["cols"] = indices[1][order]
        tensors["values"] = spectrum.float()[order].to(torch.complex64)
        tensors["starts"] = torch.searchsorted(tensors["which"], torch.arange(rows.shape[0] + 1))
        tensors["window"] = torch.empty(self.window_rows, self.out_dim if self.transposed else self.in_dim)
        self.span = (0, 0)

    def release(self) -> None:
        super().release()
        self.span = (0, 0)

    def combine(self, acc: torch.Tensor, r0: int, scratch: Scratch) -> None:
        tensors = self.tensors()
        n = acc.shape[0]
        a, b = self.span
        if r0 < a or r0 + n > b:
            a, b = r0, min(self.rows, r0 + max(n, self.window_rows))
            if b - a > tensors["window"].shape[0]:
                tensors["window"] = torch.empty(b - a, tensors["window"].shape[1])
            self.fill(tensors, a, b, scratch)
            self.span = (a, b)
        acc.add_(tensors["window"][r0 - a : r0 - a + n])

    def slabs(self, tensors: dict[str, torch.Tensor], lo: int, hi: int,
              scratch: Scratch) -> Iterator[tuple[int, torch.Tensor]]:
        """Columns ``[lo, hi)`` of the rows' pass, as ``(first column, lines)`` pieces: views
        of the one held whole (formed at the first window) when it fits ``LINES_BYTES``."""
        count = tensors["held_rows"].shape[0]
        factor = None if self.late else self.factor
        if count * self.in_dim * 8 <= LINES_BYTES:
            if "lines" not in tensors:
                held = torch.empty(count, self.in_dim, dtype=torch.complex64)
                tensors["lines"] = rows_pass(tensors, self.in_dim, factor, 0, self.in_dim, held, scratch)
            yield lo, tensors["lines"][:, lo:hi]
            return
        width = max(1, LINES_BYTES // (count * 8))
        if "slab" not in tensors:
            tensors["slab"] = torch.empty(count * width, dtype=torch.complex64)
        for s0 in range(lo, hi, width):
            s1 = min(hi, s0 + width)
            out = tensors["slab"][: count * (s1 - s0)].view(count, s1 - s0)
            yield s0, rows_pass(tensors, self.in_dim, factor, s0, s1, out, scratch)

    def fill(self, tensors: dict[str, torch.Tensor], a: int, b: int, scratch: Scratch) -> None:
        """The window: the weight's rows ``[a, b)`` of the delta, each ``.real`` of the columns'
        pass (times ``1 / (out * in)`` where MKL scales last) times ``scaling``, as peft's."""
        window = tensors["window"][: b - a]
        step = max(1, COLUMN_BYTES // (self.out_dim * 8))
        lo, hi = (a, b) if self.transposed else (0, self.in_dim)
        for s0, lines in self.slabs(tensors, lo, hi, scratch):
            for c0 in range(s0, s0 + lines.shape[1], step):
                c1 = min(s0 + lines.shape[1], c0 + step)
                done = columns(tensors["held_rows"], lines[:, c0 - s0 : c1 - s0], self.out_dim, scratch)
                part = done.real if self.transposed else done[a:b].real
                into = window[c0 - a : c1 - a].T if self.transposed else window[:, c0:c1]
                if self.late:
                    torch.mul(part, self.factor, out=into)
                    into.mul_(self.scaling)
                else:
                    torch.mul(part, self.scaling, out=into)


class FourierFTKind(AdapterKind):
    name = "fourierft"
    peft_type = "FOURIERFT"
    parts = ("fourierft_spectrum",)

    def check_config(self, path: Path) -> None:
        self.refuse_bias(path, "FourierFT")
        for key, default in (("n_frequency", 1000), ("scaling", 150.0)):
            if not is_number(self.config.get(key, default)):
                raise FormatError(f"{path}: {key!r} must be a number, not {self.config.get(key)!r}")
        seed = self.config.get("random_loc_seed", 777)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FormatError(f"{path}: 'random_loc_seed' must be an integer (peft draws the "
                              f"spectrum's positions from it), not {seed!r}")
        pattern = self.config.get("n_frequency_pattern") or {}
        if not isinstance(pattern, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in pattern.items()):
            raise FormatError(f"{path}: 'n_frequency_pattern' must map module patterns to counts")

    def prepare_plan(self, modules: list[str]) -> None:
        """Each module's ``n_frequency``, as peft's ``_create_and_replace`` picks it."""
        self._n = suffix_pattern_values(self.folder / ADAPTER_CONFIG, "n_frequency_pattern",
                                        self.config.get("n_frequency_pattern") or {}, modules,
                                        self.config.get("n_frequency", 1000))

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, DenseDelta]:
        flip = self.transposed(spec.name)
        out_dim, in_dim = reversed(spec.shape) if flip else spec.shape
        n = self._n[module]
        got = self.shape(parts["fourierft_spectrum"])
        if got != (n,) or n > out_dim * in_dim:
            raise MismatchError(
                f"{self.weights}: tensor {parts['fourierft_spectrum']!r} is {list(got)} but peft "
                f"makes [{n}] (n_frequency) for {spec.name!r} {list(spec.shape)} and fails to load it"
            )
        seed, scaling = self.config.get("random_loc_seed", 777), self.config.get("scaling", 150.0)

        if not held_whole(out_dim, in_dim):
            return {spec.name: SpectrumDelta(self.source, parts, (out_dim, in_dim), seed, scaling, flip)}

        def build(t: dict[str, torch.Tensor]) -> torch.Tensor:
            return delta(t["fourierft_spectrum"], out_dim, in_dim, seed, scaling)
        return {spec.name: DenseDelta(self.source, parts, build, flip)}
