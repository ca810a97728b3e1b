"""transformers' reading of a config.json, as llama.cpp's converter gets it, without transformers.

The converter reads a model's hyperparameters as ``AutoConfig.from_pretrained(dir).to_dict()``
(and config.json as it is when that raises). Importing transformers and a config class costs
1.5-2.3 s, most of a GGUF plan of the models whose tokenizer needs no transformers (LLaMA's and
Phi-3's sentencepiece, Gemma's). :func:`auto_config_dict` makes that dict here, for the model
types ``gguf_arch`` writes, as transformers 5.25 makes it: each config class's dataclass fields
and defaults (``_CLASSES``), its ``attribute_map``, its ``__post_init__`` and RoPE
standardisation, and the keys its base class pops or renames. Where it cannot be sure of what
transformers does it returns None and the caller asks ``AutoConfig``: another transformers
release, a value of a type the class's strict validation refuses (``AutoConfig`` then raises,
and the converter reads config.json as it is), a key that is an attribute of the class, a
sub-config, a RoPE dict of a shape not listed here. A wrong header is worse than a slow one.

``tests/gguf/test_gguf_config.py`` checks the tables against transformers' classes and the
dicts against ``AutoConfig`` for every key the GGUF plan reads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# The transformers releases whose config classes these tables are (checked by the test).
VERIFIED_TRANSFORMERS = ("5.25.",)

# PreTrainedConfig's own dataclass fields: name -> (default, type code of :func:`_fits`). Their
# annotations are strings there, which strict validation skips: these codes take less, on purpose.
BASE_FIELDS: dict[str, tuple[Any, str]] = {
    "transformers_version": (None, "str?"), "architectures": (None, "strs?"),
    "output_hidden_states": (False, "bool?"), "return_dict": (True, "bool?"), "dtype": (None, "dtype"),
    "chunk_size_feed_forward": (0, "int"), "is_encoder_decoder": (False, "bool"),
    "id2label": (None, "none"), "label2id": (None, "none"), "problem_type": (None, "none"),
}
# What ``__post_init__`` pops from the keys that are not fields: generation parameters, dropped.
GENERATION_KEYS = frozenset((
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "suppress_tokens", "target_lookbehind", "temperature", "top_k", "top_p",
    "typical_p", "use_cache",
))
# Names a config class has besides its fields (methods, properties, class variables): a key of
# config.json with one of these names is set over it, with effects not followed here.
CLASS_ATTRIBUTES = frozenset((
    "allow_global_per_layer_attribute_access", "attribute_map", "base_config_key", "base_model_ep_plan",
    "base_model_fsdp_plan", "base_model_pp_plan", "base_model_tp_plan", "convert_rope_params_to_dict",
    "default_config_fields", "default_rope_type", "default_theta", "dict_dtype_to_str", "extra_config_files",
    "extra_files", "from_dict", "from_json_file", "from_pretrained", "get_config_dict", "get_mtp_config",
    "get_text_config", "head_dim", "ignore_keys_at_rope_validation", "is_custom_code", "is_heterogeneous",
    "is_remote_code", "model_type", "name_or_path", "nested_rope_parameter_keys", "num_labels",
    "output_attentions", "per_layer_attributes", "per_layer_config", "push_to_hub", "register_for_auto_class",
    "rope_scaling", "rotary", "save_pretrained", "serialize_explicit_per_layer_config",
    "standardize_rope_params", "sub_configs", "sub_configs_defaults", "to_dict", "to_diff_dict",
    "to_json_file", "to_json_string", "torch_dtype", "update", "update_from_string", "use_return_dict",
    "validate",
    "validate_architecture", "validate_layer_type", "validate_output_attentions", "validate_rope",
    "validate_token_ids",
))
# Keys not followed here (an attribute set differently, a sub-config, per-layer or encoder-decoder
# configs, what get_text_config or the validators read): the caller asks AutoConfig.
_UNSURE_KEYS = frozenset((
    "attn_implementation", "experts_implementation", "output_attentions", "per_layer_config", "num_labels",
    "name_or_path", "configuration_files", "mtp_layer_types", "decoder", "generator", "text_config",
    "text_encoder", "num_heads", "embed_dim", "distributed_config",
)) | (CLASS_ATTRIBUTES - {"model_type", "rope_scaling", "torch_dtype"})
# Keys starting with "_" that are set as they are (Gemma 3's saved pattern is set after its use).
_PRIVATE_KEYS = frozenset(("_name_or_path", "_commit_hash", "_sliding_window_pattern"))
_DTYPES = frozenset(("float16", "bfloat16", "float32", "float64"))
_LAYER_TYPES = frozenset(("full_attention", "sliding_attention"))
_DICT_KEYS = frozenset(("rope_parameters", "rope_scaling", "auto_map", "quantization_config"))
# Keys transformers removes or renames inside any dict of the config (``dict_dtype_to_str``,
# ``_remove_keys_not_serialized``, ``_decode_special_floats``).
_NESTED_KEYS = frozenset((
    "dtype", "__float__", "_is_quantized", "_auto_class", "_commit_hash", "_attn_implementation_internal",
    "_experts_implementation_internal", "_post_init_done", "ignore_keys_at_rope_validation",
    "base_model_tp_plan", "base_model_pp_plan", "base_model_fsdp_plan", "distributed_config",
    "_output_attentions",
))
# RoPE types: the keys their validation requires (``_validate_*_rope_parameters``), others warn.
_ROPE_REQUIRED = {
    "default": frozenset(),
    "linear": frozenset(("factor",)),
    "dynamic": frozenset(("factor",)),
    "yarn": frozenset(("factor", "original_max_position_embeddings")),
    "longrope": frozenset(("short_factor", "long_factor", "original_max_position_embeddings")),
    "llama3": frozenset(("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                         "rope_theta")),
}
_ROPE_LISTS = frozenset(("short_factor", "long_factor"))


class Unsure(Exception):
    """What transformers does with this config is not followed here: ask AutoConfig."""


@dataclass(frozen=True)
class _Class:
    """One transformers config class: its fields (name -> (default, type code)), the rest as flags."""

    fields: dict[str, tuple[Any, str]]
    post_init: Callable[[dict[str, Any], dict[str, Any]], None]
    rope: str = "base"  # its convert_rope_params_to_dict: base, phi3, gpt_neox, gemma3, none
    default_theta: float = 10_000.0
    attribute_map: dict[str, str] = field(default_factory=dict)
    divisible_heads: bool = False  # validate_architecture: hidden_size % num_attention_heads
    head_dim_property: bool = False  # head_dim is hidden_size // num_attention_heads, not a field


def _fits(value: Any, code: str) -> bool:
    """Whether huggingface_hub's strict type validation takes ``value`` for a field of type ``code``."""
    if code.endswith("?"):
        return value is None or _fits(value, code[:-1])
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if code in ("int", "num"):
        return is_int or (code == "num" and isinstance(value, float))
    if code == "float01":  # LlamaConfig's interval(0, 1)
        return isinstance(value, float) and 0.0 <= value <= 1.0
    if code in ("ids", "strs"):
        item = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if code == "ids" else (
            lambda v: isinstance(v, str))
        return (code == "ids" and (is_int or value is None)) or (
            isinstance(value, list) and all(map(item, value)))
    if code == "dtype":
        return value is None or (isinstance(value, str) and value in _DTYPES)
    if code == "none":
        return value is None
    return isinstance(value, {"float": float, "bool": bool, "str": str, "dict": dict}[code])


