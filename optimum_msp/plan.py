"""The sparsity plan: what every pruned layer must hold, stored in the model's ``config.json``.

A plan is produced by an allocator (uniform, OWL, Fisher, MSP search), consumed by any pruner, recorded
in ``config.json`` under :data:`CONFIG_KEY`, and verified against the weights whenever a pruned checkpoint
is loaded. Parsing is strict on purpose: a plan is a contract about the weights, so unknown keys, wrong
types, out-of-range numbers and layers that do not exist are errors that name the offending entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Set

import torch

from .masks import SparsityReport, measure_layer

CONFIG_KEY = "sparsity_plan"
FORMAT_VERSION = 1
PATTERNS = ("unstructured", "n:m", "mixed-n:m")
#: bounds of the free-form ``calibration`` / ``search`` entries: what a run writes is 2 levels deep and a few
#: thousand numbers (the search history); a hand-made entry far beyond that is refused before anything walks it
#: recursively (transformers deep-copies and re-encodes the config, which a deeply nested entry breaks)
MAX_ENTRY_DEPTH = 8
MAX_ENTRY_ITEMS = 100_000


class PlanError(ValueError):
    """A plan that is malformed, or weights that do not satisfy their plan."""


@dataclass(frozen=True)
class LayerTarget:
    """What one layer must hold: a sparsity, and for N:M layers the ``n`` kept out of every ``m``."""

    sparsity: float
    n: Optional[int] = None
    m: Optional[int] = None

    def __post_init__(self):
        if (self.n is None) != (self.m is None):
            raise PlanError(f"An N:M target needs both n and m, got n={self.n}, m={self.m}.")
        if self.is_nm:
            if self.m <= 0 or not 0 <= self.n <= self.m:
                raise PlanError(f"N:M target {self.n}:{self.m} must have M >= 1 and 0 <= N <= M.")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)
        elif not 0.0 <= self.sparsity <= 1.0:
            raise PlanError(f"A layer sparsity must lie in [0, 1], got {self.sparsity}.")

    @classmethod
    def nm(cls, n: int, m: int) -> "LayerTarget":
        return cls(sparsity=1.0 - n / m, n=n, m=m)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.4f}"


def required_zeros(rows: int, cols: int, target: LayerTarget, per_row: Optional[bool] = None) -> int:
    """Fewest zeros a ``[rows, cols]`` weight pruned to ``target`` may hold: the target up to the rounding the
    pruner is allowed.

    * N:M: every group of ``m`` inputs drops ``m - n`` (exact; the groups themselves are checked separately).
    * Unstructured, pruners that choose per output row (``per_row=True``: magnitude, Wanda, any pruner with
      ``masks_per_row``): they prune ``round(sparsity * rows * cols)`` weights, rows differing by at most one
      (:func:`optimum_msp.masks.row_prune_counts`); checkpoints of earlier builds pruned
      ``round(sparsity * cols)`` in every row. At least ``rows * floor(sparsity * cols)`` accepts both.
    * Unstructured, SparseGPT (``per_row=False``): it selects over column blocks of ``rows * width`` weights and
      now carries the rounding from block to block (``round(sparsity * rows * cols)`` in all); before, it
      rounded once per block, which a ``width`` as small as 1 (its ``block_size``, not recorded in the plan)
      lets fall short by half a weight per input column: ``ceil(sparsity * rows * cols - cols / 2)``, or the
      per-row count when that is lower.
    * ``per_row=None`` (a method this process does not know): the lower of the two.

    Measured with the per-block and same-count-per-row rounding on the tiny test models (LLaMA, GPT-2, OPT;
    sparsity 0.3, 1/3, 0.5, 0.537, 0.7, 0.9; SparseGPT with block sizes 128 and 48): magnitude and Wanda never
    fell below the per-row count (they were up to 71 zeros under ``sparsity * numel``, one row's rounding times
    the rows), SparseGPT at most 0.6 of a zero under ``sparsity * numel``. The tolerance is thus a fraction of
    one weight per row or column: a checkpoint whose layer was swapped for a denser one fails by thousands of
    zeros.
    """
    if target.is_nm:
        return rows * (cols // target.m) * (target.m - target.n)
    # + 1e-9: 0.7 * 10 is 6.999999999999999 in binary; the pruner's round() gives 7
    by_row = rows * math.floor(target.sparsity * cols + 1e-9)
    if per_row:
        return by_row
    by_block = max(0, math.ceil(target.sparsity * rows * cols - cols / 2 - 1e-9))
    return min(by_row, by_block)


def block_prefixes(name: str) -> Set[str]:
    """Every ``prefix`` for which ``name`` reads ``<prefix>.<index>.<layer>``: where its decoder-block list may be."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) - 1) if parts[i].isdigit()}


