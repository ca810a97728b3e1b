"""``gguf_kv.hparams`` gives, without transformers, what the converter reads: ``AutoConfig``'s dict.

For each supported architecture, over transformers' own default config, configs shaped as the
published models' config.json files and the ones the architecture tests build, the GGUF plan is
made on ``AutoConfig.from_pretrained(folder).to_dict()`` (config.json as it is where that raises,
as the converter does) wrapped in a dict that records every key read; ``hparams``, kept from
``AutoConfig``, must give each of those keys the same value, of the same type, nested dicts
included (or lack it as well). Configs whose reading ``gguf_config`` does not follow (a type the
class's validation refuses, an unknown model type, a sub-config...) must go to ``AutoConfig``.
The tables themselves are checked against transformers' classes: fields, defaults, the types
strict validation takes, attribute maps, the names a class has besides its fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from llamacpp import llamacpp_dir

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from deltamerge.errors import UnsupportedError  # noqa: E402
from deltamerge.sinks import gguf_config, gguf_kv  # noqa: E402
from deltamerge.sinks.gguf import plan_gguf  # noqa: E402
from deltamerge.sinks.gguf_arch import bpe  # noqa: E402

# --- configs shaped as published models' config.json (sizes and keys as released) -----------------

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
LLAMA31_8B = {
    **LLAMA2_7B, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "intermediate_size": 14336,
    "max_position_embeddings": 131072, "num_key_value_heads": 8, "rope_theta": 500000.0, "mlp_bias": False,
    "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "vocab_size": 128256,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWEN25_05B = {
    **QWEN25_7B, "eos_token_id": 151643, "hidden_size": 896, "intermediate_size": 4864,
    "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "sliding_window": 32768, "tie_word_embeddings": True, "vocab_size": 151936,
    "max_position_embeddings": 32768,
}
QWEN25_7B_YARN = {**QWEN25_7B, "max_position_embeddings": 131072, "rope_scaling": {
    "factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B = {**QWEN3_8B, "hidden_size": 1024, "intermediate_size": 3072, "max_window_layers": 28,
             "num_attention_heads": 16, "num_hidden_layers": 28, "tie_word_embeddings": True}
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0", "use_cache": True, "vocab_size": 256000,
}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1,
    107],
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1,
    106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
GEMMA3_TEXT_LINEAR = {**GEMMA3_1B, "hidden_size": 2560, "intermediate_size": 10240, "num_attention_heads": 8,
                      "num_hidden_layers": 34, "num_key_value_heads": 4, "max_position_embeddings": 131072,
                      "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}
PHI3_MINI_4K = {
    "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                 "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
    "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
    "model_type": "phi3",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True, "attention_bias": False,
    "vocab_size": 32064,
}


def _longrope(n: int, kind: str = "longrope") -> dict[str, Any]:
    return {"long_factor": [1.0 + i / 7 for i in range(n)], "short_factor": [1.0 + i / 100 for i in range(n)],
            "type": kind}


PHI3_MINI_128K = {**PHI3_MINI_4K, "max_position_embeddings": 131072, "sliding_window": 262144,
                  "rope_scaling": _longrope(48)}
PHI3_MINI_128K_SU = {**PHI3_MINI_128K, "rope_scaling": _longrope(48, "su")}
PHI3_MEDIUM_128K = {**PHI3_MINI_128K, "hidden_size": 5120, "intermediate_size": 17920,
                    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
                    "rope_scaling": _longrope(64)}
FALCON_7B = {
    "alibi": False, "apply_residual_connection_post_layernorm": False, "architectures": ["FalconForCausalLM"],
    "attention_dropout": 0.0, "auto_map": {"AutoConfig": "configuration_falcon.FalconConfig"}, "bias": False,
    "bos_token_id": 11, "eos_token_id": 11, "hidden_dropout": 0.0, "hidden_size": 4544,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True,
    "new_decoder_architecture": False,
    "num_attention_heads": 71, "num_hidden_layers": 32, "parallel_attn": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.27.4", "use_cache": True, "vocab_size": 65024,
}
FALCON_40B = {**FALCON_7B, "hidden_size": 8192, "new_decoder_architecture": True, "num_attention_heads": 128,
              "num_hidden_layers": 60, "num_kv_heads": 8}
# Falcon 7B's first config.json (RefinedWeb's keys), read as "falcon": n_head and n_layer are not
# FalconConfig's names, so AutoConfig gives its defaults beside them.
FALCON_RW_KEYS = {**{k: v for k, v in FALCON_7B.items() if k not in ("num_attention_heads",
    "num_hidden_layers",
                                                                      "hidden_size")},
                  "n_embed": 4544, "n_head": 71, "n_layer": 32}
BLOOM_560M = {
    "apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "bos_token_id": 1,
    "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True, "model_type": "bloom", "n_head": 16,
    "n_inner": None, "n_layer": 24, "offset_alibi": 100, "pad_token_id": 3, "pretraining_tp": 1,
    "skip_bias_add": True, "skip_bias_add_qkv": False, "slow_but_exact": False,
    "transformers_version": "4.27.0.dev0", "unk_token_id": 0, "use_cache": True, "vocab_size": 250880,
}
BLOOM_ALIASES = {**{k: v for k, v in BLOOM_560M.items() if k not in ("n_head", "n_layer")},
                 "num_attention_heads": 16, "num_hidden_layers": 24, "seq_length": 2048}
PYTHIA_160M = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12,
    "num_hidden_layers": 12, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}
PYTHIA_PCT = {**PYTHIA_160M, "rotary_pct": 0.5, "use_parallel_residual": False}
# Variants that take the other branches of the classes' __post_init__ and RoPE readings.
VARIANTS = {
    "llama-dynamic-rope": {**LLAMA2_7B, "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "rope_theta": 10000,
                           "max_length": 4096, "temperature": 0.6, "dtype": "float16"},
    "qwen2.5-sliding": {**QWEN25_05B, "use_sliding_window": True, "max_window_layers": 20,
    "sliding_window": 4096},
    "gemma3-bidirectional": {**GEMMA3_1B, "use_bidirectional_attention": True, "sliding_window": 513},
    "phi3-yarn": {**PHI3_MINI_128K, "rope_scaling": _longrope(48, "yarn")},
    "falcon-no-multi-query": {**FALCON_7B, "multi_query": False, "num_kv_heads": 71},
    "pythia-linear-rope": {**PYTHIA_160M, "rope_scaling": {"type": "linear", "factor": 2.0}},
}

# The configs the architecture tests build (tests/gguf/test_gguf_architectures.py and others).
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "max_position_embeddings": 256}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0 + i / 4 for i in range(8)],
            "short_factor": [1.0 + i / 8 for i in range(8)], "original_max_position_embeddings": 128}
BUILT = {
    "llama3-bpe": ("llama", {**TINY, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
    "qwen2-tiny": ("qwen2", {**TINY, "tie_word_embeddings": True}),
    "qwen3-tiny": ("qwen3", {**TINY, "tie_word_embeddings": True, "head_dim": 32}),
    "gemma-tiny": ("gemma", {**TINY, "head_dim": 16}),
    "gemma2-tiny": ("gemma2", {**TINY, "head_dim": 16}),
    "gemma3-tiny": ("gemma3_text", {**TINY, "head_dim": 16, "sliding_window": 32}),
    "phi3-longrope": ("phi3", {**TINY, "pad_token_id": 0, "original_max_position_embeddings": 128,
                               "max_position_embeddings": 512, "rope_parameters": LONGROPE}),
    "falcon-tiny": ("falcon", {"hidden_size": 64, "num_attention_heads": 8, "num_kv_heads": 2,
                               "num_hidden_layers": 2, "new_decoder_architecture": True, "bias": False}),
    "bloom-tiny": ("bloom", {"hidden_size": 64, "n_head": 4, "n_layer": 2}),
    "neox-tiny": ("gpt_neox", {**TINY, "rotary_pct": 0.5}),
    "mixtral-tiny": ("mixtral", {**TINY, "intermediate_size": 128, "num_local_experts": 10}),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "falcon": "FalconForCausalLM", "bloom": "BloomForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
SENTENCEPIECE = ("llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3")


def saved(model_type: str, **config: Any) -> dict[str, Any]:
    """The config.json transformers' own class writes (``save_pretrained``), as the tests' models have."""
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    cfg.architectures = [ARCHITECTURES[model_type]]
    return json.loads(cfg.to_json_string())


def published() -> dict[str, dict[str, Any]]:
    return {"llama2-7b": LLAMA2_7B, "llama3.1-8b": LLAMA31_8B, "mistral-7b": MISTRAL_7B,
            "mixtral-8x7b": MIXTRAL_8X7B, "qwen2.5-7b": QWEN25_7B, "qwen2.5-0.5b": QWEN25_05B,
            "qwen2.5-7b-yarn": QWEN25_7B_YARN, "qwen3-8b": QWEN3_8B, "qwen3-0.6b": QWEN3_06B,
            "gemma-2b": GEMMA_2B,
            "gemma2-2b": GEMMA2_2B, "gemma3-1b": GEMMA3_1B, "gemma3-text-linear": GEMMA3_TEXT_LINEAR,
            "phi3-mini-4k": PHI3_MINI_4K, "phi3-mini-128k": PHI3_MINI_128K,
            "phi3-mini-128k-su": PHI3_MINI_128K_SU,
            "phi3-medium-128k": PHI3_MEDIUM_128K, "falcon-7b": FALCON_7B, "falcon-40b": FALCON_40B,
            "falcon-rw-keys": FALCON_RW_KEYS, "bloom-560m": BLOOM_560M, "bloom-aliases": BLOOM_ALIASES,
            "pythia-160m": PYTHIA_160M, "pythia-pct": PYTHIA_PCT, **VARIANTS}


CASES = [*published(), *(f"defaults-{t}" for t in ARCHITECTURES), *BUILT]


def case_config(name: str) -> dict[str, Any]:
    if name.startswith("defaults-"):
        return saved(name.removeprefix("defaults-"))
    if name in BUILT:
        model_type, config = BUILT[name]
        return saved(model_type, **config)
    return published()[name]


# --- odd configs: gguf_config must leave them to AutoConfig ----------------------------------------

ODD = {
    "unknown-model-type": {**FALCON_7B, "model_type": "RefinedWebModel", "n_head": 71, "n_layer": 32},
    "no-model-type": {k: v for k, v in LLAMA2_7B.items() if k != "model_type"},
    "int-eps": {**LLAMA2_7B, "rms_norm_eps": 1},  # a float field given an int: AutoConfig raises
    "string-size": {**QWEN25_7B, "intermediate_size": "18944"},
    "initializer-out-of-range": {**LLAMA2_7B, "initializer_range": 2.0},
    "yarn-missing-factor": {**QWEN25_7B, "rope_scaling": {"type": "yarn",
    "original_max_position_embeddings": 4096}},
    "unknown-rope-type": {**QWEN25_7B, "rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}},
    "phi3-linear-rope": {**PHI3_MINI_4K, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "phi3-short-factors": {**PHI3_MINI_128K, "rope_scaling": _longrope(47)},
    "falcon-head-dim": {**FALCON_7B, "head_dim": 64},  # a property without a setter: AutoConfig raises
    "mistral-layer-types": {**MISTRAL_7B, "layer_types": ["full_attention"] * 32},  # read as Ministral
    "llama-indivisible": {**LLAMA2_7B, "hidden_size": 4100, "head_dim": 128},
    "unknown-dtype": {**LLAMA2_7B, "torch_dtype": "auto"},
    "sub-config": {**QWEN25_7B, "text_config": {"hidden_size": 8}},
    "gemma3-wrapper": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3",
                       "text_config": {**GEMMA3_1B, "architectures": None}},
    "llm-config": {**QWEN25_7B, "llm_config": {"hidden_size": 8}},
    "nested-dtype": {**QWEN25_7B, "quantization_config": {"quant_method": "bnb", "dtype": "float16"}},
    "num-labels": {**LLAMA2_7B, "num_labels": 3},
    "method-name": {**LLAMA2_7B, "to_dict": 1},
    "wrong-layer-count": {**QWEN3_8B, "layer_types": ["full_attention"] * 3},
    "bidirectional-without-window": {**GEMMA3_1B, "use_bidirectional_attention": True,
    "sliding_window": None},
}


# --- helpers ----------------------------------------------------------------------------------------

def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, all the way down (1 and 1.0 differ; NaN is NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


class Recorder(dict):
    """The hparams dict, noting each key the plan asks for (``ALL`` when it reads the whole dict)."""

    ALL = "*"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)

    def _whole(self, name: str) -> Any:
        self.read.add(self.ALL)
        return getattr(super(), name)

    def __iter__(self):  # noqa: ANN204
        return self._whole("__iter__")()

    def keys(self):  # noqa: ANN201
        return self._whole("keys")()

    def items(self):  # noqa: ANN201
        return self._whole("items")()

    def values(self):  # noqa: ANN201
        return self._whole("values")()

    def copy(self) -> dict[str, Any]:
        return self._whole("copy")()


def reference(folder: Path) -> dict[str, Any]:
    """What the converter's ``load_hparams`` reads (its renames aside)."""
    try:
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001 - the converter's own fallback, whatever AutoConfig raised
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@functools.cache
def gpt2_tokenizer() -> Any:
    return transformers.AutoTokenizer.from_pretrained(llamacpp_dir() / "tokenizers" / "gpt-2")


