"""What a registry of named things is: the delta kinds (``kind_registry``), the output formats
(``outputs``).

A registry is written once, in order, and everything that lists allowed values reads it: the CLI's
choices, the library's checks, the messages that name the choices. It is read by ``--help``, so
it must not load torch: an entry names the code behind it as ``"module:attribute"``
(:func:`load`), imported when a run first needs it, as mergekit's ``merge_methods/registry.py``
lists its methods in one place.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Named entries in the order they were registered (the order every list shows them in)."""

    def __init__(self, what: str, entries: Iterable[T]):
        self.what = what
        self._entries: dict[str, T] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"two {what}s are named {entry.name!r}")
            self._entries[entry.name] = entry

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def get(self, name: str) -> T | None:
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def load(ref: str) -> Any:
    """The attribute ``ref`` names (``"package.module:attribute"``), its module imported now."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