def _check_entry(key: str, value: Any) -> None:
    """A free-form plan entry (``calibration``, ``search``): JSON values, bounded in depth and size (iteratively,
    so that a hostile entry cannot exhaust the stack here either)."""
    stack: List[tuple] = [(value, 0)]
    items = 0
    while stack:
        current, depth = stack.pop()
        items += 1
        if depth > MAX_ENTRY_DEPTH:
            raise PlanError(f"The sparsity plan's {key!r} is nested deeper than {MAX_ENTRY_DEPTH} levels; a plan "
                            "written by optimum-msp nests 2. Remove or flatten that entry in config.json.")
        if items > MAX_ENTRY_ITEMS:
            raise PlanError(f"The sparsity plan's {key!r} holds more than {MAX_ENTRY_ITEMS:,} values; trim it in "
                            "config.json.")
        if isinstance(current, Mapping):
            for sub_key, sub_value in current.items():
                if not isinstance(sub_key, str):
                    raise PlanError(f"The sparsity plan's {key!r} has a non-string key {sub_key!r}.")
                stack.append((sub_value, depth + 1))
        elif isinstance(current, (list, tuple)):
            stack.extend((item, depth + 1) for item in current)
        elif current is not None and not isinstance(current, (str, int, float, bool)):
            raise PlanError(f"The sparsity plan's {key!r} holds a {type(current).__name__}; only JSON values are "
                            "allowed.")