def _llama(v: dict[str, Any], kw: dict[str, Any]) -> None:
    if v["head_dim"] is None:
        v["head_dim"] = v["hidden_size"] // v["num_attention_heads"]
    _kv_heads(v, kw)


def _kv_heads(v: dict[str, Any], kw: dict[str, Any]) -> None:
    if v["num_key_value_heads"] is None:
        v["num_key_value_heads"] = v["num_attention_heads"]


def _qwen(v: dict[str, Any], kw: dict[str, Any]) -> None:
    v["sliding_window"] = v["sliding_window"] if v["use_sliding_window"] else None
    _kv_heads(v, kw)
    if v["layer_types"] is None:
        window, first = v["sliding_window"], v["max_window_layers"]
        v["layer_types"] = ["sliding_attention" if window is not None and i >= first else "full_attention"
                            for i in range(v["num_hidden_layers"])]


def _gemma(v: dict[str, Any], kw: dict[str, Any]) -> None:
    if v["hidden_act"] == "gelu":
        v["hidden_act"] = "gelu_pytorch_tanh"


def _gemma2(v: dict[str, Any], kw: dict[str, Any]) -> None:
    if v["layer_types"] is None:
        v["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                            for i in range(v["num_hidden_layers"])]


def _gemma3(v: dict[str, Any], kw: dict[str, Any]) -> None:
    if v["use_bidirectional_attention"]:
        if v["sliding_window"] is None:
            raise Unsure("bidirectional attention without a sliding window")
        v["sliding_window"] = v["sliding_window"] // 2 + 1  # to_dict gives back (it - 1) * 2
    pattern = kw.get("sliding_window_pattern", 6)
    if not _fits(pattern, "int") or pattern < 1:
        raise Unsure("sliding_window_pattern")
    v["_sliding_window_pattern"] = pattern
    if v["layer_types"] is None:
        v["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                            for i in range(v["num_hidden_layers"])]


def _falcon(v: dict[str, Any], kw: dict[str, Any]) -> None:
    _n_embed(v, kw)
    v["num_kv_heads"] = v["num_attention_heads"] if v["num_kv_heads"] is None else v["num_kv_heads"]
    grouped = v["new_decoder_architecture"] or not v["multi_query"]
    v["num_key_value_heads"] = v["num_kv_heads"] if grouped else 1
    if v["ffn_hidden_size"] is None:
        v["ffn_hidden_size"] = v["hidden_size"] * 4


def _n_embed(v: dict[str, Any], kw: dict[str, Any]) -> None:
    n_embed = kw.pop("n_embed", None)
    if n_embed is not None:
        if not _fits(n_embed, "int"):
            raise Unsure("n_embed")
        v["hidden_size"] = n_embed


def _nothing(v: dict[str, Any], kw: dict[str, Any]) -> None:
    return None


def _fields(text: str, **defaults: Any) -> dict[str, tuple[Any, str]]:
    """``"name:code name:code"`` with the defaults by name: a class's field table, tersely."""
    return {name: (defaults[name], code) for name, code in (item.split(":") for item in text.split())}


_DECODER = ("vocab_size:int hidden_size:int intermediate_size:int num_hidden_layers:int "
            "num_attention_heads:int "
            "hidden_act:str max_position_embeddings:int initializer_range:float rms_norm_eps:float "
            "use_cache:bool pad_token_id:int? bos_token_id:int? eos_token_id:ids tie_word_embeddings:bool "
            "rope_parameters:dict? ")
_COMMON = dict(hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
               pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
               rope_parameters=None, attention_dropout=0.0)
_QWEN = dict(_COMMON, vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768, bos_token_id=None,
             eos_token_id=None, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
             layer_types=None, head_dim=128, attention_bias=False)
_GEMMA = dict(_COMMON, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", pad_token_id=0,
              eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
              use_bidirectional_attention=None, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
              layer_types=None)
_GEMMA2 = _DECODER.replace("hidden_act:str", "hidden_activation:str") + (
    "num_key_value_heads:int head_dim:int attention_bias:bool attention_dropout:num? "
    "query_pre_attn_scalar:int "
    "sliding_window:int? layer_types:strs? final_logit_softcapping:float? attn_logit_softcapping:float? "
    "use_bidirectional_attention:bool?")

_CLASSES: dict[str, _Class] = {
    "llama": _Class(_fields(
        _DECODER.replace("initializer_range:float", "initializer_range:float01")
        + "num_key_value_heads:int? pretraining_tp:int? attention_bias:bool attention_dropout:num? "
        "mlp_bias:bool head_dim:int?", **_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
        pretraining_tp=1, attention_bias=False, mlp_bias=False, head_dim=None), _llama, divisible_heads=True),
    "mistral": _Class(_fields(
        _DECODER + "num_key_value_heads:int head_dim:int? sliding_window:int? attention_dropout:num",
        **_COMMON, vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, max_position_embeddings=4096 * 32,
        sliding_window=4096), _llama),
    "mixtral": _Class(_fields(
        _DECODER + "num_key_value_heads:int head_dim:int? sliding_window:int? attention_dropout:num "
        "num_experts_per_tok:int num_local_experts:int output_router_logits:bool router_aux_loss_coef:float "
        "router_jitter_noise:float", **dict(_COMMON, rms_norm_eps=1e-5), vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=None, max_position_embeddings=4096 * 32, sliding_window=None, num_experts_per_tok=2,
        num_local_experts=8, output_router_logits=False, router_aux_loss_coef=0.001, router_jitter_noise=0.0),
        _kv_heads, default_theta=1_000_000.0, attribute_map={"num_experts": "num_local_experts"}),
    "qwen2": _Class(_fields(
        _DECODER + "num_key_value_heads:int? use_sliding_window:bool sliding_window:int? "
        "max_window_layers:int layer_types:strs? attention_dropout:num", **_QWEN), _qwen),
    "qwen3": _Class(_fields(
        _DECODER + "num_key_value_heads:int? head_dim:int attention_bias:bool use_sliding_window:bool "
        "sliding_window:int? max_window_layers:int layer_types:strs? attention_dropout:num", **_QWEN), _qwen),
    "gemma": _Class(_fields(
        _DECODER + "num_key_value_heads:int head_dim:int attention_bias:bool attention_dropout:num "
        "use_bidirectional_attention:bool?", **_GEMMA, vocab_size=256000, hidden_size=3072,
        intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=8192), _gemma),
    "gemma2": _Class(_fields(
        _GEMMA2, **_GEMMA, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
        final_logit_softcapping=30.0, attn_logit_softcapping=50.0), _gemma2, divisible_heads=True),
    "gemma3_text": _Class(_fields(
        _GEMMA2, **dict(
            _GEMMA, use_bidirectional_attention=False), vocab_size=262_208, hidden_size=2304,
        intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=131_072, final_logit_softcapping=None, attn_logit_softcapping=None),
        _gemma3, rope="gemma3", default_theta=1_000_000.0, divisible_heads=True),
    "phi3": _Class(_fields(
        _DECODER + "num_key_value_heads:int? resid_pdrop:num embd_pdrop:num attention_dropout:num "
        "original_max_position_embeddings:int sliding_window:int?", **dict(_COMMON, rms_norm_eps=1e-5),
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, resid_pdrop=0.0, embd_pdrop=0.0,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096, sliding_window=None) | {
            "eos_token_id": (32000, "ids"), "pad_token_id": (32000, "int?")}, _kv_heads, rope="phi3"),
    "falcon": _Class(_fields(
        "vocab_size:int hidden_size:int num_hidden_layers:int num_attention_heads:int "
        "num_ln_in_parallel_attn:int? "
        "layer_norm_epsilon:float? initializer_range:float use_cache:bool hidden_dropout:num? "
        "attention_dropout:num? num_kv_heads:int? alibi:bool? new_decoder_architecture:bool? "
        "multi_query:bool? "
        "parallel_attn:bool? bias:bool? max_position_embeddings:int rope_parameters:dict? bos_token_id:int? "
        "eos_token_id:ids pad_token_id:int? ffn_hidden_size:int? activation:str? tie_word_embeddings:bool",
        vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
        num_ln_in_parallel_attn=None, layer_norm_epsilon=1e-5, initializer_range=0.02, use_cache=True,
        hidden_dropout=0.0, attention_dropout=0.0, num_kv_heads=None, alibi=False,
        new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
        max_position_embeddings=2048, rope_parameters=None,
        bos_token_id=11, eos_token_id=11, pad_token_id=None, ffn_hidden_size=None, activation="gelu",
        tie_word_embeddings=True), _falcon, head_dim_property=True),
    "bloom": _Class(_fields(
        "vocab_size:int hidden_size:int n_layer:int n_head:int layer_norm_epsilon:float "
        "initializer_range:float use_cache:bool bos_token_id:int? eos_token_id:ids pad_token_id:int? "
        "apply_residual_connection_post_layernorm:bool hidden_dropout:num attention_dropout:num "
        "pretraining_tp:int slow_but_exact:bool "
        "tie_word_embeddings:bool", vocab_size=250880, hidden_size=64, n_layer=2, n_head=8,
        layer_norm_epsilon=1e-5, initializer_range=0.02, use_cache=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
        attention_dropout=0.0, pretraining_tp=1, slow_but_exact=False, tie_word_embeddings=True),
        _n_embed, rope="none",
        attribute_map={"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}),
    "gpt_neox": _Class(_fields(
        "vocab_size:int hidden_size:int num_hidden_layers:int num_attention_heads:int intermediate_size:int "
        "hidden_act:str attention_dropout:num hidden_dropout:num classifier_dropout:num "
        "max_position_embeddings:int "
        "initializer_range:float layer_norm_eps:float use_cache:bool bos_token_id:int? eos_token_id:ids "
        "pad_token_id:int? tie_word_embeddings:bool use_parallel_residual:bool rope_parameters:dict? "
        "attention_bias:bool is_decoder:bool", vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
        num_attention_heads=64, intermediate_size=24576, hidden_act="gelu", attention_dropout=0.0,
        hidden_dropout=0.0, classifier_dropout=0.1, max_position_embeddings=2048, initializer_range=0.02,
        layer_norm_eps=1e-5, use_cache=True, bos_token_id=0, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False, use_parallel_residual=True, rope_parameters=None, attention_bias=True,
        is_decoder=False), _nothing, rope="gpt_neox", divisible_heads=True),
}


def model_types() -> list[str]:
    return list(_CLASSES)


def class_fields(model_type: str) -> dict[str, tuple[Any, str]]:
    """The fields of ``model_type``'s config class, as the table has them (base class's first)."""
    return {**BASE_FIELDS, **_CLASSES[model_type].fields}


def verified_transformers() -> bool:
    """Whether the installed transformers is one these tables were checked against (or none is
    installed: then the converter's own environment is the reference)."""
    try:
        installed = version("transformers")
    except PackageNotFoundError:
        return True
    return installed.startswith(VERIFIED_TRANSFORMERS)


def auto_config_dict(config: dict[str, Any]) -> dict[str, Any] | None:
    """``AutoConfig.from_pretrained(folder).to_dict()`` for config.json ``config``, or None where
    this module cannot be sure of it (the caller then asks ``AutoConfig``). Keys only transformers
    adds for its own bookkeeping (``_name_or_path``, ``transformers_version``...) may differ."""
    model_type = config.get("model_type")
    cls = _CLASSES.get(model_type) if isinstance(model_type, str) else None
    if cls is None or not verified_transformers():
        return None
    try:
        return _to_dict(model_type, cls, copy.deepcopy(config))
    except Unsure:
        return None


def _to_dict(model_type: str, cls: _Class, config: dict[str, Any]) -> dict[str, Any]:
    """The class's ``__init__`` (fields, ``__post_init__``, its base's), validators, ``to_dict``."""
    _check_keys(cls, config)
    fields = {**BASE_FIELDS, **cls.fields}
    values: dict[str, Any] = {}
    for name, (default, code) in fields.items():
        value = config.pop(name, default)
        if not _fits(value, code):
            raise Unsure(name)
        values[name] = value
    kwargs = config  # what is left: the keys that are not fields
    _check_counts(values)
    cls.post_init(values, kwargs)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None and values["dtype"] is None:
        if not _fits(torch_dtype, "dtype"):
            raise Unsure("torch_dtype")
        values["dtype"] = torch_dtype
    values["id2label"] = {0: "LABEL_0", 1: "LABEL_1"}
    values["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    _ROPE[cls.rope](cls, values, kwargs)
    for key in GENERATION_KEYS:
        kwargs.pop(key, None)
    kwargs.pop("_commit_hash", None)
    for key, value in kwargs.items():
        target = cls.attribute_map.get(key, key)
        if target in fields and not _fits(value, fields[target][1]):
            raise Unsure(key)
        values[target] = value
    _check_counts(values)
    if cls.divisible_heads and values["hidden_size"] % values["num_attention_heads"]:
        raise Unsure("hidden_size")  # validate_architecture raises: the converter reads config.json as it is
    _validate(cls, values)
    values["model_type"] = model_type
    values["output_attentions"] = False
    if cls.rope == "gemma3" and values["use_bidirectional_attention"]:
        values["sliding_window"] = (values["sliding_window"] - 1) * 2
    return values


def _check_keys(cls: _Class, config: dict[str, Any]) -> None:
    for key, value in config.items():
        if key not in cls.fields and key not in BASE_FIELDS:
            if key in _UNSURE_KEYS or (key.startswith("_") and key not in _PRIVATE_KEYS):
                raise Unsure(key)
            if key == "layer_types":  # it would nest rope_parameters (and make a Mistral a Ministral)
                raise Unsure(key)
        if isinstance(value, dict) and key not in _DICT_KEYS:
            raise Unsure(key)
        if _nested_keys(value) & _NESTED_KEYS:
            raise Unsure(key)
    auto_map = config.get("auto_map")
    if auto_map is not None and not (
            isinstance(auto_map, dict) and isinstance(auto_map.get("AutoConfig", ""), str)):
        raise Unsure("auto_map")
    if config.get("is_encoder_decoder"):
        raise Unsure("is_encoder_decoder")


def _nested_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*map(_nested_keys, value.values()))
    if isinstance(value, list):
        return set().union(*map(_nested_keys, value))
    return set()


def _check_counts(values: dict[str, Any]) -> None:
    """The counts ``__post_init__`` and the validators divide by or count with: positive only."""
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "n_head", "n_layer"):
        if name in values and values[name] <= 0:
            raise Unsure(name)


def _rope_base(cls: _Class, values: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``, then ``standardize_rope_params``."""
    rope = _rope_dict(kwargs.pop("rope_scaling", None) or values["rope_parameters"])
    rope.setdefault("rope_theta", kwargs.pop("rope_theta", cls.default_theta))
    if (factor := kwargs.pop("partial_rotary_factor", None)) is not None:
        rope.setdefault("partial_rotary_factor", factor)
    values["rope_parameters"] = _standardized(rope, values, cls)


def _rope_phi3(cls: _Class, values: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``Phi3Config.convert_rope_params_to_dict``: su and yarn are read as longrope."""
    rope = _rope_dict(kwargs.pop("rope_scaling", None) or values["rope_parameters"])
    rope.setdefault("rope_theta", kwargs.pop("rope_theta", 10_000.0))
    rope.setdefault("partial_rotary_factor", kwargs.get("partial_rotary_factor", 1.0))
    if rope.get("rope_type", rope.get("type")) in ("su", "yarn"):
        rope["rope_type"] = "longrope"
    values["rope_parameters"] = _standardized(rope, values, cls)


def _rope_gpt_neox(cls: _Class, values: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``GPTNeoXConfig.convert_rope_params_to_dict``: rotary_emb_base and rotary_pct moved in."""
    rope = _rope_dict(kwargs.pop("rope_scaling", None) or values["rope_parameters"])
    rope.setdefault("rope_theta", kwargs.pop("rotary_emb_base", cls.default_theta))
    rope.setdefault("partial_rotary_factor", kwargs.pop("rotary_pct", 0.25))
    values["rope_parameters"] = _standardized(rope, values, cls)


def _rope_gemma3(cls: _Class, values: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """``Gemma3TextConfig.convert_rope_params_to_dict``: one dict per attention type."""
    scaling = kwargs.pop("rope_scaling", None)
    rope = values["rope_parameters"]
    if rope is None:
        rope = {"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "default"}}
    if set(rope) - _LAYER_TYPES or not all(isinstance(r, dict) or r is None for r in rope.values()):
        raise Unsure("rope_parameters")
    if scaling is not None:
        if not isinstance(scaling, dict) or not isinstance(rope.get("full_attention"), dict):
            raise Unsure("rope_scaling")
        rope["full_attention"].update(scaling)
    theta = kwargs.pop("rope_theta", cls.default_theta)
    local = kwargs.pop("rope_local_base_freq", 10_000.0)
    for kind, kind_theta in (("full_attention", theta), ("sliding_attention", local)):
        if rope.get(kind) is None:
            rope[kind] = {"rope_type": "default"}
        rope[kind].setdefault("rope_theta", kind_theta)
    for kind in sorted(set(values["layer_types"]) & set(rope)):
        rope[kind].setdefault("rope_type", rope[kind].get("type", "default"))
        if rope[kind]["rope_type"] in ("llama3", "yarn", "longrope"):
            rope[kind].setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    values["rope_parameters"] = rope


def _rope_none(cls: _Class, values: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """A class without rope_parameters (BLOOM): RoPE keys would be standardised all the same."""
    if {"rope_scaling", "rope_theta", "rope_parameters", "partial_rotary_factor"} & set(kwargs):
        raise Unsure("rope")


_ROPE: dict[str, Callable[[_Class, dict[str, Any], dict[str, Any]], None]] = {
    "base": _rope_base, "phi3": _rope_phi3, "gpt_neox": _rope_gpt_neox, "gemma3": _rope_gemma3,
    "none": _rope_none,
}


def _rope_dict(rope: Any) -> dict[str, Any]:
    if rope is None:
        return {}
    if not isinstance(rope, dict) or set(rope) & _LAYER_TYPES:
        raise Unsure("rope_parameters")  # not a dict, or one per layer type: not followed here
    return rope


def _standardized(rope: dict[str, Any], values: dict[str, Any], cls: _Class) -> dict[str, Any]:
    """``standardize_rope_params`` of a flat dict (the config has no rope_theta attribute then)."""
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cls.fields:  # Phi-3's, outside the dict, wins
            rope["original_max_position_embeddings"] = values["original_max_position_embeddings"]
        else:
            rope.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    return rope


def _validate(cls: _Class, values: dict[str, Any]) -> None:
    """The class validators that raise (``validate_layer_type``, ``validate_rope``), as Unsure."""
    layer_types = values.get("layer_types")
    if layer_types is not None and (not set(layer_types) <= _LAYER_TYPES
                                    or len(layer_types) != values["num_hidden_layers"]):
        raise Unsure("layer_types")
    rope = values.get("rope_parameters")
    if not rope:
        return
    head_dim = values.get("head_dim")  # getattr(config, "head_dim", None)
    if cls.head_dim_property:
        head_dim = values["hidden_size"] // values["num_attention_heads"]
    kinds = [rope[k] for k in sorted(set(layer_types or ()) & set(rope))] if cls.rope == "gemma3" else [rope]
    for params in kinds:
        _validate_rope(params, values, head_dim, cls)


def _validate_rope(rope: dict[str, Any], values: dict[str, Any], head_dim: Any, cls: _Class) -> None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    required = _ROPE_REQUIRED.get(kind) if isinstance(kind, str) else None
    if required is None or not required <= set(rope):
        raise Unsure("rope_type")
    for key, value in rope.items():
        if key in ("rope_type", "type"):
            ok = isinstance(value, str)
        elif key in _ROPE_LISTS:
            ok = isinstance(value, list) and all(_fits(x, "num") for x in value)
        else:
            ok = _fits(value, "num") and (key != "original_max_position_embeddings" or value > 0)
        if not ok:
            raise Unsure(f"rope_parameters[{key!r}]")
    factor = rope.get("partial_rotary_factor", 1.0)
    if head_dim is not None and not _fits(head_dim, "int"):
        raise Unsure("head_dim")
    if head_dim is not None and head_dim > 4 and head_dim % 2 and int(head_dim * factor) == head_dim:
        raise Unsure("odd head_dim")
    if kind == "longrope" and head_dim is None and "head_dim" in values:
        raise Unsure("head_dim")
    if cls.rope == "phi3":
        dims = int(values["hidden_size"] // values["num_attention_heads"] * factor) // 2
        if kind not in ("default", "longrope") or any(
                len(rope[key]) != dims for key in _ROPE_LISTS if rope.get(key) is not None):
            raise Unsure("phi3 rope")
