"""Every output format, registered in one list: ``--format hf|gguf|meta`` and each one's options.

A format is one module here (``hf``, ``gguf``, ``meta``: an :class:`~.base.OutputFormat` that owns
its options, their checks, what the run records of it and its sink); its entry in
:data:`OUTPUT_FORMATS` is what makes it exist: ``--format`` offers it and :func:`output_format`
checks its options. Nothing here loads torch (a format imports its sink when a run opens it), so
the CLI builds its choices from this list. docs/design.md, *Output formats*, says how the plan's
shards become each format's files.
"""

from __future__ import annotations

from ..errors import InputError
from ..registry import Registry
from .base import FormatOptions, OutputFormat
from .gguf import GgufFormat
from .hf import HfFormat
from .meta import MetaFormat

# In the order ``--format`` lists them; the first is the default.
OUTPUT_FORMATS: Registry[type[OutputFormat]] = Registry("output format", [HfFormat, GgufFormat, MetaFormat])
FORMATS = OUTPUT_FORMATS.names


def output_format(
    name: str = "hf", *, outtype: str | None = None, mp: int | None = None,
    max_shard_size: str | int | None = None, threads: int | None = None,
) -> OutputFormat:
    """The format ``name`` with its options, each checked by the format it belongs to before any
    work: an option of one format given with another is refused."""
    chosen = OUTPUT_FORMATS.get(name)
    if chosen is None:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {name!r}")
    given = FormatOptions(outtype=outtype, mp=mp, max_shard_size=max_shard_size, threads=threads)
    for fmt in OUTPUT_FORMATS:
        fmt.check_options(name, given)
    return chosen.configure(given)


__all__ = ["FORMATS", "OUTPUT_FORMATS", "FormatOptions", "OutputFormat", "output_format"]