def model_folder(root: Path, config: dict[str, Any], sp_model: bytes) -> Path:
    folder = root / "model"
    if config.get("model_type") in SENTENCEPIECE:
        folder.mkdir()
        (folder / "tokenizer.model").write_bytes(sp_model)
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    else:
        shutil.copytree(llamacpp_dir() / "tokenizers" / "gpt-2", folder)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tensor_specs(folder: Path, h: dict[str, Any]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The checkpoint's tensors (names, dtypes, shapes) for the config, from transformers' model on
    the meta device; Mixtral's experts under their checkpoint names, one tensor each."""
    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    specs = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and h.get("tie_word_embeddings"):
            continue
        if ".mlp.experts." in name:
            continue
        if name.endswith(".mlp.gate.weight"):
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            layer = name.split(".")[2]
            for e in range(h["num_local_experts"]):
                for kind, shape in (("w1", (h["intermediate_size"], h["hidden_size"])),
                                    ("w2", (h["hidden_size"], h["intermediate_size"])),
                                    ("w3", (h["intermediate_size"], h["hidden_size"]))):
                    specs.append((f"model.layers.{layer}.block_sparse_moe.experts.{e}.{kind}.weight",
                                  torch.float16, shape))
        specs.append((name, torch.float16, tuple(t.shape)))
    return specs


# --- the tests --------------------------------------------------------------------------------------

# The tables follow one transformers release; under another, hparams asks AutoConfig for every
# config (test_another_release_is_read_by_autoconfig), and these checks of the tables wait for
# someone to check them against it and add it to VERIFIED_TRANSFORMERS.
tables_checked = pytest.mark.skipif(
    not gguf_config.verified_transformers(),
    reason="transformers is a release gguf_config's tables were not checked against")


# multi_query Falcons (Falcon-7B's layout), whose fused qkv the pinned converter cannot regroup
# (transformers gives num_kv_heads = num_attention_heads): the plan refuses them as it fails.
CONVERTER_FAILS = {"falcon-7b", "falcon-rw-keys", "defaults-falcon"}


@tables_checked
@pytest.mark.parametrize("name", CASES)
def test_hparams_are_autoconfigs_for_every_key_the_plan_reads(tmp_path: Path, sp_model: bytes,
                                                               monkeypatch: pytest.MonkeyPatch, name: str):
    config = case_config(name)
    folder = model_folder(tmp_path, config, sp_model)
    specs = tensor_specs(folder, reference(folder))
    theirs = Recorder(reference(folder))
    monkeypatch.setattr(bpe, "auto_tokenizer", lambda folder: gpt2_tokenizer())
    with monkeypatch.context() as m:
        m.setattr(gguf_kv, "hparams", lambda config, folder=None: theirs)
        if name in CONVERTER_FAILS:  # the keys it read until it stopped are compared all the same
            with pytest.raises(UnsupportedError, match="multi_query"):
                plan_gguf(folder, specs, outtype="f16")
        else:
            plan_gguf(folder, specs, outtype="f16")
    assert theirs.read, "the plan read no hyperparameter"

    def no_transformers(config: dict[str, Any], folder: Path | None) -> dict[str, Any]:
        raise AssertionError(f"{name}: hparams asked AutoConfig")

    monkeypatch.setattr(gguf_kv, "_auto_config", no_transformers)
    ours = gguf_kv.hparams(json.loads((folder / "config.json").read_text()), folder)
    keys = set(theirs) | set(ours) if Recorder.ALL in theirs.read else theirs.read
    for key in sorted(keys - {Recorder.ALL, "transformers_version", "_name_or_path"}):
        assert (key in ours) == (key in theirs), (name, key)
        if key in ours:
            assert same(ours[key], dict.__getitem__(theirs, key)), (name, key, ours[key], theirs[key])


@pytest.mark.parametrize("name", list(ODD))
def test_configs_not_followed_are_read_by_autoconfig(tmp_path: Path, name: str):
    config = ODD[name]
    assert gguf_config.auto_config_dict(config) is None
    (tmp_path / "config.json").write_text(json.dumps(config))
    h = gguf_kv.hparams(config, tmp_path)
    theirs = reference(tmp_path)
    for alias in ("llm_config",):
        if alias in theirs:
            theirs["text_config"] = theirs[alias]
    assert same({k: v for k, v in h.items() if k != "_name_or_path"},
                {k: v for k, v in theirs.items() if k != "_name_or_path"})


PROBES = [0, 1, -1, 7, 1.5, 0.5, 2.0, 1e-6, True, False, None, "s", "float16", "auto", [1, 2], [1.0], ["a"],
          [], {}, {"a": 1}]


@tables_checked
@pytest.mark.parametrize("model_type", gguf_config.model_types())
def test_the_tables_are_transformers_classes(model_type: str):
    """Fields, defaults, the values strict validation takes, attribute maps, RoPE defaults and the
    names a class has besides its fields, as transformers has them."""
    cls = CONFIG_MAPPING[model_type]
    ours = gguf_config.class_fields(model_type)
    theirs = {f.name: f for f in dataclasses.fields(cls)}
    assert set(ours) == set(theirs)
    table = gguf_config._CLASSES[model_type]
    for name, (default, code) in ours.items():
        assert same(default, theirs[name].default), (model_type, name)
        for value in PROBES:
            try:
                for validator in cls.__validators__[name]:
                    validator(value)
                taken = True
            except (TypeError, ValueError):
                taken = False
            fits = gguf_config._fits(value, code)
            assert taken or not fits, (model_type, name, value)  # never take what transformers refuses
            if name not in gguf_config.BASE_FIELDS:  # the base class's take less, on purpose
                assert fits == taken, (model_type, name, value)
    assert table.attribute_map == cls.attribute_map
    theta = cls.default_theta["global"] if isinstance(cls.default_theta, dict) else cls.default_theta
    assert same(table.default_theta, theta)
    own = {n for n in dir(cls) if not n.startswith("_") and n not in theirs}
    assert own <= gguf_config.CLASS_ATTRIBUTES


@tables_checked
def test_generation_keys_are_transformers():
    assert gguf_config.GENERATION_KEYS == set(transformers.GenerationConfig._get_default_generation_params())


def test_another_release_is_read_by_autoconfig(monkeypatch: pytest.MonkeyPatch):
    """Under a transformers release the tables were not checked against, no config is made here:
    the caller asks AutoConfig, as the converter does."""
    config = case_config(CASES[0])
    monkeypatch.setattr(gguf_config, "version", lambda name: "5.25.0")
    assert gguf_config.auto_config_dict(config) is not None
    for release in ("5.26.0", "4.57.1", "5.2.0"):
        monkeypatch.setattr(gguf_config, "version", lambda name, release=release: release)
        assert not gguf_config.verified_transformers()
        assert gguf_config.auto_config_dict(config) is None


@tables_checked
def test_phi3_hparams_import_no_transformers(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI_128K))
    code = ("import sys, json, pathlib; from deltamerge.sinks import gguf_kv; "
            f"p = pathlib.Path({str(tmp_path)!r}); "
            "h = gguf_kv.hparams(json.loads((p / 'config.json').read_text()), p); "
            "assert h['rope_parameters']['rope_type'] == 'longrope'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
