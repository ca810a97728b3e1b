"""The command line: a thin layer over the library that prints results and maps errors to exits.

Each command group is one module (``run``: apply, make-delta; ``convert``; ``hub``: push;
``integrity``: checksum, verify, inspect, diff; ``sign``: sign) defining plain click commands; they are put
together on :func:`main` here and nowhere else. The library is imported inside each command,
when it runs, so that ``--help`` and ``--version`` answer without loading torch.
"""

from __future__ import annotations

import os
import warnings

import click

from ..version import __version__
from .common import DEBUG, debug_option, route_library_logs
from .convert import convert_cmd
from .hub import push_cmd
from .integrity import checksum_cmd, diff_cmd, inspect_cmd, verify_cmd
from .run import apply_cmd, make_delta_cmd
from .sign import sign_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="deltamerge")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def main(debug: bool) -> None:
    """Rebuild models from published delta weights, streaming, with checksums end to end.

    \b
    Examples:
      deltamerge apply ./llama-7b ./vicuna-7b-delta ./vicuna-7b
      deltamerge make-delta ./llama-7b ./my-finetune ./my-finetune-delta
    """
    DEBUG["on"] = debug or bool(os.environ.get("DELTAMERGE_DEBUG"))
    # torch warns on import when numpy is absent; deltamerge never uses numpy (not a dependency).
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    route_library_logs()


for _command in (apply_cmd, make_delta_cmd, convert_cmd, push_cmd, checksum_cmd, verify_cmd,
                 inspect_cmd, diff_cmd, sign_cmd):
    _command.params.append(debug_option())  # `deltamerge CMD --debug ...` as well as before CMD
    main.add_command(_command)
