"""The pruner interface: per-layer target in, pruned weights out.

A pruner sees one layer at a time: its ``[out, in]`` weight (fp32), the statistics of its inputs gathered
on calibration data (``None`` for data-free methods; see :mod:`optimum_msp.statistics`), and a
:class:`~optimum_msp.plan.LayerTarget`. This is the plug-in point for allocations: any plan (uniform, OWL,
Fisher, MSP) drives any pruner.

A pruner is registered with its option class, which is all it may be configured with::

    @PRUNERS.register("sparsegpt", options=SparseGPTOptions)
    class SparseGPTPruner(Pruner): ...
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..masks import nm_mask, unstructured_mask
from ..options import NoOptions, Options
from ..plan import LayerTarget
from ..registry import Registry


class Pruner:
    name: str = ""
    #: the method needs calibration activations (Wanda, SparseGPT) or only weights (magnitude)
    needs_calibration: bool = True
    #: the method changes the weights it keeps (SparseGPT's OBS update) rather than only zeroing others:
    #: its result then depends on where its input statistics come from, and a bank of its results must store
    #: whole weights rather than masks
    updates_weights: bool = False
    #: the method chooses its unstructured mask per output row (its rounding: at most one weight per row); the
    #: verification of a plan holds the weights to that rounding
    masks_per_row: bool = False

    def __init__(self, options: Optional[Options] = None):
        self.options = options if options is not None else NoOptions()

    def new_statistics(self, in_features: int) -> Optional[Any]:
        """A fresh input statistic (:mod:`optimum_msp.statistics`), or ``None`` for data-free methods."""
        return None

    def prune(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        """Return the pruned weight (same shape); ``weight`` is fp32 and must not be modified."""
        raise NotImplementedError

    def mask(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        """The kept weights (``True``); for a pruner that does not update weights, ``prune`` is ``weight * mask``."""
        return self.prune(weight, stats, target) != 0


class ScorePruner(Pruner):
    """Pruners that rank weights by a score and zero the lowest ones, without updating the rest."""

    masks_per_row = True

    def scores(self, weight: torch.Tensor, stats: Optional[Any]) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        scores = self.scores(weight, stats)
        if not bool(torch.isfinite(scores).all()):
            # NaN ranks arbitrarily (kthvalue/sort put it anywhere): the mask would be silently meaningless
            from ..checks import NonFiniteError

            raise NonFiniteError(
                f"{self.name or type(self).__name__} scores hold {int(torch.isnan(scores).sum()):,} NaN and "
                f"{int(torch.isinf(scores).sum()):,} inf values (non-finite weights or input statistics); the "
                "weights cannot be ranked."
            )
        return nm_mask(scores, target.n, target.m) if target.is_nm else unstructured_mask(scores, target.sparsity)

    def prune(self, weight: torch.Tensor, stats: Optional[Any], target: LayerTarget) -> torch.Tensor:
        return weight * self.mask(weight, stats, target)


PRUNERS: Registry[type] = Registry("pruning method")


def prunes_per_row(method: str) -> Optional[bool]:
    """Whether the registered pruner ``method`` chooses its mask per output row (``None``: not registered here)."""
    return bool(PRUNERS.get(method).masks_per_row) if method in PRUNERS else None


def build_pruner(name: str, options: Optional[Options] = None) -> Pruner:
    """The registered pruner ``name`` with ``options`` (its option class's defaults when ``None``)."""
    entry = PRUNERS.entry(name)
    return entry.item(options if options is not None else entry.options())


def get_pruner(name: str, **options: Any) -> Pruner:
    """``build_pruner`` from keyword options (names of the method's option class)."""
    entry = PRUNERS.entry(name)
    unknown = set(options) - {spec.name for spec in entry.options.specs()}
    if unknown:
        raise ValueError(f"Method {name!r} has no option(s) {sorted(unknown)}; it takes "
                         f"{[spec.name for spec in entry.options.specs()] or 'none'}.")
    instance = entry.options(**options)
    instance.check()
    return entry.item(instance)
