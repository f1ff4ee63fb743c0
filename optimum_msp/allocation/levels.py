"""Discrete per-unit sparsity levels with an exactly held global budget.

A *unit* is what gets one level: a decoder block (default ``granularity="block"``: all its targeted
linears share the level) or a single linear layer (``"layer"``). A unit's sparsity is
``base + step * s`` with an integer ``s``:

* mixed N:M: ``base = 0``, ``step = 1/M``, ``s = M - N`` (weights pruned per group);
* unstructured: ``base = target``, ``step = level_step``, ``s`` an offset from the target.

Units of equal size form a *group*; every group's ``s`` values sum to a constant, so the parameter-
weighted global sparsity equals the target exactly, and every move that keeps the sums (raise one unit,
lower another of the same group) keeps it exact. Per-unit bounds come from ``max_deviation`` around the
target (and N >= 1 for N:M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..options import Options, option
from ..plan import LayerTarget
from .base import Budget

Genome = Tuple[int, ...]


@dataclass
class LevelOptions(Options):
    """The level space of the non-uniform allocations (OWL, Fisher, MSP)."""

    granularity: str = option("block", "what one allocation level covers: a decoder block (all its targeted linears) "
                              "or each linear layer", choices=("block", "layer"))
    max_deviation: float = option(0.2, "non-uniform allocations keep every unit within target +- this sparsity",
                                  kind=float, low=0.0, high=1.0, high_open=True)
    level_step: float = option(0.025, "spacing of the unstructured sparsity levels (mixed N:M moves one N at a time)",
                               kind=float, low=0.0, high=1.0, low_open=True, high_open=True)
    max_layer_sparsity: float = option(0.95, "no unit is pruned beyond this sparsity", kind=float, low=0.0, high=1.0)

    def check_together(self, sparsity: Optional[float] = None, **_):
        if sparsity is not None and self.max_layer_sparsity < sparsity:
            raise ValueError(f"max_layer_sparsity must lie in [sparsity, 1] = [{sparsity:g}, 1], "
                             f"got {self.max_layer_sparsity}.")


@dataclass
class LevelSpace:
    units: List[List[str]]  # layer names of each unit, in forward order
    unit_blocks: List[int]  # decoder block of each unit
    numels: List[int]
    base: float
    step: float
    lower: List[int]
    upper: List[int]
    group_of: List[int]
    group_sums: Dict[int, int]
    m: Optional[int] = None  # set for mixed N:M

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def build(cls, budget: Budget, options: LevelOptions, layers: Sequence[Dict[str, object]],
              numels: Dict[str, int]) -> "LevelSpace":
        units: List[List[str]] = []
        unit_blocks: List[int] = []
        for block, block_layers in enumerate(layers):
            names = list(block_layers)
            if not names:
                continue
            if options.granularity == "block":
                units.append(names)
                unit_blocks.append(block)
            else:
                units.extend([name] for name in names)
                unit_blocks.extend(block for _ in names)
        unit_numels = [sum(numels[n] for n in unit) for unit in units]
        target, deviation = budget.sparsity, options.max_deviation
        if budget.pattern in ("mixed-n:m", "n:m"):
            m = budget.m
            base, step = 0.0, 1.0 / m
            low = max(0, math.ceil((target - deviation) * m - 1e-9))
            high = min(m - 1, math.floor((target + deviation) * m + 1e-9))  # keep N >= 1
            target_s = target * m
        else:
            m = None
            base, step = target, options.level_step
            low = -math.floor(min(deviation, target) / step + 1e-9)
            high = math.floor(min(deviation, options.max_layer_sparsity - target) / step + 1e-9)
            target_s = 0.0
        groups: Dict[int, List[int]] = {}
        for index, numel in enumerate(unit_numels):
            groups.setdefault(numel, []).append(index)
        group_of = [0] * len(units)
        group_sums = {}
        for group_id, (numel, members) in enumerate(sorted(groups.items())):
            exact = target_s * len(members)
            if abs(exact - round(exact)) > 1e-6:
                raise ValueError(
                    f"A {target:.4g} average cannot be reached exactly with M={m} over {len(members)} units of "
                    f"{numel} weights (it needs an average N of {(1 - target) * m:.4g}); pick a sparsity that is a "
                    f"multiple of 1/{m * len(members)}, or granularity='block'."
                )
            for index in members:
                group_of[index] = group_id
            group_sums[group_id] = int(round(exact))
            if not low * len(members) <= group_sums[group_id] <= high * len(members):
                raise ValueError(f"max_deviation={deviation} leaves no level around the target {target}.")
        return cls(units, unit_blocks, unit_numels, base, step, [low] * len(units), [high] * len(units),
                   group_of, group_sums, m)

    # ------------------------------------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.units)

    def sparsity(self, s: int) -> float:
        return self.base + self.step * s

    def target(self, s: int) -> LayerTarget:
        if self.m is not None:
            return LayerTarget.nm(self.m - s, self.m)
        return LayerTarget(sparsity=min(max(self.sparsity(s), 0.0), 1.0))

    def targets(self, genome: Genome) -> Dict[str, LayerTarget]:
        return {name: self.target(s) for unit, s in zip(self.units, genome) for name in unit}

    def global_sparsity(self, genome: Genome) -> float:
        total = sum(self.numels)
        return sum(n * self.sparsity(s) for n, s in zip(self.numels, genome)) / total

    def is_feasible(self, genome: Genome) -> bool:
        if any(not lo <= s <= hi for s, lo, hi in zip(genome, self.lower, self.upper)):
            return False
        sums: Dict[int, int] = {}
        for index, s in enumerate(genome):
            sums[self.group_of[index]] = sums.get(self.group_of[index], 0) + s
        return sums == self.group_sums

    def uniform(self) -> Genome:
        """The most uniform feasible genome (exactly uniform when the target is a level)."""
        return self.quantize([None] * len(self))

    # ------------------------------------------------------------------------------------ quantization
    def quantize(self, sparsities: Sequence[Optional[float]]) -> Genome:
        """Nearest feasible genome to continuous per-unit sparsities (``None``: the target).

        Per group: clip to bounds, shift so the group holds its exact sum, floor, then hand the remaining
        steps to the units with the largest fractional parts (largest-remainder rounding).
        """
        genome = [0] * len(self)
        for group_id, total in self.group_sums.items():
            members = [i for i in range(len(self)) if self.group_of[i] == group_id]
            mean_s = total / len(members)
            desired = [mean_s if sparsities[i] is None else (sparsities[i] - self.base) / self.step for i in members]
            # shift so the group's mean is exact before rounding (allocators give shapes, we give the level)
            shift = mean_s - sum(desired) / len(desired)
            desired = [min(max(d + shift, self.lower[i]), self.upper[i]) for d, i in zip(desired, members)]
            floors = [math.floor(d + 1e-9) for d in desired]
            remaining = total - sum(floors)
            order = sorted(range(len(members)), key=lambda k: (-(desired[k] - floors[k]), k))
            while remaining != 0:
                moved = False
                for k in order if remaining > 0 else reversed(order):
                    i = members[k]
                    if remaining > 0 and floors[k] < self.upper[i]:
                        floors[k] += 1
                        remaining -= 1
                        moved = True
                    elif remaining < 0 and floors[k] > self.lower[i]:
                        floors[k] -= 1
                        remaining += 1
                        moved = True
                    if remaining == 0:
                        break
                if not moved:
                    raise ValueError("No feasible level assignment within the bounds; raise max_deviation.")
            for k, i in enumerate(members):
                genome[i] = floors[k]
        result = tuple(genome)
        assert self.is_feasible(result)
        return result
