"""The GGUF key/values llama.cpp's ``convert_hf_to_gguf.py`` writes that its model classes share.

Everything here is known before any weight is read: ``config.json``, the tokenizer files, the
model card and ``generation_config.json`` of the result folder, and the tensor table (for the
parameter count in ``general.size_label``). Keys are added in the converter's order, since a
GGUF file's bytes depend on it: ``general.*`` (its ``Metadata`` heuristics), the hyperparameters
(``TextModel.set_gguf_parameters``, then the architecture's own, in ``gguf_arch``), then the
tokenizer (the architecture's ``set_vocab``, from the readers here and in ``gguf_arch.bpe``).

The converter reads ``config.json`` through transformers' ``AutoConfig``, which fills in defaults
a config may leave out (``head_dim``, ``rope_theta``, ``rms_norm_eps``...); :func:`hparams` derives
the same dict without transformers (``gguf_config``), and asks ``AutoConfig`` where that module
cannot be sure of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FormatError, UnsupportedError
from ..formats.files import loads_utf8
from . import gguf_config
from .gguf_special import SpecialVocab

try:
    import gguf
except ImportError:
    gguf = None

try:
    from sentencepiece import SentencePieceProcessor
except ImportError:
    SentencePieceProcessor = None

# What the converter's ``load_hparams`` renames ``text_config`` after reading the config.
_TEXT_CONFIG_ALIASES = ("llm_config", "lm_config", "thinker_config", "language_config", "lfm")
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


def hparams(config: dict[str, Any], folder: Path | None = None) -> dict[str, Any]:
    """``AutoConfig.from_pretrained(folder).to_dict()``, which the converter reads.

    Made without transformers (:mod:`.gguf_config`) where that is certain, else read by
    ``AutoConfig`` itself; the converter falls back to config.json as it is when ``AutoConfig``
    cannot read it (an unknown ``model_type``), and so does this. Then the converter's own
    renames of a multimodal model's text config.
    """
    h = gguf_config.auto_config_dict(config)
    if h is None:
        h = _auto_config(config, folder)
    for alias in _TEXT_CONFIG_ALIASES:
        if alias in h:
            text = h[alias]
            thinker = alias == "thinker_config" and isinstance(text, dict)
            h["text_config"] = text.get("text_config") if thinker else text
    return h


def _auto_config(config: dict[str, Any], folder: Path | None) -> dict[str, Any]:
    if folder is None:
        return dict(config)
    try:
        from transformers import AutoConfig
    except ImportError:
        raise UnsupportedError(
            f"{folder}/config.json: GGUF output of a {config.get('model_type')!r} model reads its config "
            "with transformers: pip install 'deltamerge[gguf]'") from None
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001 - the converter's own fallback, whatever AutoConfig raised
        return dict(config)


def find_hparam(h: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((h[k] for k in keys if k in h), None)


def block_count(h: dict[str, Any], where: Path) -> int:
    n = find_hparam(h, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    if not isinstance(n, int) or n <= 0:
        raise FormatError(f"{where}: num_hidden_layers must be a positive integer, found {n!r}")
    return n


def heads(h: dict[str, Any], where: Path) -> tuple[int, int]:
    """(n_head, n_head_kv), which the q and k permutations need."""
    n_head = find_hparam(h, ("n_heads", "num_attention_heads"))
    n_kv = find_hparam(h, ("n_kv_heads", "num_key_value_heads"))
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
    """``TextModel.set_gguf_parameters``, for the keys the supported architectures have; each
    architecture (``gguf_arch``) adds its own after these."""
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
        if (value := find_hparam(h, names)) is not None:
            add(value)
    if h.get("is_causal") is False:
        writer.add_causal_attention(False)
    rope = rope_parameters(h)
    full = rope.get("full_attention", rope)
    _add_rope_scaling(writer, full)
    if (theta := full.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (swa_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(swa_theta)
    if (eps := find_hparam(h, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (eps := find_hparam(h, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        writer.add_layer_norm_eps(eps)
    if (n_experts := find_hparam(h, ("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        writer.add_expert_count(n_experts)
    n_used = find_hparam(h, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))
    if n_used is not None:
        writer.add_expert_used_count(n_used)
    if (head_dim := h.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(ftype)


def rope_parameters(h: dict[str, Any]) -> dict[str, Any]:
    """``TextModel.__init__``'s ``rope_parameters``: the config's, with the top-level values mirrored
    unless it is per layer type (``full_attention``/``sliding_attention``, Gemma 3's)."""
    rope = dict(h.get("rope_parameters", h.get("rope_scaling")) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return rope
    local_theta = find_hparam(h, ("local_rope_theta", "rope_local_theta", "rope_theta_local",
                                  "swa_rope_theta", "rope_local_base_freq"))
    if local_theta is not None:
        rope["sliding_attention"] = {"rope_theta": local_theta}
    theta = find_hparam(h, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                            "rotary_emb_base"))
    if "rope_theta" not in rope and theta is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and (rope_type := rope.get("type")) is not None:
        rope["rope_type"] = rope_type
    factor = find_hparam(h, ("partial_rotary_factor", "rope_pct", "rope_percent"))
    if "partial_rotary_factor" not in rope and factor is not None:
        rope["partial_rotary_factor"] = factor
    original = h.get("original_max_position_embeddings")
    if "original_max_position_embeddings" not in rope and original is not None:
        rope["original_max_position_embeddings"] = original
    return rope


def _add_rope_scaling(writer: Any, rope: dict[str, Any]) -> None:
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
    elif rope_type in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)  # its factors are tensors (Phi-3)
    # llama3 scaling is a generated tensor (LLaMA's ``rope_freqs``); others write no key, as there.