@dataclass
class LayerPlan:
    target: LayerTarget
    numel: int
    achieved: Optional[float] = None
    sensitivity: Optional[float] = None

    _KEYS = {"sparsity", "n", "m", "numel", "achieved", "sensitivity"}

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"sparsity": self.target.sparsity, "numel": self.numel}
        if self.target.is_nm:
            out.update(n=self.target.n, m=self.target.m)
        if self.achieved is not None:
            out["achieved"] = self.achieved
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity
        return out

    @classmethod
    def from_dict(cls, name: str, data: Any) -> "LayerPlan":
        where = f"sparsity plan, layer {name!r}"
        if not isinstance(data, Mapping):
            raise PlanError(f"{where}: expected an object, got {type(data).__name__}.")
        unknown = set(data) - cls._KEYS
        if unknown:
            raise PlanError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(cls._KEYS)}.")
        sparsity = _number(data.get("sparsity"), f"{where}: 'sparsity'", 0.0, 1.0)
        numel = data.get("numel")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel <= 0:
            raise PlanError(f"{where}: 'numel' must be a positive integer, got {numel!r}.")
        n, m = data.get("n"), data.get("m")
        for key, value in (("n", n), ("m", m)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise PlanError(f"{where}: {key!r} must be an integer, got {value!r}.")
        try:
            target = LayerTarget(sparsity=sparsity, n=n, m=m)
        except PlanError as error:
            raise PlanError(f"{where}: {error}") from None
        if target.is_nm and abs(target.sparsity - sparsity) > 1e-6:
            raise PlanError(f"{where}: sparsity {sparsity} contradicts its N:M target {n}:{m}.")
        achieved = data.get("achieved")
        if achieved is not None:
            achieved = _number(achieved, f"{where}: 'achieved'", 0.0, 1.0)
        sensitivity = data.get("sensitivity")
        if sensitivity is not None:
            sensitivity = _number(sensitivity, f"{where}: 'sensitivity'", 0.0, math.inf)
        return cls(target=target, numel=numel, achieved=achieved, sensitivity=sensitivity)


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{what} must be a finite number, got {value!r}.")
    if not low <= value <= high:
        raise PlanError(f"{what} must lie in [{low}, {high}], got {value}.")
    return float(value)


@dataclass
class SparsityPlan:
    """Per-layer targets plus how they were chosen (method, allocation, calibration, search summary)."""

    method: str
    pattern: str
    allocation: str
    target_sparsity: float
    layers: Dict[str, LayerPlan]
    m: Optional[int] = None
    calibration: Dict[str, Any] = field(default_factory=dict)
    search: Dict[str, Any] = field(default_factory=dict)
    block_sensitivity: Dict[str, float] = field(default_factory=dict)

    _KEYS = {
        "format_version", "method", "pattern", "allocation", "target_sparsity", "achieved_sparsity",
        "planned_sparsity", "m", "layers", "calibration", "search", "block_sensitivity",
    }

    @classmethod
    def from_allocation(cls, result: Any, *, method: str, allocation: str, pattern: str, target_sparsity: float,
                        m: Optional[int], numels: Mapping[str, int], achieved: Mapping[str, float],
                        calibration: Optional[Mapping[str, Any]] = None) -> "SparsityPlan":
        """The plan of a finished run: an allocator's result (``optimum_msp.allocation.AllocationResult``: targets,
        sensitivities, search summary) with what the pruner achieved. What the run cost stays out of it."""
        return cls(
            method=method,
            pattern=pattern,
            allocation=allocation,
            target_sparsity=target_sparsity,
            m=m,
            layers={
                name: LayerPlan(target, numels[name], achieved.get(name), result.layer_sensitivity.get(name))
                for name, target in result.targets.items()
            },
            calibration=dict(calibration or {}),
            search=dict(result.search),
            block_sensitivity=dict(result.block_sensitivity),
        )

    # ----------------------------------------------------------------------------------------- numbers
    @property
    def planned_sparsity(self) -> float:
        """Parameter-weighted sparsity the per-layer targets add up to."""
        total = sum(layer.numel for layer in self.layers.values())
        return sum(layer.numel * layer.target.sparsity for layer in self.layers.values()) / total

    @property
    def achieved_sparsity(self) -> Optional[float]:
        if any(layer.achieved is None for layer in self.layers.values()) or not self.layers:
            return None
        total = sum(layer.numel for layer in self.layers.values())
        return sum(layer.numel * layer.achieved for layer in self.layers.values()) / total

    # ------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> Dict[str, Any]:
        out = {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "pattern": self.pattern,
            "allocation": self.allocation,
            "target_sparsity": self.target_sparsity,
            "planned_sparsity": self.planned_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "m": self.m,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            "calibration": dict(self.calibration),
        }
        if self.search:
            out["search"] = dict(self.search)
        if self.block_sensitivity:
            out["block_sensitivity"] = dict(self.block_sensitivity)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "SparsityPlan":
        if not isinstance(data, Mapping):
            raise PlanError(f"The sparsity plan must be a JSON object, got {type(data).__name__}.")
        unknown = set(data) - cls._KEYS
        if unknown:
            raise PlanError(f"The sparsity plan has unknown keys {sorted(unknown)}; allowed: {sorted(cls._KEYS)}.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise PlanError(
                f"Sparsity plan format_version {version!r} is not supported (this optimum-msp reads "
                f"{FORMAT_VERSION}); upgrade optimum-msp or re-prune the model."
            )
        for key in ("method", "pattern", "allocation"):
            if not isinstance(data.get(key), str):
                raise PlanError(f"The sparsity plan's {key!r} must be a string, got {data.get(key)!r}.")
        if data["pattern"] not in PATTERNS:
            raise PlanError(f"The sparsity plan's pattern {data['pattern']!r} is not one of {PATTERNS}.")
        target = _number(data.get("target_sparsity"), "The sparsity plan's 'target_sparsity'", 0.0, 1.0)
        m = data.get("m")
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m <= 0):
            raise PlanError(f"The sparsity plan's 'm' must be a positive integer or null, got {m!r}.")
        layers = data.get("layers")
        if not isinstance(layers, Mapping) or not layers:
            raise PlanError("The sparsity plan's 'layers' must be a non-empty object of layer name -> target.")
        for key in ("calibration", "search", "block_sensitivity"):
            if not isinstance(data.get(key, {}), Mapping):
                raise PlanError(f"The sparsity plan's {key!r} must be an object.")
        for key in ("calibration", "search"):
            _check_entry(key, data.get(key, {}))
        block_sensitivity = {}
        for block, value in data.get("block_sensitivity", {}).items():
            if not str(block).isdigit():
                raise PlanError(f"The sparsity plan's 'block_sensitivity' keys are decoder block indices, got {block!r}.")
            block_sensitivity[block] = _number(value, f"The sparsity plan's 'block_sensitivity' of block {block}",
                                               0.0, math.inf)
        parsed = {name: LayerPlan.from_dict(name, value) for name, value in layers.items()}
        _check_layer_names(parsed)
        _check_patterns(data["pattern"], m, parsed)
        return cls(
            method=data["method"],
            pattern=data["pattern"],
            allocation=data["allocation"],
            target_sparsity=target,
            m=m,
            layers=parsed,
            calibration=dict(data.get("calibration", {})),
            search=dict(data.get("search", {})),
            block_sensitivity=block_sensitivity,
        )

    @classmethod
    def from_config(cls, config: Any) -> Optional["SparsityPlan"]:
        """The plan stored in a transformers config (``None`` when the model is not pruned)."""
        data = getattr(config, CONFIG_KEY, None)
        return None if data is None else cls.from_dict(data)

    # ------------------------------------------------------------------------------------------ checks
    def measure(self, model: torch.nn.Module) -> SparsityReport:
        """Measure every planned layer of ``model``; a planned layer that does not exist is an error."""
        from torch import nn

        from .modeling.blocks import is_linear
        from .modeling.offload import read_matrix

        modules = dict(model.named_modules())
        report = {}
        for name, layer in self.layers.items():
            module = modules.get(name)
            if module is None or getattr(module, "weight", None) is None:
                raise PlanError(f"The sparsity plan names layer {name!r}, which this model does not have.")
            if not is_linear(module) or module.weight.dim() != 2:
                raise PlanError(
                    f"The sparsity plan names layer {name!r}, a {type(module).__name__} with a "
                    f"{module.weight.dim()}-D weight: only linear layers inside the decoder blocks are pruned."
                )
            prefixes = block_prefixes(name)
            if prefixes and not any(isinstance(modules.get(prefix), nn.ModuleList) for prefix in prefixes):
                raise PlanError(f"The sparsity plan names layer {name!r}, which is not inside a list of decoder "
                                "blocks of this model: only layers inside the decoder blocks are pruned.")
            weight = read_matrix(module)  # offloaded layers: the stored values, not the meta placeholder
            if weight.numel() != layer.numel:
                raise PlanError(
                    f"The sparsity plan says layer {name!r} has {layer.numel} weights, the model has {weight.numel()}."
                )
            nm = (layer.target.n, layer.target.m) if layer.target.is_nm else None
            report[name] = measure_layer(weight.detach(), nm)
        return SparsityReport(report)

    def verify(self, model: torch.nn.Module, per_row: Optional[bool] = None) -> SparsityReport:
        """Raise :class:`PlanError`, naming the layer, if any weight breaks the plan.

        ``per_row``: whether the plan's method chooses its masks per output row, which sets the rounding allowed
        (:func:`required_zeros`); ``None`` (the caller does not know the method) allows the looser of the two.
        :func:`optimum_msp.checkpoint.verify_pruned` looks the method up in the registry of pruners."""
        from .modeling.blocks import weight_matrix

        report = self.measure(model)
        modules = dict(model.named_modules())
        for name, measured in report.layers.items():
            layer = self.layers[name]
            if measured.nm_violations:
                raise PlanError(
                    f"Layer {name!r} breaks its {layer.target.describe()} pattern in {measured.nm_violations} "
                    "group(s): the weights do not match the sparsity plan in config.json."
                )
            # The weights are held to the *target* (up to the pruner's rounding), never to the `achieved` number
            # the file reports: a forged `achieved` cannot lower the bar. A recorded `achieved` above the target
            # (e.g. SparseGPT zeroing dead inputs) raises it: weights may only gain zeros after pruning.
            rows, cols = weight_matrix(modules[name]).shape
            required, floor = required_zeros(rows, cols, layer.target, per_row), layer.target.sparsity
            if layer.achieved is not None and math.floor(layer.achieved * layer.numel + 1e-6) > required:
                required, floor = math.floor(layer.achieved * layer.numel + 1e-6), layer.achieved
            if measured.zeros < required:
                # counts, not rounded fractions: 0.49996 and 0.5 both print as 0.5000
                raise PlanError(
                    f"Layer {name!r} has {measured.zeros:,} zero weights of {layer.numel:,}, but its plan requires "
                    f"{floor:.6g} sparsity (at least {required:,} zeros): the weights do not match the sparsity plan "
                    "in config.json."
                )
        return report

    def layer_table(self) -> str:
        lines = ["| layer | target | achieved |", "|---|---:|---:|"]
        for name, layer in self.layers.items():
            achieved = "-" if layer.achieved is None else f"{layer.achieved:.4f}"
            lines.append(f"| {name} | {layer.target.describe()} | {achieved} |")
        return "\n".join(lines)


