"""What the pruner produces for each (layer, level), computed once and reused by every candidate."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ...checks import checked_prune
from ...modeling.offload import write_matrix
from ...modeling.weights import WeightSnapshot
from ...plan import LayerTarget
from ...pruners.base import Pruner


class WeightBank:
    """Pruned weights per (layer, level), from the dense weights (a :class:`WeightSnapshot` taken before any
    change) and the input statistics the pruner needs.

    Entries are computed on first use (a search visits only levels near its seed) and kept; an evaluation
    then only swaps tensors in. For pruners that only zero weights (magnitude, Wanda) an entry is the boolean
    mask, a quarter of an fp32 weight; a pruner that updates the kept weights (``updates_weights``: SparseGPT)
    has the pruned weights themselves as entries.
    """

    def __init__(self, pruner: Pruner, modules: Dict[str, nn.Module], dense: WeightSnapshot,
                 stats: Dict[str, object]):
        self.pruner = pruner
        self.modules = modules
        self.snapshot = dense
        self.dense = dense.weights
        self.stats = stats
        self._pruned: Dict[Tuple[str, LayerTarget], torch.Tensor] = {}
        self.loaded: Dict[str, LayerTarget] = {}

    def weight(self, name: str, target: LayerTarget) -> torch.Tensor:
        key = (name, target)
        dense = self.dense[name]
        masks_only = not self.pruner.updates_weights
        if key not in self._pruned:
            if masks_only:
                self._pruned[key] = self.pruner.mask(dense.float(), self.stats.get(name), target).bool()
            else:
                # the checks of the final prune (finite in and out, the target held), naming the layer
                self._pruned[key] = checked_prune(name, dense, self.pruner, self.stats.get(name), target).to(dense.dtype)
        if masks_only:  # the same product ScorePruner.prune computes
            return (dense.float() * self._pruned[key]).to(dense.dtype)
        return self._pruned[key]

    def nbytes(self) -> Dict[str, int]:
        """Memory held: the bank's entries, and the dense copy kept to restore the model."""
        return {
            "bank": sum(entry.numel() * entry.element_size() for entry in self._pruned.values()),
            "dense_copy": self.snapshot.nbytes(),
        }

    @torch.no_grad()
    def load(self, name: str, target: LayerTarget) -> None:
        """Put the pruned weight for ``target`` into the model (no-op if it is there already)."""
        if self.loaded.get(name) == target:
            return
        write_matrix(self.modules[name], self.weight(name, target))
        self.loaded[name] = target

    @torch.no_grad()
    def restore(self) -> None:
        self.snapshot.restore()
        self.loaded.clear()
