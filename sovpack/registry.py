"""A small name -> object registry shared by model families and output targets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sovpack.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to registered objects; refuses duplicates, lists the known names on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

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
        key = self._aliases.get(name, name)
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise UsageError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))
