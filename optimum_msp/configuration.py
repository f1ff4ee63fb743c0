"""``MSPConfig``: the one object users build for a pruning run; serialisable, and usable as the
``quantization_config`` of ``transformers``' ``from_pretrained`` (prune-on-load).

It is flat on purpose (``MSPConfig(method="sparsegpt", dampening=0.05, allocation="msp", generations=20)``),
but it knows no family's vocabulary: its names are the run's own fields (:class:`RunOptions`) plus the
fields of every registered option class (:mod:`optimum_msp.options`), each validated by the class that
declares it. :meth:`MSPConfig.resolved` returns the normalised copy a run uses (an N:M pattern gives its
sparsity and M; a fixed N:M with a non-uniform allocation becomes a per-layer N:M); the config itself keeps
what the user asked (an unset ``sparsity`` or ``m`` takes the value its pattern implies).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from transformers.utils.quantization_config import QuantizationConfigMixin

from .allocation import ALLOCATORS, Budget
from .data import BOS_CHOICES
from .options import FieldSpec, Options, option
from .presets import preset_values
from .pruners import PRUNERS

logger = logging.getLogger(__name__)

CONFIG_NAME = "msp_config.json"
QUANT_METHOD = "msp"
PATTERN_KINDS = ("unstructured", "n:m", "mixed-n:m")


def parse_pattern(pattern: str) -> Tuple[str, Optional[int], Optional[int]]:
    """``"unstructured"`` -> (kind, None, None); ``"2:4"`` -> ("n:m", 2, 4); ``"mixed-n:m"`` -> (kind, None, None)."""
    text = str(pattern).strip().lower()
    if text in ("unstructured", "mixed-n:m"):
        return text, None, None
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if m <= 0:
            raise ValueError(f"pattern {pattern!r}: the group size M must be >= 1.")
        if not 0 <= n <= m:
            raise ValueError(
                f"pattern {pattern!r}: N (weights kept per group of M) must satisfy 0 <= N <= M; "
                f"for example '2:4' keeps 2 of every 4 weights (50% sparse)."
            )
        return "n:m", n, m
    raise ValueError(
        f"Unknown pattern {pattern!r}: use 'unstructured', an N:M such as '2:4', or 'mixed-n:m' (with m=)."
    )


@dataclass
class RunOptions(Options):
    """What every run has, whatever its methods: what to prune, how much, and on which data."""

    method: str = option("wanda", "pruning method (magnitude | wanda | sparsegpt, or any registered one)")
    sparsity: Optional[float] = option(
        None, "target global (parameter-weighted) sparsity of the targeted layers; derived from a fixed N:M "
        "pattern, 0.5 otherwise", kind=float, low=0.0, high=1.0, high_open=True, optional=True)
    pattern: str = option(
        "unstructured", "unstructured | N:M (N weights kept in every M consecutive inputs: '2:4' is 50 % sparse) "
        "| mixed-n:m (one N per layer, for a fixed m)")
    m: Optional[int] = option(None, "group size M of mixed-n:m (default 8)", kind=int, low=1, optional=True)
    allocation: str = option("uniform", "how sparsity is spread over layers (uniform | owl | fisher | msp)")
    calibration_dataset: str = option("wikitext2", "wikitext2 | c4 | a local .txt/.raw/.jsonl file")
    calibration_split: Optional[str] = option(
        None, "split to calibrate on (default: validation for wikitext2, train for c4)", optional=True)
    num_calibration_samples: int = option(32, "random calibration windows", kind=int, low=1)
    seqlen: int = option(2048, "tokens per calibration window, the BOS token included when there is one",
                         kind=int, low=1)
    bos: str = option(
        "auto", "start every window the model is fed (calibration, Fisher, search fitness, perplexity) with the "
        "tokenizer's BOS token: auto = when the tokenizer adds one to a plain encode (as lm-eval does), always, or "
        "never (the literature protocol of the LLaMA tables)", choices=BOS_CHOICES)
    seed: int = option(0, "seed of the calibration windows, the held-out windows and the search", kind=int,
                       low=0, high=2**32 - 1)
    targets: List[str] = option(
        ["Linear"], "layers to prune inside the decoder blocks: names, name suffixes, class names or "
        "re:<regex> (embeddings and lm_head are never pruned)", is_list=True)
    ignore: List[str] = option([], "layers to leave dense, same forms as targets", is_list=True)
    block_name: Optional[str] = option(
        None, "dotted name of the decoder-block ModuleList, when it cannot be found automatically", optional=True)
    batch_size: int = option(1, "calibration windows per forward pass", kind=int, low=1)


def config_fields() -> Dict[str, FieldSpec]:
    """Every name :class:`MSPConfig` accepts, with the option class that declares it: the run's own fields,
    then each registered pruner's and allocator's. The command line is generated from this."""
    fields: Dict[str, FieldSpec] = {}
    classes = [RunOptions] + PRUNERS.option_classes() + ALLOCATORS.option_classes()
    for cls in classes:
        for spec in cls.specs():
            known = fields.setdefault(spec.name, spec)
            if known.owner is not spec.owner and known.default != spec.default:
                raise RuntimeError(f"Option {spec.name!r} is declared by {known.owner.__name__} and "
                                   f"{spec.owner.__name__} with different defaults; rename one.")
    return fields


class MSPConfig(QuantizationConfigMixin):
    """Configuration of a pruning run: :class:`RunOptions` plus the options of the chosen method and allocation.

    >>> MSPConfig(method="sparsegpt", sparsity=0.75, allocation="msp", generations=20)

    Every keyword is a field of :class:`RunOptions` or of a registered option class (``SparseGPTOptions``,
    ``OWLOptions``, ``FisherOptions``, ``SearchOptions``, ...); ``optimum-msp prune --help`` lists them all with
    their defaults. Values are validated at construction; an error names the field. Options of a method or
    allocation that the run does not use are accepted (a saved config stays loadable after ``method`` changes),
    left out of :meth:`to_dict`, and a warning is logged when such an option was given a non-default value.
    """

    def __init__(self, **values: Any):
        quant_method = values.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method of an MSPConfig is {QUANT_METHOD!r}, got {quant_method!r}.")
        fields = config_fields()
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"Unknown MSPConfig keys {sorted(unknown)}; known keys: {sorted(fields)}.")
        for name, spec in fields.items():
            setattr(self, name, values[name] if name in values else copy.deepcopy(spec.default))
        self.quant_method = QUANT_METHOD
        resolved = self._resolved_values()
        # unset sparsity / m take the values the pattern implies (defaults, not a rewrite of what was asked);
        # the pattern itself stays as given: ``resolved()`` holds its canonical form
        for name in ("sparsity", "m"):
            if getattr(self, name) is None:
                setattr(self, name, resolved[name])
        unused = [name for name in values if name not in self._used_names()
                  and values[name] != fields[name].default]
        if unused:
            logger.warning("%s ignored: not an option of method=%r or allocation=%r.",
                           ", ".join(f"{name}={values[name]!r}" for name in unused), self.method, self.allocation)

    # --------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every value (type, range, consistency); ``ValueError`` names the field. Changes nothing."""
        self._resolved_values()

    def _resolved_values(self) -> Dict[str, Any]:
        fields = config_fields()
        values = {name: fields[name].check(getattr(self, name)) for name in fields}
        if values["method"] not in PRUNERS:
            raise ValueError(f"Unknown method {values['method']!r}; choose one of {list(PRUNERS)}.")
        if values["allocation"] not in ALLOCATORS:
            raise ValueError(f"Unknown allocation {values['allocation']!r}; choose one of {list(ALLOCATORS)}.")
        values.update(_resolve_pattern(values["pattern"], values["sparsity"], values["m"], values["allocation"]))
        for cls in PRUNERS.option_classes() + ALLOCATORS.option_classes():
            cls.from_values(values).check(sparsity=values["sparsity"])
        return values

    def resolved(self) -> "MSPConfig":
        """The normalised copy a run uses: ``sparsity`` and ``m`` filled in, the pattern in canonical form."""
        values = self._resolved_values()
        values.pop("quant_method", None)
        return MSPConfig(**values)

    def _used_names(self) -> set:
        classes = (RunOptions, PRUNERS.options(self.method), ALLOCATORS.options(self.allocation))
        return {spec.name for cls in classes for spec in cls.specs()}

    # ------------------------------------------------------------------------------------- derived views
    @property
    def nm(self) -> Optional[Tuple[int, int]]:
        """(n, m) of a fixed N:M pattern, else ``None`` (of the resolved pattern)."""
        kind, n, m = parse_pattern(self._resolved_values()["pattern"])
        return (n, m) if kind == "n:m" else None

    @property
    def pattern_kind(self) -> str:
        return parse_pattern(self._resolved_values()["pattern"])[0]

    def budget(self) -> Budget:
        """The global target allocators hold exactly (sparsity, pattern kind, M)."""
        values = self._resolved_values()
        return Budget(values["sparsity"], parse_pattern(values["pattern"])[0], values["m"])

    def pruner_options(self) -> Options:
        return PRUNERS.options(self.method).from_values(self._resolved_values())

    def allocation_options(self) -> Options:
        return ALLOCATORS.options(self.allocation).from_values(self._resolved_values())

    @property
    def needs_calibration(self) -> bool:
        """Whether the chosen method or allocation needs calibration data (the one place this is decided)."""
        return bool(PRUNERS.get(self.method).needs_calibration
                    or ALLOCATORS.entry(self.allocation).flags.get("needs_calibration", False))

    # -------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> Dict[str, Any]:
        """The run's fields and the options of its method and allocation (plus ``quant_method``)."""
        used = self._used_names()
        out = {name: copy.deepcopy(getattr(self, name)) for name in config_fields() if name in used}
        out["quant_method"] = QUANT_METHOD
        return out

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MSPConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"MSPConfig({json.dumps(self.to_dict(), sort_keys=True)})"

    @classmethod
    def from_preset(cls, preset: str, **values: Any) -> "MSPConfig":
        """A config from a named preset (:mod:`optimum_msp.presets`) with ``values`` on top: what is given here wins.

        >>> MSPConfig.from_preset("quality", method="sparsegpt", sparsity=0.75, allocation="msp")
        """
        return cls(**{**preset_values(preset), **values})

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        fields = set(config_fields()) | {"quant_method"}
        unknown = set(config_dict) - fields
        if unknown:
            raise ValueError(f"Unknown MSPConfig keys {sorted(unknown)}; known keys: {sorted(fields)}.")
        known = {key: value for key, value in kwargs.items() if key in fields}
        unused = {key: value for key, value in kwargs.items() if key not in fields}
        config = cls(**{**config_dict, **known})
        return (config, unused) if return_unused_kwargs else config

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs) -> "MSPConfig":
        """Read ``msp_config.json`` from a folder (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} at {path}.")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON: {error}") from None
        return cls.from_dict(data, **kwargs)


def _resolve_pattern(pattern: str, sparsity: Optional[float], m: Optional[int], allocation: str) -> Dict[str, Any]:
    """Canonical ``pattern``, ``sparsity`` and ``m`` (raises on contradictions); changes nothing."""
    kind, n, pattern_m = parse_pattern(pattern)
    if kind == "n:m":
        implied = 1.0 - n / pattern_m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"pattern {n}:{pattern_m} is {implied:.4g} sparse but sparsity={sparsity} was asked; drop "
                "sparsity, or use pattern='mixed-n:m' with m= to reach another average."
            )
        if m is not None and m != pattern_m:
            raise ValueError(f"pattern {n}:{pattern_m} has M={pattern_m} but m={m} was given.")
        # a non-uniform allocation of N:M is a per-layer N around the average N:M
        return {"pattern": f"{n}:{pattern_m}" if allocation == "uniform" else "mixed-n:m", "sparsity": implied,
                "m": pattern_m}
    if kind == "unstructured" and m is not None:
        raise ValueError("m is only meaningful with pattern='mixed-n:m' or an N:M pattern.")
    return {"pattern": kind, "sparsity": 0.5 if sparsity is None else sparsity,
            "m": (8 if m is None else m) if kind == "mixed-n:m" else None}
