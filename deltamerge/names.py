"""Every list of values an option allows, written once, for the library and the command line.

The library checks a value against these and the CLI builds its ``click.Choice`` from them;
they live here, apart from the modules that use them, because those import torch and
``deltamerge --help`` must not (``tests/test_choices.py`` keeps each option's choice equal to
its list). A new kind, outtype or format is named here first.
"""

from __future__ import annotations

# apply --kind: every kind a delta can be (kinds/detect.py opens each).
KINDS = ("add", "xor", "xor-zstd", "xor-files", "enc", "lora", "ia3", "loha", "lokr",
         "trainable-tokens", "vera", "prefix")
# make-delta --kind: what it computes (``--compress`` turns xor into xor-zstd; lora is a peft
# adapter extracted with ``--rank``).
MAKE_KINDS = ("add", "xor", "lora")
# The kinds make-delta writes, recorded in the delta's marks (kinds/marks.py).
MARKED_KINDS = (*MAKE_KINDS, "xor-zstd")
# apply --new-rows: how rows a delta adds to the vocabulary start.
NEW_ROWS = ("zero", "mean")
# apply --qlora: NF4, and NF4 with double quantization (the ``-dq``).
QLORA_MODES = ("nf4", "nf4-dq")
# --dtype spellings, each with the torch dtype (by name) it stands for (dtypes.USER_DTYPES).
DTYPE_SPELLINGS = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
                   "bf16": "bfloat16", "float32": "float32", "fp32": "float32"}
DTYPE_NAMES = tuple(DTYPE_SPELLINGS)
# --format (sinks/output.py) and Meta's --mp shard counts.
FORMATS = ("hf", "gguf", "meta")
MP_SHARDS = (1, 2, 4, 8)
# --outtype: llama-quantize's types (sinks/gguf_types.py, each file type ``MOSTLY_`` + its name
# in capitals), after the types the converter writes itself (sinks/gguf.py).
QUANTIZED_OUTTYPES = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q4_0", "q4_1", "q5_0",
                      "q5_1")
OUTTYPES = ("f32", "f16", "bf16", "q8_0", *QUANTIZED_OUTTYPES)
# verify --role: which side of a delta's manifest a folder is checked against.
ROLES = ("result", "base")
# --algorithm: the digests a checksum or manifest may use (integrity/digest.py).
ALGORITHMS = ("blake3", "sha256")
