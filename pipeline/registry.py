"""One registration style for every kind of pluggable thing: encoders, heads, fine-tuners, objectives and
dataset adapters. A leaf module: it imports nothing of the project but `pipeline.UserError`.

    ENCODERS = Registry("encoder kind")

    @ENCODERS.register("hf_text")
    class TextEncoder(Encoder): ...

    ENCODERS.get("hf_text")          # the class; an unknown name is a UserError listing the known ones
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from pipeline import UserError

T = TypeVar("T")


class UnknownName(UserError, KeyError):
    """A name that no entry of a registry has (a params value, a bundle's head name, ...)."""

    def __str__(self) -> str:   # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names → classes (or functions), filled by the `register` decorator where each one is defined."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.what} '{name}' is registered twice "
                                 f"({self._entries[name]!r} and {obj!r})")
            self._entries[name] = obj
            try:
                obj.registry_name = name   # the name a class was registered under, for bundles and messages
            except (AttributeError, TypeError):
                pass
            return obj
        return deco

    def get(self, name: str, where: str = "") -> T:
        """The entry `name`; `where` (a params path, a file) prefixes the error when there is none."""
        if name not in self._entries:
            prefix = f"{where}: " if where else ""
            raise UnknownName(f"{prefix}unknown {self.what} '{name}'; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
