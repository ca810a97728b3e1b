"""The side-file fields the GGUF writer reads, checked before it reads them.

``gguf_kv`` (and, through it, the gguf package's ``Metadata`` and ``LlamaHfVocab``, and
``gguf_special.SpecialVocab``) reads config.json, tokenizer_config.json, tokenizer.json and
generation_config.json as llama.cpp's converter does, trusting their types. Every field they read
is checked here first with the same helpers the Meta writer uses (``side_fields``), so a field of
the wrong type is one :class:`FormatError` naming the file and the field. What the gguf package
reads deeper (tokenizer.json's post-processor templates) is covered by :func:`reading`, which
names the files when it still trips on one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .gguf_kv import load_json
from .side_fields import check_fields

# config.json: the keys ``gguf_kv.hparams``/``add_parameters``/``add_vocab`` look up (first found
# wins), and the special token ids ``gguf.SpecialVocab`` takes from it.
CONFIG_POSITIVE_INTS = (
    "vocab_size", "vocab_size_per_layer_input", "hidden_size", "n_embd", "dim",
    "intermediate_size", "prefix_dense_intermediate_size", "dense_intermediate_size", "n_inner",
    "hidden_dim", "num_hidden_layers", "n_layers", "n_layer", "num_layers",
    "num_attention_heads", "n_head", "n_heads", "num_key_value_heads", "n_kv_heads", "head_dim",
    "max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
    "model_max_length", "original_max_position_embeddings", "num_local_experts", "num_experts_per_tok",
)
CONFIG_POSITIVE_NUMBERS = (
    "rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon",
    "rope_theta", "global_rope_theta", "rope_global_theta", "rope_theta_global", "rotary_emb_base",
    "rotary_pct",
)
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask", "prefix", "suffix", "middle", "eot")
ROPE_FIELDS = {
    "strings": ("rope_type", "type"),
    "positive_numbers": ("factor", "rope_theta", "attention_factor", "attn_factor", "partial_rotary_factor"),
    "numbers": ("extrapolation_factor", "beta_fast", "beta_slow"),
    "positive_ints": ("original_max_position_embeddings",),
}
# generation_config.json: what ``gguf.Metadata`` writes as ``general.sampling.*``.
GENERATION_FIELDS = {
    "ints": ("top_k", "penalty_last_n", "mirostat"),
    "numbers": ("temperature", "top_p", "min_p", "xtc_probability", "xtc_threshold",
                "penalty_repeat", "repetition_penalty", "mirostat_tau", "mirostat_eta"),
    "strings": ("sequence",),
}


def check_side_files(folder: Path, config: Mapping[str, Any]) -> None:
    """Every field of ``folder``'s side files the GGUF writer reads, checked (``config`` is its
    config.json, already read as an object)."""
    check_config(config, folder / "config.json")
    tokenizer_config = _object(folder / "tokenizer_config.json")
    if tokenizer_config is not None:
        check_tokenizer_config(tokenizer_config, folder / "tokenizer_config.json")
    tokenizer = _object(folder / "tokenizer.json")
    if tokenizer is not None:
        check_tokenizer_json(tokenizer, folder / "tokenizer.json")
    generation = _object(folder / "generation_config.json", lenient=True)
    if generation is not None:
        check_fields(generation, folder / "generation_config.json", **GENERATION_FIELDS)


def check_config(config: Mapping[str, Any], where: Path) -> None:
    check_fields(config, where, positive_ints=CONFIG_POSITIVE_INTS,
                 positive_numbers=CONFIG_POSITIVE_NUMBERS, flags=("is_causal",),
                 strings=("model_type",), token_ids=tuple(f"{t}_token_id" for t in SPECIAL_TYPES))
    for key in ("rope_scaling", "rope_parameters"):
        check_fields(config, where, objects=(key,))
        if isinstance(rope := config.get(key), Mapping):
            check_fields(rope, f"{where}: {key!r}", **ROPE_FIELDS)
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise FormatError(f"{where}: 'num_attention_heads' {heads} is not a multiple of "
                          f"'num_key_value_heads' {kv_heads}")
    if isinstance(heads, int) and isinstance(hidden, int) and config.get("head_dim") is None \
            and hidden % heads:
        raise FormatError(f"{where}: 'hidden_size' {hidden} does not split into "
                          f"'num_attention_heads' {heads} heads")


def check_tokenizer_config(obj: Mapping[str, Any], where: Path) -> None:
    check_fields(obj, where, strings=("tokenizer_class",),
                 flags=("add_prefix_space", *(f"add_{t}_token" for t in SPECIAL_TYPES)),
                 objects=("added_tokens_decoder",))
    for typ in SPECIAL_TYPES:
        token = obj.get(f"{typ}_token")
        if token is not None and not isinstance(token, str):
            if not isinstance(token, Mapping):
                raise FormatError(
                    f"{where}: '{typ}_token' must be a string or an object, found {token!r:.60}")
            check_fields(token, f"{where}: '{typ}_token'", strings=("content",))
    for key, data in (obj.get("added_tokens_decoder") or {}).items():
        field = f"{where}: added_tokens_decoder[{key!r}]"
        if not key.isdecimal():
            raise FormatError(f"{field}: the key must be a token id (a non-negative integer)")
        if not isinstance(data, Mapping) or not isinstance(data.get("content"), str):
            raise FormatError(f"{field} must be an object with a string 'content', found {data!r:.60}")
        check_fields(data, field, flags=("special",))
    template = obj.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
        isinstance(template, list) and all(
            isinstance(t, Mapping) and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str) for t in template)
    ):
        raise FormatError(f"{where}: 'chat_template' must be a string or a list of "
                          f"{{'name', 'template'}} objects, found {template!r:.60}")


def check_tokenizer_json(obj: Mapping[str, Any], where: Path) -> None:
    check_fields(obj, where, objects=("model", "post_processor", "normalizer", "pre_tokenizer",
                                      "decoder"))
    model = obj.get("model") or {}
    check_fields(model, f"{where}: 'model'", strings=("type", "unk_token"),
                 flags=("byte_fallback",), objects=("vocab",))
    for token, tid in (model.get("vocab") or {}).items():
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise FormatError(f"{where}: 'model': vocab[{token!r:.40}] must be a token id, found {tid!r:.40}")
    merges = model.get("merges")
    if merges is not None and not isinstance(merges, list):
        raise FormatError(f"{where}: 'model': 'merges' must be a list, found {merges!r:.60}")
    added = obj.get("added_tokens")
    if added is not None and not isinstance(added, list):
        raise FormatError(f"{where}: 'added_tokens' must be a list, found {added!r:.60}")
    for i, token in enumerate(added or []):
        field = f"{where}: added_tokens[{i}]"
        if not isinstance(token, Mapping) or not isinstance(token.get("content"), str):
            raise FormatError(f"{field} must be an object with a string 'content', found {token!r:.60}")
        check_fields(token, field, ints=("id",), flags=("special",))


@contextmanager
def reading(folder: Path) -> Iterator[None]:
    """What the gguf package reads of the side files beyond the fields checked above (nested
    templates of a tokenizer.json): a type it trips on is a FormatError naming the files."""
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise FormatError(
            f"{folder}: a field of config.json, tokenizer.json, tokenizer_config.json, "
            f"generation_config.json or README.md has a type the GGUF writer cannot read "
            f"({type(exc).__name__}: {reason})"
        ) from None


def _object(path: Path, lenient: bool = False) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is absent (or, ``lenient``, when it does not
    parse as JSON: the converter skips a generation_config.json it cannot parse)."""
    if not path.is_file():
        return None
    try:
        obj = load_json(path)
    except json.JSONDecodeError as e:
        if lenient:
            return None
        raise FormatError(f"{path}: not JSON ({str(e)[:200]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a UTF-8 text file ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: not a JSON object")
    return obj