def _check_layer_names(layers: Mapping[str, LayerPlan]) -> None:
    """Every planned layer sits in one list of decoder blocks: ``<blocks>.<index>.<layer>``, one ``<blocks>``.

    Embeddings, ``lm_head`` and norms are never pruned; a plan naming them is not one this library wrote."""
    common: Optional[Set[str]] = None
    for name in layers:
        prefixes = block_prefixes(name)
        if not prefixes:
            raise PlanError(f"sparsity plan, layer {name!r}: not a layer inside the decoder blocks (expected "
                            "'<blocks>.<index>.<layer>', e.g. 'model.layers.0.mlp.up_proj'); embeddings, lm_head and "
                            "norms are never pruned.")
        common = prefixes if common is None else common & prefixes
        if not common:
            raise PlanError(f"sparsity plan, layer {name!r}: not in the same list of decoder blocks as the layers "
                            "before it.")


def _check_patterns(pattern: str, m: Optional[int], layers: Mapping[str, LayerPlan]) -> None:
    """Layer targets agree with the plan's pattern: N:M layers (all with the plan's ``m``) under an N:M pattern,
    plain sparsities under ``unstructured``."""
    if pattern == "unstructured":
        if m is not None:
            raise PlanError(f"The sparsity plan's 'm' is {m} but its pattern is 'unstructured'; m belongs to N:M "
                            "patterns.")
        for name, layer in layers.items():
            if layer.target.is_nm:
                raise PlanError(f"sparsity plan, layer {name!r}: an N:M target {layer.target.describe()} in an "
                                "'unstructured' plan.")
        return
    if m is None:
        raise PlanError(f"The sparsity plan's pattern is {pattern!r} but its 'm' is null.")
    for name, layer in layers.items():
        if not layer.target.is_nm:
            raise PlanError(f"sparsity plan, layer {name!r}: pattern {pattern!r} needs an N:M target (n and m), got "
                            f"sparsity {layer.target.sparsity}.")
        if layer.target.m != m:
            raise PlanError(f"sparsity plan, layer {name!r}: its m={layer.target.m} contradicts the plan's m={m}.")
