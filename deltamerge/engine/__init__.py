"""The stream: the plan (``plan``), the staged engine that runs it (``stream``), and the journal
that lets a killed run resume (``journal``). It reads through :mod:`deltamerge.sources`, computes
through the kinds' steps and writes through a :class:`~deltamerge.sinks.Sink`; it knows no format.
"""

from .stream import Engine, EngineResult

__all__ = ["Engine", "EngineResult"]