def add_sentencepiece_vocab(writer: Any, folder: Path, h: dict[str, Any]) -> bool:
    """``_set_vocab_sentencepiece``; False (nothing written) when there is no ``tokenizer.model``."""
    if not (folder / "tokenizer.model").is_file():
        return False
    tokens, scores, toktypes = sentencepiece_vocab(folder, h, json_file(folder / "tokenizer_config.json"))
    add_llama_tokens(writer, folder, tokens, scores, toktypes)
    return True


def add_llama_hf_vocab(writer: Any, folder: Path) -> bool:
    """``_set_vocab_llama_hf``; False (nothing written) unless ``tokenizer.json`` is a
    sentencepiece-style BPE (byte fallback), which ``gguf.LlamaHfVocab`` reads."""
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        if not _llama_hf_style(load_json(folder / "tokenizer.json")):
            return False
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError):
        return False
    except ImportError:
        raise UnsupportedError(
            f"{folder}/tokenizer.json: reading it for GGUF needs transformers: pip install 'deltamerge[gguf]'"
        ) from None
    tokens, scores, toktypes = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        toktypes.append(int(toktype))
    add_llama_tokens(writer, folder, tokens, scores, toktypes)
    return True


def _llama_hf_style(tokenizer_json: dict[str, Any]) -> bool:
    """``LlamaHfVocab``'s own first check, made on the parsed tokenizer.json (raising what it
    raises): False where it would raise TypeError or FileNotFoundError, as it does for a GPT-2
    style BPE such as Llama 3's, after parsing the file again (seconds for 128k tokens)."""
    model = tokenizer_json["model"]
    is_llama3 = (model["type"] == "BPE" and model.get("ignore_merges", False)
                 and not model.get("byte_fallback", True))
    return not is_llama3 and not (model["type"] != "BPE" or not model.get("byte_fallback", False)
                                  or tokenizer_json["decoder"]["type"] != "Sequence")


def add_llama_tokens(writer: Any, folder: Path, tokens: list[bytes], scores: list[float],
                      toktypes: list[int]) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def load_json(path: Path) -> Any:
    """``json.loads`` of ``path``'s UTF-8 text, raising what that raises; within the plan
    (``formats.files.json_parsed_once``) the same bytes are parsed once (callers must not change it)."""
    return loads_utf8(path.read_bytes())


def json_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = load_json(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a JSON object")
    return obj


def looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def sentencepiece_vocab(
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
    vocab_size = find_hparam(h, ("vocab_size_per_layer_input", "vocab_size")) or sp.vocab_size()
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
    added = json_file(folder / "added_tokens.json") or {}
    for text, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            tokens[tid], scores[tid], toktypes[tid] = text.encode("utf-8"), -1000.0, _USER_DEFINED
    decoder = (tokenizer_config or {}).get("added_tokens_decoder", {})
    for key, data in decoder.items():
        tid, text = int(key), data["content"]
        if tid >= vocab_size:
            continue
        if data.get("special") or looks_special(text):
            toktypes[tid] = _CONTROL
        else:
            text = text.replace(_SPACE, " ")
            toktypes[tid] = _USER_DEFINED
        scores[tid], tokens[tid] = -1000.0, text.encode("utf-8")
    return tokens, scores, toktypes
