"""A tiny architecture that ships its own code, as ChatGLM, MOSS and early Falcon do.

``write_tiny_glm`` writes a folder loaded with ``trust_remote_code=True``: ``config.json`` with an
``auto_map``, ``configuration_tinyglm.py`` and ``modeling_tinyglm.py``, and weights named as
ChatGLM-6B names them (``transformer.word_embeddings``, ``transformer.layers.N.query_key_value``,
``lm_head``; with ``pre_seq_len`` set, ChatGLM's ``transformer.prefix_encoder``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyGLMConfig(PretrainedConfig):
    model_type = "tinyglm"

    def __init__(self, vocab_size=64, hidden_size=32, num_layers=2, pre_seq_len=None,
                 prefix_projection=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tinyglm import TinyGLMConfig


class PrefixEncoder(nn.Module):
    """ChatGLM-6B's: an embedding of (pre_seq_len, layers * 2 * hidden), or an MLP over one."""

    def __init__(self, config):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * config.hidden_size * 2
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size),
                                       nn.Tanh(), nn.Linear(config.hidden_size, width))
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    def forward(self, prefix):
        out = self.embedding(prefix)
        return self.trans(out) if self.prefix_projection else out


class TinyGLMLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h, past):
        q, k, v = self.query_key_value(h).chunk(3, dim=-1)
        if past is not None:
            k, v = torch.cat([past[0].expand(h.shape[0], -1, -1), k], 1), torch.cat(
                [past[1].expand(h.shape[0], -1, -1), v], 1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        return h + self.dense(a)


class TinyGLMModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyGLMLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size)
        self.pre_seq_len = config.pre_seq_len
        if self.pre_seq_len is not None:
            for p in self.parameters():
                p.requires_grad = False
            self.prefix_encoder = PrefixEncoder(config)

    def forward(self, input_ids):
        h = self.word_embeddings(input_ids)
        past = None
        if self.pre_seq_len is not None:
            prefix = torch.arange(self.pre_seq_len, device=input_ids.device)
            past = self.prefix_encoder(prefix).view(self.pre_seq_len, len(self.layers), 2, -1)
            past = past.to(h.dtype).permute(1, 2, 0, 3).unsqueeze(2)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if past is None else past[i])
        return self.final_layernorm(h)


class TinyGLMForCausalLM(PreTrainedModel):
    config_class = TinyGLMConfig
    base_model_prefix = "transformer"

    def __init__(self, config):
        super().__init__(config)
        self.transformer = TinyGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return self.lm_head(self.transformer(input_ids))
'''

AUTO_MAP = {
    "AutoConfig": "configuration_tinyglm.TinyGLMConfig",
    "AutoModel": "modeling_tinyglm.TinyGLMForCausalLM",
    "AutoModelForCausalLM": "modeling_tinyglm.TinyGLMForCausalLM",
}
CODE = {"configuration_tinyglm.py": CONFIGURATION, "modeling_tinyglm.py": MODELING}


def write_tiny_glm(folder: Path, seed: int, dtype: torch.dtype = torch.float16) -> Path:
    """A random TinyGLM saved as its publisher would: weights, config with auto_map, its code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True)
    for name, text in CODE.items():
        (folder / name).write_text(text)
    config = {"architectures": ["TinyGLMForCausalLM"], "model_type": "tinyglm",
              "auto_map": AUTO_MAP, "vocab_size": 64, "hidden_size": 32, "num_layers": 2}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True
    )
    model.to(dtype).save_pretrained(folder)
    return folder


def load_tiny_glm(folder: Path, dtype: torch.dtype = torch.float16, **config):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True, **config)
    return AutoModel.from_pretrained(folder, config=cfg, trust_remote_code=True, dtype=dtype)
