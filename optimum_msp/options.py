"""Option classes: the settings of one method family, declared once and bound to it at registration.

Every family that has settings (SparseGPT's column block and dampening, OWL's threshold, the Fisher pass,
the MSP search) declares them as a dataclass of :func:`option` fields next to its implementation and
registers it with the method (``PRUNERS.register("sparsegpt", options=SparseGPTOptions)``). From those
declarations alone come:

* the names :class:`~optimum_msp.MSPConfig` accepts (it stays the one flat object users build);
* the validation of each value (type, range, choices), with an error that names the field;
* the command-line flags, their help and defaults (``optimum-msp prune``, the bench scripts, the examples).

So a new method with settings is one file and one registration.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

#: sentinel of :func:`option`'s ``low``/``high``: no bound
_UNBOUNDED = None


def option(default: Any, help: str, *, kind: type = str, choices: Optional[Sequence[Any]] = None,
           low: Optional[float] = _UNBOUNDED, high: Optional[float] = _UNBOUNDED, low_open: bool = False,
           high_open: bool = False, optional: bool = False, is_list: bool = False) -> Any:
    """A dataclass field with what validation and the command line need to know about it.

    ``kind``: ``str``, ``int``, ``float`` or ``bool`` (of each item when ``is_list``); ``optional``: ``None``
    is accepted; ``low``/``high``: inclusive bounds unless ``low_open``/``high_open``.
    """
    metadata = dict(help=help, kind=kind, choices=tuple(choices) if choices else None, low=low, high=high,
                    low_open=low_open, high_open=high_open, optional=optional, is_list=is_list)
    if is_list:
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FieldSpec:
    """One declared option: its owner class, name, default and the metadata given to :func:`option`."""

    owner: type
    name: str
    default: Any
    help: str
    kind: type
    choices: Optional[Tuple[Any, ...]]
    low: Optional[float]
    high: Optional[float]
    low_open: bool
    high_open: bool
    optional: bool
    is_list: bool

    def check(self, value: Any) -> Any:
        """``value`` if it is valid for this field (a list field also takes one string); else ``ValueError``."""
        if value is None and self.optional:
            return None
        if self.is_list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, self.kind) for v in value):
                raise ValueError(f"{self.name} must be a list of {self.kind.__name__}, got {value!r}.")
            return list(value)
        if not _is_kind(value, self.kind):
            raise ValueError(f"{self.name} must be {_kind_name(self.kind)}{' or None' if self.optional else ''}, "
                             f"got {value!r}.")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {list(self.choices)}, got {value!r}.")
        if self.kind in (int, float):
            below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if below or above:
                raise ValueError(f"{self.name} must {self.range_text()}, got {value!r}.")
        return float(value) if self.kind is float else value

    def range_text(self) -> str:
        """What the bounds ask, as the end of "<name> must ..."."""
        if self.kind is int and self.high is None and self.low in (0, 1) and not self.low_open:
            return "be a positive integer" if self.low == 1 else "be a non-negative integer"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"lie in {left}{low}, {high}{right}"


def _is_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[kind]


@dataclass
class Options:
    """Base of every option class: fields declared with :func:`option`, checked by :meth:`check`."""

    @classmethod
    def specs(cls) -> Iterator[FieldSpec]:
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            owner = next(k for k in cls.__mro__ if f.name in getattr(k, "__annotations__", {}))
            yield FieldSpec(owner, f.name, default, meta["help"], meta["kind"], meta["choices"], meta["low"],
                            meta["high"], meta["low_open"], meta["high_open"], meta["optional"], meta["is_list"])

    @classmethod
    def from_values(cls, values: Dict[str, Any]) -> "Options":
        """An instance from a mapping holding (at least) this class's field names."""
        return cls(**{spec.name: values[spec.name] for spec in cls.specs() if spec.name in values})

    def check(self, **context: Any) -> None:
        """Check every field's type and range, then :meth:`check_together`; ``ValueError`` names the field."""
        for spec in self.specs():
            setattr(self, spec.name, spec.check(getattr(self, spec.name)))
        self.check_together(**context)

    def check_together(self, **context: Any) -> None:
        """Rules across fields, or against the run's target (``context``: e.g. ``sparsity``)."""


@dataclass
class NoOptions(Options):
    """For methods without settings."""
