"""Plug-in maps: name -> object, shared by model families and output targets (registered by decorator)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sovpack.errors import UsageError

T = TypeVar("T")


def import_submodules(package: str, *, packages_only: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Import every module (or sub-package) of ``package`` so each registers itself."""
    module = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda m: m.name):
        if info.name in skip or (packages_only and not info.ispkg):
            continue
        importlib.import_module(f"{package}.{info.name}")


class Plugins(Generic[T]):
    """Maps names (and aliases) to registered objects; refuses duplicates, lists the known names on a miss.

    ``discover`` (optional) imports the modules that register themselves; it runs once, the first time the
    map is read, so callers never need to remember a separate load step.
    """

    def __init__(self, kind: str, discover: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._discover = discover

    def discover(self) -> None:
        """Run the discovery step now (once)."""
        discover, self._discover = self._discover, None
        if discover is not None:
            discover()

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            self.add(name, item, *aliases)
            return item

        return decorator

    def add(self, name: str, item: T, *aliases: str) -> None:
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._items[name] = item
        for alias in aliases:
            self._aliases[alias] = name

    def get(self, name: str) -> T:
        self.discover()
        key = self._aliases.get(name, name)
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UsageError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._items or name in self._aliases

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._items)

    def __iter__(self) -> Iterator[tuple[str, T]]:
        self.discover()
        return iter(sorted(self._items.items()))
