"""Allocators turn a global target into per-layer targets (the sparsity plan's levels).

An allocator is a function registered with its option class and capability flags::

    @ALLOCATORS.register("owl", options=OWLOptions, needs_calibration=True)
    def owl(context: AllocationContext) -> AllocationResult: ...

It reads what it needs from the :class:`AllocationContext` (the model's layers, the calibration data, the
run's pruner, its own options) and returns an :class:`AllocationResult`. Every allocator returns targets
whose parameter-weighted global sparsity equals the requested one exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from ..data import CalibrationData
from ..options import Options
from ..plan import LayerTarget
from ..pruners.base import Pruner
from ..registry import Registry

Allocation = Dict[str, LayerTarget]


@dataclass(frozen=True)
class Budget:
    """The global target: a sparsity and the pattern kind (``unstructured``, ``n:m`` or ``mixed-n:m``, with M)."""

    sparsity: float
    pattern: str
    m: Optional[int] = None


@dataclass
class AllocationContext:
    """Everything an allocator may look at."""

    model: nn.Module
    layers: List[Dict[str, nn.Module]]  # per decoder block: full name -> linear module
    budget: Budget
    options: Options  # the allocator's own options (its registered option class)
    pruner: Optional[Pruner] = None  # the run's pruner (the MSP search prunes with it)
    calibration: Optional[CalibrationData] = None
    runner: Any = None  # the BlockRunner of the model
    seed: int = 0
    batch_size: int = 1

    @property
    def numels(self) -> Dict[str, int]:
        return {name: module.weight.numel() for block in self.layers for name, module in block.items()}

    @property
    def modules(self) -> Dict[str, nn.Module]:
        return {name: module for block in self.layers for name, module in block.items()}

    def calibration_ids(self, what: str):
        """The calibration windows; ``what`` (e.g. "Fisher sensitivity") names who needs them in the error."""
        if self.calibration is None:
            raise ValueError(f"{what} needs calibration data: give the pruner a tokenizer, or calibration=.")
        return self.calibration.ids


@dataclass
class AllocationResult:
    """What an allocator hands back; :meth:`SparsityPlan.from_allocation` turns it into the plan.

    ``statistics``: input statistics the final prune should use instead of gathering its own in a sequential prune
    with ``targets`` (``None``, the standard). The MSP search with ``final_statistics="search"`` hands over those its
    weight bank pruned with, so the model saved is the one it scored, and the final prune needs no forward pass.
    Whoever uses them closes them (:class:`~optimum_msp.allocation.statistics.StatisticsStore`).

    ``search`` summarises how the plan was chosen (the MSP search: fitness of the seed, the uniform plan and
    the best plan, per-generation history) and is stored with the plan; ``report`` holds what the run cost
    (timings, memory, counters) and goes to the run report (``report.json``), never into ``config.json``.
    """

    targets: Allocation
    layer_sensitivity: Dict[str, float] = field(default_factory=dict)
    block_sensitivity: Dict[str, float] = field(default_factory=dict)
    search: Dict[str, Any] = field(default_factory=dict)
    report: Dict[str, Any] = field(default_factory=dict)
    statistics: Optional[Any] = None


ALLOCATORS: Registry[Any] = Registry("allocation")


def uniform_target(budget: Budget) -> LayerTarget:
    """The one target every layer gets under uniform allocation."""
    if budget.pattern == "n:m":
        return LayerTarget.nm(int(round((1.0 - budget.sparsity) * budget.m)), budget.m)
    if budget.pattern == "mixed-n:m":
        n = (1.0 - budget.sparsity) * budget.m
        if abs(n - round(n)) > 1e-9:
            raise ValueError(
                f"Uniform allocation cannot reach {budget.sparsity:.4g} sparsity with M={budget.m} "
                f"(N would be {n:.3g}); use allocation='owl', 'fisher' or 'msp', or a sparsity that is a "
                f"multiple of 1/{budget.m}."
            )
        return LayerTarget.nm(int(round(n)), budget.m)
    return LayerTarget(sparsity=budget.sparsity)
