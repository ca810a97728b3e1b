"""Overlays: tensors a delta brings whole, replacing the base's or added beside them.

PandaGPT's ``pytorch_model.pt`` holds, next to its LoRA factors, a new ``llama_proj`` (ImageBind's
1024 features to the language model's width) that the language model lacks; a ChatGLM P-tuning
v2 checkpoint holds only its ``prefix_encoder``. Such a tensor is written as the delta stores it,
in its own dtype (P-tuning keeps the prefix encoder in fp32 next to an fp16 model), bit for bit.
"""

from __future__ import annotations

from ..sources import Checkpoint
from ..tensor_spec import TensorSpec
from . import RowInput, Scratch, Step


class OverlayStep(Step):
    """The tensor becomes the delta's ``key``, whatever it was before."""

    def __init__(self, before: TensorSpec | None, checkpoint: Checkpoint, key: str, name: str):
        stored = checkpoint.specs[key]
        super().__init__(before, TensorSpec(name, stored.dtype, stored.shape))
        self.inputs = (RowInput(checkpoint, key),)

    def apply(self, cur, inputs, r0, out, scratch: Scratch) -> None:
        out.copy_(inputs[0])


def overlay(
    specs: dict[str, TensorSpec], checkpoint: Checkpoint, names: dict[str, str]
) -> tuple[dict[str, TensorSpec], dict[str, Step]]:
    """The tensors after putting ``checkpoint``'s tensors (key by result name) over ``specs``.

    Tensors the base lacks come after the base's, in the delta's order.
    """
    steps = {name: OverlayStep(specs.get(name), checkpoint, key, name) for name, key in names.items()}
    after = dict(specs)
    for name, step in steps.items():
        after[name] = step.after
    return after, steps
