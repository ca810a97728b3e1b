"""Which ggml type each tensor gets when llama.cpp's ``llama-quantize`` (no importance matrix)
quantizes the converter's GGUF: the tensor order, the type mix and the fallbacks of its
``src/llama-quant.cpp``.

llama-quantize reads the converter's file into a map ordered by ``weight_name_comparer``
(tensors outside ``blk.N`` first, then block by block, by name inside each), and chooses types in
that order: some rules count tensors as they come (``attn_v``, and ``ffn_down`` of dense models,
whose layer is their rank), so the order is part of the mix. Only the file types deltamerge
offers are ported (``OUTTYPES``); the branches of the mix that only other file types reach (the
IQ, Q2_K and Q3_K families, MXFP4) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import FormatError
from ..outputs.gguf import QUANTIZED_OUTTYPES

try:
    import gguf
except ImportError:
    gguf = None

# --outtype -> llama.cpp's LlamaFileType name (also the name the converter's naming puts in files).
OUTTYPES = {name: "MOSTLY_" + name.upper() for name in QUANTIZED_OUTTYPES}
# llama_ftype_get_default_type: the type of the tensors no rule moves.
_DEFAULT_TYPE = {
    "q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K", "q6_k": "Q6_K",
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
}
# tensor_type_fallback: a type whose blocks do not fit a row falls back to one of 32 values.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Substrings of names tensor_allows_quantization leaves as they are (the architecture-free ones).
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")
# (categories, in tensor_get_category's order of tests: the first substring found wins).
# ATTENTION_QKV and ATTENTION_KV_B are attn_v here because llama-quant.cpp treats them so: both
# are counted by category_is_attn_v, and its attn_v branch is tested before the dedicated
# ATTENTION_QKV branch, which is therefore never reached (checked in 0.3.36's llama-quant.cpp).
_CATEGORIES = (
    ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")  # sscanf("blk.%d.")
# Architectures whose load_arch_hparams call a model of this many layers 70B (src/models/*.cpp).
_70B_LAYERS = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class ModelInfo:
    """What the mix reads of the model's hyperparameters (the GGUF key/values)."""

    arch: str  # general.architecture
    n_layer: int
    n_head: int = 0
    n_head_kv: int = 0
    n_expert: int = 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, which moves attn_v up a type."""
        if self.n_layer != _70B_LAYERS.get(self.arch):
            return False
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_head != self.n_head_kv
        return True


def file_type(outtype: str) -> int:
    """general.file_type of the quantized file."""
    return int(gguf.LlamaFileType[OUTTYPES[outtype]])


def _layer(name: str) -> int:
    """``sscanf(name, "blk.%d.")``: -1 for a tensor outside the blocks."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def order(names: Sequence[str]) -> list[str]:
    """``weight_name_comparer``: by block (those outside any block first), then by name's bytes."""
    return sorted(names, key=lambda n: (_layer(n), n.encode()))


def n_dims(shape: Sequence[int]) -> int:
    """``ggml_n_dims``: trailing ggml dimensions of 1 (leading ones, row-major) do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """``tensor_allows_quantization``: matrices named ``*weight``, other than norms and the like."""
    return (n_dims(shape) >= 2 and name.endswith("weight") and name not in _NEVER_QUANTIZED_NAMES
            and not any(part in name for part in _NEVER_QUANTIZED))


def category(name: str) -> str:
    """``tensor_get_category``."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for part, cat in _CATEGORIES if part in name), "other")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _block(qtype: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]


def _fallback(width: int, qtype: str) -> str:
    """``tensor_type_fallback``: a row that the type's blocks do not cut."""
    if width % _block(qtype) == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if width % _block(qtype) == 0 else "F16"


class _Mix:
    """``llama_tensor_get_type_impl`` for one file: its counters advance tensor by tensor."""

    def __init__(self, outtype: str, model: ModelInfo, names: Sequence[str]):
        self.ftype, self.model = outtype, model
        cats = [category(n) for n in names]
        self.n_attention_wv = cats.count("attn_v")
        self.tied = "output" not in cats
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def _layer_info(self, i_layer: int, name: str) -> tuple[int, int]:
        n_layer = self.model.n_layer
        if self.model.n_expert > 1:  # experts are not in layer order: the layer is in the name
            m = _LAYER.match(name)
            if m is None:
                raise FormatError(f"tensor {name}: llama-quantize cannot tell its layer")
            i_layer = int(m.group(1))
            if not 0 <= i_layer < n_layer:
                raise FormatError(f"tensor {name}: layer {i_layer} is not in [0, {n_layer})")
        return i_layer, n_layer

    def type(self, name: str, shape: Sequence[int]) -> str:
        cat, ftype, model = category(name), self.ftype, self.model
        falcon = model.arch == "falcon"
        new = _DEFAULT_TYPE[ftype]
        if cat == "output" or (self.tied and cat == "token_embd"):
            if falcon or shape[-1] % _block(new):
                new = "Q8_0"
            elif new != "Q8_0":
                new = "Q6_K"
        elif cat == "token_embd":
            pass
        elif cat == "attn_v":
            if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new = "Q6_K"
            elif ftype == "q4_k_s" and self.i_attention_wv < 4:
                new = "Q5_K"
            if model.is_70b and new in ("Q3_K", "Q4_K"):
                new = "Q5_K"
            if model.n_expert == 8:
                new = "Q8_0"
            self.i_attention_wv += 1
        elif cat == "attn_k":
            if model.n_expert == 8:
                new = "Q8_0"
        elif cat == "ffn_down":
            i, n = self._layer_info(self.i_ffn_down, name)
            if ftype == "q4_k_m":
                if falcon:
                    new = "Q6_K" if i < n // 16 else "Q5_K" if use_more_bits(i, n) else "Q4_K"
                elif use_more_bits(i, n):
                    new = "Q6_K"
            elif ftype == "q5_k_m" and use_more_bits(i, n):
                new = "Q6_K"
            elif ftype == "q4_k_s" and not falcon and i < n // 8:
                new = "Q5_K"
            self.i_ffn_down += 1
        elif cat == "attn_output":
            if not falcon and model.n_expert == 8 and ftype in ("q4_k_s", "q4_k_m"):
                new = "Q5_K"
        elif cat == "ffn_gate":
            self._layer_info(self.i_ffn_gate, name)
            self.i_ffn_gate += 1
        elif cat == "ffn_up":
            self._layer_info(self.i_ffn_up, name)
            self.i_ffn_up += 1
        return _fallback(shape[-1], new)


def quantized_types(
    outtype: str, model: ModelInfo, tensors: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, int]:
    """The ggml type llama-quantize gives each tensor it quantizes, by GGUF name.

    ``tensors`` are (GGUF name, row-major shape) in any order; the tensors left out of the
    answer keep the input's type (norms, biases, 1-D tensors, the router).
    """
    names = order([name for name, _ in tensors])
    shapes = dict(tensors)
    mix = _Mix(outtype, model, names)
    return {name: int(gguf.GGMLQuantizationType[mix.type(name, shapes[name])])
            for name in names if allows_quantization(name, shapes[name])}
