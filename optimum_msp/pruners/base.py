"""The pruner interface: per-layer target in, pruned weights out.

A pruner sees one layer at a time: its ``[out, in]`` weight (fp32), the statistics of its inputs gathered
on calibration data (``None`` for data-free methods), and a :class:`~optimum_msp.plan.LayerTarget`. This
is the plug-in point for allocations: any plan (uniform, OWL, Fisher, MSP) drives any pruner.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..masks import nm_mask, unstructured_mask
from ..plan import LayerTarget
from ..registry import Registry


class Pruner:
    name: str = ""
    #: whether the method needs calibration activations (Wanda, SparseGPT) or only weights (magnitude)
    needs_calibration: bool = True

    def __init__(self, **options: Any):
        self.options = options

    def new_statistics(self, in_features: int) -> Optional[Any]:
        """A fresh accumulator of input statistics (``add_batch(x: [tokens, in])``), or ``None``."""
        return None

    def prune(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        """Return the pruned weight (same shape); ``weight`` is fp32 and must not be modified."""
        raise NotImplementedError


class ScorePruner(Pruner):
    """Pruners that rank weights by a score and zero the lowest ones, without updating the rest."""

    def scores(self, weight: torch.Tensor, stats: Optional[Any]) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        scores = self.scores(weight, stats)
        return nm_mask(scores, target.n, target.m) if target.is_nm else unstructured_mask(scores, target.sparsity)

    def prune(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        return weight * self.mask(weight, stats, target)


PRUNERS: Registry[type] = Registry("pruning method")


def get_pruner(name: str, **options: Any) -> Pruner:
    return PRUNERS.get(name)(**options)
