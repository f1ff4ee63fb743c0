"""What the pruner produces for each (layer, level), computed once and reused by every candidate."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ...modeling.blocks import weight_matrix
from ...plan import LayerTarget
from ...pruners.base import Pruner, ScorePruner


class WeightBank:
    """Pruned weights per (layer, level), from the dense weights and dense-model input statistics.

    Entries are computed on first use (a search visits only levels near its seed) and kept; an evaluation
    then only swaps tensors in. The dense weights are kept to restore the model after the search. For
    pruners that only zero weights (magnitude, Wanda) an entry is the boolean mask, a quarter of an fp32
    weight; SparseGPT updates the kept weights, so its entries are the pruned weights themselves.
    """

    def __init__(self, pruner: Pruner, modules: Dict[str, nn.Module], stats: Dict[str, object]):
        self.pruner = pruner
        self.modules = modules
        self.stats = stats
        self.dense = {name: weight_matrix(module).detach().clone() for name, module in modules.items()}
        self._pruned: Dict[Tuple[str, LayerTarget], torch.Tensor] = {}
        self.loaded: Dict[str, LayerTarget] = {}

    def weight(self, name: str, target: LayerTarget) -> torch.Tensor:
        key = (name, target)
        dense = self.dense[name]
        masks_only = isinstance(self.pruner, ScorePruner)
        if key not in self._pruned:
            if masks_only:
                self._pruned[key] = self.pruner.mask(dense.float(), self.stats.get(name), target).bool()
            else:
                self._pruned[key] = self.pruner.prune(dense.float(), self.stats.get(name), target).to(dense.dtype)
        if masks_only:  # the same product ScorePruner.prune computes
            return (dense.float() * self._pruned[key]).to(dense.dtype)
        return self._pruned[key]

    def nbytes(self) -> Dict[str, int]:
        """Memory held: the bank's entries, and the dense copy kept to restore the model."""
        return {
            "bank": sum(entry.numel() * entry.element_size() for entry in self._pruned.values()),
            "dense_copy": sum(weight.numel() * weight.element_size() for weight in self.dense.values()),
        }

    @torch.no_grad()
    def load(self, name: str, target: LayerTarget) -> None:
        """Put the pruned weight for ``target`` into the model (no-op if it is there already)."""
        if self.loaded.get(name) == target:
            return
        weight_matrix(self.modules[name]).copy_(self.weight(name, target))
        self.loaded[name] = target

    @torch.no_grad()
    def restore(self) -> None:
        for name, module in self.modules.items():
            weight_matrix(module).copy_(self.dense[name])
        self.loaded.clear()
