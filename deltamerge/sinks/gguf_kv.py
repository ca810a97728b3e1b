"""The GGUF key/values llama.cpp's ``convert_hf_to_gguf.py`` writes for a LLaMA-family model.

Everything here is known before any weight is read: ``config.json``, the tokenizer files, the
model card and ``generation_config.json`` of the result folder, and the tensor table (for the
parameter count in ``general.size_label``). Keys are added in the converter's order, since a
GGUF file's bytes depend on it: ``general.*`` (its ``Metadata`` heuristics), the hyperparameters
(``TextModel``/``LlamaModel.set_gguf_parameters``), then the tokenizer (``LlamaModel.set_vocab``).

The converter reads ``config.json`` through transformers' ``AutoConfig``, which fills in defaults
a config may leave out (``head_dim``, ``rope_theta``, ``rms_norm_eps``...); :func:`hparams` derives
the same values without transformers, as transformers 4.45 and later (5.x included) do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FormatError, UnsupportedError

try:
    import gguf
except ImportError:
    gguf = None

try:
    from sentencepiece import SentencePieceProcessor
except ImportError:
    SentencePieceProcessor = None

# The architectures llama.cpp converts with its ``LlamaModel`` whose output is plain ``llama``.
ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")

# What ``AutoConfig`` fills in when config.json leaves a field out (LlamaConfig, MistralConfig).
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
    },
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6,
    },
}
_DEFAULT_ROPE_THETA = 10000.0
# Configs of mixture-of-experts or pre-quantized models: other converter classes, other keys.
_REFUSED_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "quantization_config",
                        "draft_vocab_size", "text_config", "mrope_section")
# SentencePiece token types, as the converter numbers them (its ``SentencePieceTokenTypes``).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"


def require_gguf() -> None:
    """GGUF output is an optional extra; say how to get it rather than fail on an import."""
    if gguf is None:
        raise UnsupportedError("GGUF output needs the gguf package: pip install 'deltamerge[gguf]'")


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: missing; GGUF output needs the model's config.json") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return config


def architecture(config: dict[str, Any], where: Path) -> str:
    """The Hugging Face architecture, refused unless it is one of the LLaMA family's."""
    arches = config.get("architectures")
    arch = arches[0] if isinstance(arches, list) and arches else None
    if arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"{where}: GGUF output supports LlamaForCausalLM and MistralForCausalLM (LLaMA 1/2, Vicuna, "
            f"Alpaca, Mistral), not {arch or 'a config without architectures'}")
    for key in _REFUSED_CONFIG_KEYS:
        if config.get(key) is not None:
            raise UnsupportedError(f"{where}: GGUF output of a {arch} with {key!r} is not supported")
    return arch


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """``AutoConfig.from_pretrained(folder).to_dict()`` for a LLaMA or Mistral config.

    The converter falls back to config.json as it is when ``AutoConfig`` cannot read it (an
    unknown ``model_type``), and so does this.
    """
    defaults = _CONFIG_DEFAULTS.get(str(config.get("model_type")))
    if defaults is None:
        return dict(config)
    h = {**defaults, **config}
    if h.get("num_key_value_heads") is None:
        h["num_key_value_heads"] = h["num_attention_heads"]
    if h.get("head_dim") is None:
        h["head_dim"] = h["hidden_size"] // h["num_attention_heads"]
    rope = dict(h.pop("rope_scaling", None) or h.get("rope_parameters") or {})
    rope.setdefault("rope_theta", h.pop("rope_theta", _DEFAULT_ROPE_THETA))
    rope.setdefault("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        rope.setdefault("original_max_position_embeddings", h["max_position_embeddings"])
    h["rope_parameters"] = rope
    return h


def _find(h: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((h[k] for k in keys if k in h), None)


def block_count(h: dict[str, Any], where: Path) -> int:
    n = _find(h, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    if not isinstance(n, int) or n <= 0:
        raise FormatError(f"{where}: num_hidden_layers must be a positive integer, found {n!r}")
    return n


def heads(h: dict[str, Any], where: Path) -> tuple[int, int]:
    """(n_head, n_head_kv), which the q and k permutations need."""
    n_head = _find(h, ("n_heads", "num_attention_heads"))
    n_kv = _find(h, ("n_kv_heads", "num_key_value_heads"))
    for name, n in (("num_attention_heads", n_head), ("num_key_value_heads", n_kv)):
        if not isinstance(n, int) or n <= 0:
            raise FormatError(f"{where}: {name} must be a positive integer, found {n!r}")
    return n_head, n_kv


def add_general(writer: Any, folder: Path, config: dict[str, Any], dir_name: str) -> Any:
    """``general.*``: the converter's ``Metadata.load`` heuristics, then ``set_gguf_meta_model``.

    ``dir_name`` is the folder name the converter would see (it names the model when nothing
    else does); the files are read from ``folder``, which may be a partial folder. Returns the
    ``gguf.Metadata``, whose fields also make the converter's default file name.
    """
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    card = gguf.Metadata.load_model_card(folder)
    meta = gguf.Metadata.apply_metadata_heuristic(gguf.Metadata(), card, config, Path(dir_name), total)
    generation = gguf.Metadata.load_generation_config(folder)
    if generation:
        for field in gguf.Metadata.__dataclass_fields__:
            if field.startswith("sampling_"):
                key = "temperature" if field == "sampling_temp" else field.removeprefix("sampling_")
                value = generation.get(key, getattr(meta, field))
                if field == "sampling_penalty_repeat":
                    value = generation.get(key, generation.get("repetition_penalty", getattr(meta, field)))
                setattr(meta, field, value)
    if meta.name is None:
        meta.name = dir_name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    return meta


def add_parameters(writer: Any, h: dict[str, Any], ftype: int, where: Path) -> None:
    """``TextModel.set_gguf_parameters`` then ``LlamaModel``'s, for the keys a LLaMA has."""
    writer.add_block_count(block_count(h, where))
    keys = (
        (("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
          "model_max_length"), writer.add_context_length),
        (("hidden_size", "n_embd", "dim"), writer.add_embedding_length),
        (("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner",
          "hidden_dim"), writer.add_feed_forward_length),
        (("num_attention_heads", "n_head", "n_heads"), writer.add_head_count),
        (("num_key_value_heads", "n_kv_heads"), writer.add_head_count_kv),
    )
    for names, add in keys:
        if (value := _find(h, names)) is not None:
            add(value)
    if h.get("is_causal") is False:
        writer.add_causal_attention(False)
    rope = _rope_parameters(h)
    _add_rope_scaling(writer, rope, where)
    if (theta := rope.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (eps := _find(h, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := _find(h, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        writer.add_layer_norm_eps(eps)
    if (head_dim := h.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)
    if "vocab_size" in h:
        writer.add_vocab_size(h["vocab_size"])
    n_head, _ = heads(h, where)
    writer.add_rope_dimension_count(h.get("head_dim") or h["hidden_size"] // n_head)


def _rope_parameters(h: dict[str, Any]) -> dict[str, Any]:
    """``TextModel.__init__``'s ``rope_parameters``: the config's, with the top-level values mirrored."""
    rope = dict(h.get("rope_parameters", h.get("rope_scaling")) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        raise UnsupportedError("GGUF output of per-layer-type RoPE parameters is not supported")
    theta = _find(h, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                      "rotary_emb_base"))
    if "rope_theta" not in rope and theta is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and (rope_type := rope.get("type")) is not None:
        rope["rope_type"] = rope_type
    original = h.get("original_max_position_embeddings")
    if "original_max_position_embeddings" not in rope and original is not None:
        rope["original_max_position_embeddings"] = original
    return rope


def _add_rope_scaling(writer: Any, rope: dict[str, Any], where: Path) -> None:
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if (value := rope.get(key)) is not None:
                add(value)
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            writer.add_rope_scaling_yarn_attn_factor(attn)
    elif isinstance(rope_type, str) and rope_type.lower() in ("llama3", "su", "longrope"):
        # llama3 adds a rope_freqs tensor, longrope per-model factors: not the survey's models.
        raise UnsupportedError(f"{where}: GGUF output with {rope_type!r} RoPE scaling is not supported")


def add_vocab(writer: Any, folder: Path, h: dict[str, Any]) -> None:
    """``LlamaModel.set_vocab``: sentencepiece's ``tokenizer.model``, else a Llama ``tokenizer.json``."""
    tokenizer_config = _json_file(folder / "tokenizer_config.json")
    if (folder / "tekken.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise UnsupportedError(f"{folder}: GGUF output of a Mistral tekken tokenizer is not supported")
    if tokenizer_config is not None:
        if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(add_prefix_space)
        if tokenizer_config.get("tokenizer_class") == "HybridDNATokenizer":
            raise UnsupportedError(f"{folder}: GGUF output of a HybridDNATokenizer is not supported")
    if (folder / "tokenizer.model").is_file():
        tokens, scores, toktypes = _sentencepiece_vocab(folder, h, tokenizer_config)
    elif (folder / "tokenizer.json").is_file():
        tokens, scores, toktypes = _llama_hf_vocab(folder)
    else:
        raise UnsupportedError(
            f"{folder}: GGUF output needs the tokenizer (tokenizer.model or tokenizer.json), found neither")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    vocab_size = h.get("vocab_size", 32000)
    if vocab_size == 32016:  # Code Llama's infill tokens
        special = gguf.SpecialVocab(folder, load_merges=False,
                                    special_token_types=["prefix", "suffix", "middle", "eot"])
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            special._set_special_token(typ, tid)
        special.add_to_gguf(writer, quiet=True)
    if vocab_size == 49152:
        writer.add_add_bos_token(False)


def _json_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a JSON object")
    return obj


def _looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece_vocab(
    folder: Path, h: dict[str, Any], tokenizer_config: dict[str, Any] | None
) -> tuple[list[bytes], list[float], list[int]]:
    """The converter's ``_create_vocab_sentencepiece``, which the gguf package does not hold.

    Padded to the config's ``vocab_size`` with ``[PADn]`` entries; ``added_tokens.json`` and
    ``added_tokens_decoder`` override pieces (Alpaca's ``[PAD]``, chat models' control tokens).
    """
    if SentencePieceProcessor is None:
        raise UnsupportedError(
            f"{folder}/tokenizer.model: GGUF output needs sentencepiece: pip install sentencepiece")
    path = folder / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{path}: not a sentencepiece model ({e})") from None
    vocab_size = _find(h, ("vocab_size_per_layer_input", "vocab_size")) or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [_UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        toktype = _NORMAL
        if sp.IsUnknown(i):
            toktype = _UNKNOWN
        elif sp.IsControl(i):
            toktype = _CONTROL
        elif sp.IsUnused(i):
            toktype = _UNUSED
        elif sp.IsByte(i):
            toktype = _BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        toktypes[i] = toktype
    added = _json_file(folder / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            tokens[tid], scores[tid], toktypes[tid] = text.encode("utf-8"), -1000.0, _USER_DEFINED
    decoder = (tokenizer_config or {}).get("added_tokens_decoder", {})
    for key, data in decoder.items():
        tid, text = int(key), data["content"]
        if tid >= vocab_size:
            continue
        if data.get("special") or _looks_special(text):
            toktypes[tid] = _CONTROL
        else:
            text = text.replace(_SPACE, " ")
            toktypes[tid] = _USER_DEFINED
        scores[tid], tokens[tid] = -1000.0, text.encode("utf-8")
    return tokens, scores, toktypes


def _llama_hf_vocab(folder: Path) -> tuple[list[bytes], list[float], list[int]]:
    """``gguf.LlamaHfVocab``: a sentencepiece-style BPE ``tokenizer.json`` (byte fallback)."""
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError):
        raise UnsupportedError(
            f"{folder}/tokenizer.json: GGUF output supports sentencepiece-style LLaMA tokenizers, "
            "not this one (a GPT-2/Llama 3 BPE)") from None
    except ImportError:
        raise UnsupportedError(
            f"{folder}/tokenizer.json: reading it for GGUF needs transformers: pip install transformers"
        ) from None
    tokens, scores, toktypes = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        toktypes.append(int(toktype))
    return tokens, scores, toktypes
