"""The whole-file decoders: deltas whose files are XORed whole, decoded file by file.

OpenAssistant's XOR files (``xor_files.py``) and OpenBuddy's ``.enc`` files (``enc.py``) are
the publisher's files byte for byte once decoded, whatever their format, so they take the place
of the tensor stream (``engine/stream.py``) for these deltas: a stage beside it, below apply,
going through the same run lifecycle (``engine/lifecycle.py``). Their kinds
(``kinds/xor_files.py``, ``kinds/enc.py``) say how such a folder is recognised; their arithmetic,
the masks a payload is XORed with, is ``kinds/masks.py``.
"""
