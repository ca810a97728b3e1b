"""Special tokens as the pinned converter's own gguf-py reads them (its ``gguf.SpecialVocab``).

``convert_hf_to_gguf.py`` imports the gguf-py vendored beside it, not the gguf package from PyPI
that deltamerge uses; both say 0.19.0, but the vendored ``SpecialVocab`` reads tokenizer.json
otherwise, and the difference reaches the header of every tokenizer with a ``ByteLevel``
post-processor (Llama 3.x, SmolLM, Qwen2...):

- a ``ByteLevel`` post-processor, alone or in a ``Sequence``, defaults ``add_bos``/``add_eos`` to
  false, so Llama 3's ``Sequence[ByteLevel, TemplateProcessing]`` gets ``add_eos_token=false``
  beside ``add_bos_token=true``;
- the post-processor's add flags win over tokenizer_config.json's ``add_*_token``;
- a ``TemplateProcessing`` whose leading special token is neither the bos nor the cls token
  becomes the missing one of them;
- ``Lowercase``/``StripAccents``/``BertNormalizer`` normalizers are written as
  ``tokenizer.ggml.normalizer.lowercase``/``strip_accents``, which PyPI's writer has no method for.

:class:`SpecialVocab` is the PyPI class with those methods replaced by the vendored ones, so
each tokenizer reader in ``gguf_kv`` and ``gguf_arch`` writes what the converter writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

try:
    import gguf
except ImportError:
    gguf = None

NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"

_Base: Any = gguf.SpecialVocab if gguf is not None else object


class SpecialVocab(_Base):
    """The vendored gguf-py's ``gguf.vocab.SpecialVocab`` (llama.cpp of llama-cpp-python 0.3.36)."""

    def __init__(self, path: str | Path, load_merges: bool = False, special_token_types: Any = None,
                 n_vocab: int | None = None) -> None:
        """``SpecialVocab.__init__``: the normalizer flags start unset, before the files are read."""
        self.normalizer_lowercase: bool | None = None
        self.normalizer_strip_accents: bool | None = None
        super().__init__(path, load_merges=load_merges, special_token_types=special_token_types,
                         n_vocab=n_vocab)

    def add_to_gguf(self, gw: Any, quiet: bool = False) -> None:
        """``SpecialVocab.add_to_gguf``: PyPI's keys, then the normalizer flags (the vendored
        writer's ``add_normalizer_lowercase``/``add_normalizer_strip_accents``)."""
        super().add_to_gguf(gw, quiet=quiet)
        if self.normalizer_lowercase is not None:
            gw.add_bool(NORMALIZER_LOWERCASE, self.normalizer_lowercase)
        if self.normalizer_strip_accents is not None:
            gw.add_bool(NORMALIZER_STRIP_ACCENTS, self.normalizer_strip_accents)

    def _parse_normalizer(self, normalizer: dict[str, Any]) -> None:
        """``SpecialVocab._parse_normalizer``: a ``Lowercase``/``StripAccents`` normalizer, a
        ``BertNormalizer``'s flags, or either within a ``Sequence``."""
        normalizer_type = normalizer.get("type")
        if normalizer_type == "Lowercase":
            self.normalizer_lowercase = True
        elif normalizer_type == "StripAccents":
            self.normalizer_strip_accents = True
        elif normalizer_type == "BertNormalizer":
            if "lowercase" in normalizer:
                self.normalizer_lowercase = normalizer["lowercase"]
            if "strip_accents" in normalizer:
                self.normalizer_strip_accents = normalizer["strip_accents"]
        elif normalizer_type == "Sequence":
            for norm in normalizer.get("normalizers", []):
                self._parse_normalizer(norm)

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        """``SpecialVocab._try_load_from_tokenizer_json``, its steps in its order."""
        tokenizer = None
        tokenizer_file = path / "tokenizer.json"
        if tokenizer_file.is_file():
            with open(tokenizer_file, encoding="utf-8") as f:
                tokenizer = json.load(f)
            if self.load_merges:
                self._load_merges(tokenizer)
            if normalizer := tokenizer.get("normalizer"):
                self._parse_normalizer(normalizer)
            added_tokens = tokenizer.get("added_tokens", {})
        else:
            added_tokens = {}
        tokenizer_config = None
        tokenizer_config_file = path / "tokenizer_config.json"
        if tokenizer_config_file.is_file():
            with open(tokenizer_config_file, encoding="utf-8") as f:
                tokenizer_config = json.load(f)
        if tokenizer:
            self._read_post_processor(tokenizer, tokenizer_config)
        if not tokenizer_config:
            return True
        self._read_tokenizer_config(path, tokenizer_config, added_tokens)
        return True

    def _load_merges(self, tokenizer: dict[str, Any]) -> None:
        """The merges of tokenizer.json: strings as they are, pairs joined by a space (a space
        within either encoded as U+0120)."""
        merges = tokenizer.get("model", {}).get("merges")
        if not isinstance(merges, list) or not merges:
            return
        if isinstance(merges[0], str):
            self.merges = merges
        elif isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
            self.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                    for part in pair) for pair in merges]
        else:
            raise ValueError("Unknown tokenizer merges format")

    def _read_post_processor(self, tokenizer: dict[str, Any],
                             tokenizer_config: dict[str, Any] | None) -> None:
        """The add flags (and the bos/cls/sep/eos names a template implies) of tokenizer.json's
        post-processor: the middle of the vendored ``_try_load_from_tokenizer_json``, which
        fills ``tokenizer_config`` in as it does."""
        special_bos = (tokenizer_config or {}).get("bos_token")
        special_cls = (tokenizer_config or {}).get("cls_token")
        special_eos = (tokenizer_config or {}).get("eos_token")
        special_sep = (tokenizer_config or {}).get("sep_token")
        if not special_bos and special_cls and tokenizer_config:
            tokenizer_config["bos_token"] = special_bos = special_cls
        if not special_eos and special_sep and tokenizer_config:
            tokenizer_config["eos_token"] = special_eos = special_sep
        post_processor = tokenizer.get("post_processor")
        if not post_processor:
            return
        for processor in post_processor.get("processors", [post_processor]):
            processor_type = processor.get("type")
            if processor_type == "ByteLevel":
                self.add_special_token.setdefault("bos", False)
                self.add_special_token.setdefault("eos", False)
            elif processor_type == "RobertaProcessing":
                self.add_special_token["bos"] = True
                self.add_special_token["eos"] = True
                self.add_special_token["sep"] = True
                if not special_cls and tokenizer_config:
                    special_cls = processor.get("cls", [special_bos])[0]
                    tokenizer_config["cls_token"] = special_cls
                if not special_sep and tokenizer_config:
                    special_sep = processor.get("sep", [special_eos])[0]
                    tokenizer_config["sep_token"] = special_sep
            elif processor_type == "TemplateProcessing":
                special_bos, special_cls, special_eos = self._read_template(
                    processor, tokenizer_config, special_bos, special_cls, special_eos, special_sep)

    def _read_template(self, processor: dict[str, Any], tokenizer_config: dict[str, Any] | None,
                       special_bos: Any, special_cls: Any, special_eos: Any,
                       special_sep: Any) -> tuple[Any, Any, Any]:
        """The vendored crude parse of a ``TemplateProcessing``: bos/eos added where its single
        template starts/ends with them, sep where its pair template holds one between A and B."""
        tmpl_single = processor.get("single", [])
        tmpl_pair = processor.get("pair", [])
        special_first = None
        special_last = None
        if len(tmpl_single) > 1:
            if special_first := tmpl_single[0].get("SpecialToken", {}).get("id"):
                if not tokenizer_config:
                    special_bos = special_first
                elif special_first not in (special_bos, special_cls):
                    if not special_bos:
                        tokenizer_config["bos_token"] = special_bos = special_first
                    if not special_cls:
                        tokenizer_config["cls_token"] = special_cls = special_first
                self.add_special_token["bos"] = special_first in (special_bos, special_cls)
            if special_last := tmpl_single[-1].get("SpecialToken", {}).get("id"):
                if not tokenizer_config:
                    special_eos = special_last
                elif special_last != special_eos:
                    if "eot" not in self.special_token_types:
                        self.special_token_types = (*self.special_token_types, "eot")
                        tokenizer_config["eot_token"] = special_eos
                    elif "eom" not in self.special_token_types:
                        self.special_token_types = (*self.special_token_types, "eom")
                        tokenizer_config["eom_token"] = special_eos
                    tokenizer_config["eos_token"] = special_eos = special_last
                self.add_special_token["eos"] = special_last == special_eos
        if tmpl_pair:
            first_id = tmpl_pair[0].get("SpecialToken", {}).get("id")
            last_id = tmpl_pair[-1].get("SpecialToken", {}).get("id")
            seq_start = 1 if special_first and first_id == special_first else 0
            seq_stop = -1 if special_last and last_id == special_last else None
            if tmpl_pair := tmpl_pair[slice(seq_start, seq_stop)]:
                tmpl_a = tmpl_pair[0].get("Sequence", {}).get("id")
                tmpl_b = tmpl_pair[-1].get("Sequence", {}).get("id")
                if tmpl_a == "A" and tmpl_b == "B" and (tmpl_pair := tmpl_pair[1:-1]):
                    add_sep = False
                    special_entry = tmpl_pair[0].get("SpecialToken", {}).get("id")
                    if special_entry and special_entry in (special_sep, special_eos) and not special_last:
                        add_sep = True
                    if len(tmpl_pair) == 2:
                        special_entry = tmpl_pair[1].get("SpecialToken", {}).get("id")
                        if special_entry and special_entry in (special_sep, special_eos):
                            add_sep = True
                    self.add_special_token["sep"] = add_sep
                    if add_sep and not special_sep and tokenizer_config:
                        tokenizer_config["sep_token"] = special_eos
        return special_bos, special_cls, special_eos

    def _read_tokenizer_config(self, path: Path, tokenizer_config: dict[str, Any],
                               added_tokens: Any) -> None:
        """The chat template, add flags and special tokens of tokenizer_config.json: the end of
        the vendored ``_try_load_from_tokenizer_json``, where a post-processor's add flag wins."""
        chat_template_alt: Any = None
        chat_template_json = path / "chat_template.json"
        chat_template_jinja = path / "chat_template.jinja"
        if chat_template_jinja.is_file():
            with open(chat_template_jinja, encoding="utf-8") as f:
                chat_template_alt = f.read()
            if additional_templates := list((path / "additional_chat_templates").glob("*.jinja")):
                chat_template_alt = [{"name": "default", "template": chat_template_alt}]
                for template_path in additional_templates:
                    with open(template_path, encoding="utf-8") as fp:
                        chat_template_alt.append({"name": template_path.stem, "template": fp.read()})
        elif chat_template_json.is_file():
            with open(chat_template_json, encoding="utf-8") as f:
                chat_template_alt = json.load(f).get("chat_template")
        chat_template = tokenizer_config.get("chat_template", chat_template_alt)
        if chat_template is None or isinstance(chat_template, (str, list)):
            self.chat_template = chat_template
        for typ in self.special_token_types:
            add_entry = tokenizer_config.get(f"add_{typ}_token")
            if isinstance(add_entry, bool) and typ not in self.add_special_token:
                self.add_special_token[typ] = add_entry
            entry = tokenizer_config.get(f"{typ}_token")
            if isinstance(entry, str):
                tc_content = entry
            elif isinstance(entry, dict):
                entry_content = entry.get("content")
                if not isinstance(entry_content, str):
                    continue
                tc_content = entry_content
            else:
                continue
            maybe_token_id = next(
                (atok.get("id") for atok in added_tokens if atok.get("content") == tc_content), None)
            self._set_special_token(typ, maybe_token_id)
