"""Every list of values an option allows, written once, for the library and the command line.

The library checks a value against these and the CLI builds its ``click.Choice`` from them;
they live here, apart from the modules that use them, because those import torch and
``deltamerge --help`` must not (``tests/project/test_choices.py`` keeps each option's choice equal to
its list). The kinds' lists are read from their registry (``kind_registry.py``): a new kind is
registered there. The output formats and their options' values (``--format``, ``--outtype``,
``--mp``) are their formats' own (``outputs/``, no torch either).
"""

from __future__ import annotations

from . import kind_registry

# apply --kind: every kind a delta can be; make-delta --kind: what it computes (``--compress``
# turns xor into xor-zstd); the kinds make-delta writes, recorded in the delta's marks
# (kinds/marks.py). Each is read from the kinds' registry (kind_registry.py).
KINDS = kind_registry.KINDS
MAKE_KINDS = kind_registry.MAKE_KINDS
MARKED_KINDS = kind_registry.MARKED_KINDS
# apply --new-rows: how rows a delta adds to the vocabulary start.
NEW_ROWS = ("zero", "mean")
# apply --qlora: NF4, and NF4 with double quantization (the ``-dq``).
QLORA_MODES = ("nf4", "nf4-dq")
# apply --qlora-scope: what training quantized (the first is the default): every Linear layer
# but the output layer, as transformers' bitsandbytes integration does, or the adapter's targets.
QLORA_SCOPES = ("all-linear", "targets")
# apply --qlora-kernel: whose bitsandbytes kernels quantized the base (the first is the default).
QLORA_KERNELS = ("cuda", "cpu")
# --dtype spellings, each with the torch dtype (by name) it stands for (dtypes.USER_DTYPES).
DTYPE_SPELLINGS = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
                   "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
DTYPE_NAMES = tuple(DTYPE_SPELLINGS)
# verify --role: which side of a delta's manifest a folder is checked against.
ROLES = ("result", "base")
# --algorithm: the digests a checksum or manifest may use (integrity/digest.py).
ALGORITHMS = ("blake3", "sha256")
