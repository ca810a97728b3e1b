"""peft C3A adapters: block-circulant kernels, expanded by FFTs into a dense delta.

peft's ``get_delta_weight`` expands ``c3a_kernel`` ``(out / b, in / b, b)`` (fp32) into the
``(out, in)`` block-circulant matrix with ``get_circulant_fast`` (an identity of ``in`` rows
through ``ifft``, an einsum with ``fft(kernel)``, ``fft`` again, transposed), rounds it to the
weight's dtype, divides it by ``in`` in that dtype, and ``merge`` adds it (``W + delta``, both in
the weight's dtype: one fp32 sum rounded). Each identity row gives one column of the delta alone,
so the expansion goes by tiles of identity rows (``rotation.windows``: at least ``MIN_ROWS`` of
them, as MKL sums each element of the einsum's product as for the whole only then; a last tile
overlapping its neighbour), each tile's columns rounded into a delta held in the weight's dtype
(exact: peft rounds there before dividing), so at 13B widths no ``in x in`` complex
intermediate (1.5 GB) is formed; a delta whose identity fits ``HOLD_BYTES`` goes whole, by peft's
own calls, as it does whenever torch runs on more than one thread: MKL's complex product
depends on the thread count at some shapes (13824 x 5120, b 64: two threads round 54M of its 70M
values otherwise than one, and tiles on two otherwise than the whole on two), so tiles are used
only on one thread, where they are bit for bit the whole (checked at 13B widths, b 64/128/256,
fp16/bf16/fp32; the CLI's engine runs torch on one thread whenever ``--workers`` is over 1).
``b`` is per module from ``block_size_pattern`` (read as FourierFT's
``n_frequency_pattern``: ``patterns.suffix_pattern_values``). peft adapts Linear layers only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.fft import fft, ifft

from ..errors import FormatError, MismatchError
from ..tensor_spec import TensorSpec
from .adapter import AdapterKind
from .dense_delta import DenseDelta
from .lora import ADAPTER_CONFIG
from .patterns import suffix_pattern_values
from .rotation import windows

HOLD_BYTES = 64 * 1024 * 1024  # the complex identity (in x in) formed whole up to this
TILE_BYTES = 4 * 1024 * 1024  # a tile's complex identity rows (tile x in) beyond it


def circulant(w: torch.Tensor) -> torch.Tensor:
    """peft's ``c3a.utils.get_circulant_fast``."""
    _, n, b = w.shape
    x = torch.eye(n * b, dtype=w.dtype, device=w.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(w))
    return fft(x).real.flatten(start_dim=1).T


def circulant_columns(fw: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Columns ``[a, b)`` of ``circulant(w)``, transposed (``(b - a, out)``), from ``fw = fft(w)``:
    identity rows ``[a, b)`` through peft's calls, each row's values those of the whole."""
    _, n, size = fw.shape
    x = torch.zeros(b - a, n * size, dtype=torch.float32)
    x[torch.arange(b - a), torch.arange(a, b)] = 1
    x = torch.einsum("...nb,mnb->...mb", ifft(x.reshape(b - a, n, size)), fw)
    return fft(x).real.flatten(start_dim=1)


def delta(kernel: torch.Tensor, dtype: torch.dtype, tile: int | None = None) -> torch.Tensor:
    """peft's ``C3ALayer.get_delta_weight`` for a weight of ``dtype``, in ``dtype``; by tiles of
    ``tile`` identity rows (default: ``TILE_BYTES`` of them) when the identity is wider than
    ``HOLD_BYTES`` and torch runs on one thread, or when ``tile`` is given."""
    m, n, size = kernel.shape
    width = n * size
    w = kernel.to(torch.float32)
    if tile is None:
        whole = width * width * 8 <= HOLD_BYTES or torch.get_num_threads() > 1
        tile = width if whole else TILE_BYTES // (width * 8)
    if tile >= width:
        d = circulant(w).to(dtype)
        return d / d.shape[-1]
    fw = fft(w)
    d = torch.empty(m * size, width, dtype=dtype)
    for a, b in windows(width, tile):
        d[:, a:b] = circulant_columns(fw, a, b).T
    return d.div_(width)


class C3AKind(AdapterKind):
    name = "c3a"
    peft_type = "C3A"
    parts = ("c3a_kernel",)

    def check_config(self, path: Path) -> None:
        self.refuse_bias(path, "C3A")
        sizes = [self.config.get("block_size", 256), *(self.config.get("block_size_pattern") or {}).values()]
        if not isinstance(self.config.get("block_size_pattern") or {}, dict) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
            raise FormatError(f"{path}: 'block_size' and the values of 'block_size_pattern' must "
                              "be positive integers")

    def prepare_plan(self, modules: list[str]) -> None:
        self._block = suffix_pattern_values(self.folder / ADAPTER_CONFIG, "block_size_pattern",
                                            self.config.get("block_size_pattern") or {}, modules,
                                            self.config.get("block_size", 256))

    def deltas(
        self, module: str, parts: dict[str, str], spec: TensorSpec, specs: dict[str, TensorSpec]
    ) -> dict[str, DenseDelta]:
        self.refuse_conv1d(module, spec.name, "peft adapts Linear layers only with C3A")
        out_dim, in_dim = spec.shape
        b = self._block[module]
        want = (out_dim // b, in_dim // b, b)
        got = self.shape(parts["c3a_kernel"])
        if got != want or out_dim % b or in_dim % b:
            raise MismatchError(
                f"{self.weights}: tensor {parts['c3a_kernel']!r} is {list(got)} but peft makes "
                f"{list(want)} (block_size {b}) for {spec.name!r} {list(spec.shape)} or refuses "
                "the layer"
            )
        dtype = spec.dtype

        def build(t: dict[str, torch.Tensor]) -> torch.Tensor:
            return delta(t["c3a_kernel"], dtype)
        return {spec.name: DenseDelta(self.source, parts, build, False)}
