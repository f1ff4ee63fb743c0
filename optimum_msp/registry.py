"""String-keyed registries: a new pruner or allocator is one file and one registration.

Each entry binds a name to its implementation, its option class (:mod:`optimum_msp.options`) and its
capability flags (e.g. ``needs_calibration``), so nothing else in the package has to know a family's
vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, Iterator, List, Type, TypeVar

from .options import NoOptions, Options

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    item: T
    options: Type[Options] = NoOptions
    flags: Dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Entry[T]] = {}

    def register(self, name: str, options: Type[Options] = NoOptions, **flags: Any) -> Callable[[T], T]:
        """Decorator: ``@PRUNERS.register("sparsegpt", options=SparseGPTOptions)``."""

        def decorator(item: T) -> T:
            if name in self._entries:
                raise ValueError(f"A {self.kind} named {name!r} is already registered.")
            self._entries[name] = Entry(name, item, options, dict(flags))
            return item

        return decorator

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"Unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}.") from None

    def get(self, name: str) -> T:
        return self.entry(name).item

    def options(self, name: str) -> Type[Options]:
        return self.entry(name).options

    def option_classes(self) -> List[Type[Options]]:
        return [entry.options for entry in self._entries.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
