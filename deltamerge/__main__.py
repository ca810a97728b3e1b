"""The ``deltamerge`` process: ``python -m deltamerge`` and the console script both start here.

The signal handlers go in before anything heavy is imported (click, then torch inside the
command), so that Ctrl-C or SIGTERM at any instant ends the process cleanly (``interrupts``).
"""

from __future__ import annotations

from . import interrupts


def run() -> None:
    interrupts.install()
    from .cli import main

    main()


if __name__ == "__main__":
    run()
