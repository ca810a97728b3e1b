"""Checksums of content end to end.

``digest`` (tensor, model and file digests) and ``manifest`` (``deltamerge.json``) sit low, below
the sources and the engine, which hash while they stream; ``checks`` (checksum, verify, inspect,
diff) sits with the entry points, since it opens checkpoints. This file imports nothing, so that
importing ``digest`` never pulls in ``checks``.
"""
