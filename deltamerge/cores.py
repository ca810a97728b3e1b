"""How many cores this process may use: the default of ``--threads``, in a module of its own
because the output formats (which ``--help`` reads, never loading torch) and the compute pool
both need it."""

from __future__ import annotations

import os


def machine_cores() -> int:
    """The cores this process may run on (its affinity), where the system says."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
