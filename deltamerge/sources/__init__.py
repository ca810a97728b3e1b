"""What can be read: checkpoint folders and the formats in them, and where inputs come from.

``folders`` finds a folder's weight files and index; ``checkpoint`` is the interface every
format reads through (:class:`Checkpoint`) and :func:`open_checkpoint`; ``safetensors``,
``torch_bin`` and ``meta`` are the formats, each registering itself; ``inputs``, ``resolve``
and ``hub`` turn what the user typed into a local folder, from the Hub's cache if need be.
"""

from . import meta, safetensors, torch_bin  # noqa: F401 - each registers the format it reads
from .checkpoint import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
