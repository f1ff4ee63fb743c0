"""What the pruner produces for each (layer, level), computed once and reused by every candidate.

Memory is bounded whatever the model's depth: entries live in a least-recently-used store of ``memory_bytes`` on
the compute device; an entry pushed out is written to the search's work folder (safetensors) and read back when
a candidate needs it again. The model itself is never written: candidates run with the bank's weights through
:func:`~optimum_msp.modeling.weights.substituted`, so no dense copy of the model is kept either.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...checks import checked_prune
from ...modeling.offload import read_matrix
from ...plan import LayerTarget
from ...pruners.base import Pruner

Key = Tuple[str, LayerTarget]


class WeightBank:
    """Pruned weights per (layer, level), from the model's dense weights and the input statistics ``stats``
    (layer name -> statistic; a :class:`~optimum_msp.allocation.statistics.StatisticsStore` reads them one block
    at a time).

    For pruners that only zero weights (magnitude, Wanda) an entry is the boolean mask (one byte per weight) and
    the candidate's weight is the dense weight times the mask; a pruner that updates the kept weights
    (``updates_weights``: SparseGPT) has the pruned weights themselves, in the model's dtype, as entries.
    """

    def __init__(self, pruner: Pruner, modules: Dict[str, nn.Module], stats: Mapping[str, object],
                 device: Optional[torch.device] = None, memory_bytes: int = 1 << 30,
                 folder: Optional[Path] = None):
        self.pruner = pruner
        self.modules = modules
        self.stats = stats
        self.device = device
        self.memory_bytes = memory_bytes
        self.folder = Path(folder) if folder is not None else None
        self._entries: "OrderedDict[Key, torch.Tensor]" = OrderedDict()
        self._on_disk: Dict[Key, Path] = {}
        self._bytes = 0
        self.peak_bytes = 0
        self.computed = 0
        self.read_back = 0

    # ------------------------------------------------------------------------------------------- entries
    def dense(self, name: str) -> torch.Tensor:
        """The layer's dense ``[out, in]`` weight on the compute device (a view where it already is there)."""
        weight = read_matrix(self.modules[name])
        return weight if self.device is None else weight.to(self.device)

    @torch.no_grad()
    def entry(self, name: str, target: LayerTarget) -> torch.Tensor:
        """The stored entry: a mask (masking pruners) or the pruned weight."""
        key = (name, target)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if key in self._on_disk:
            with safe_open(str(self._on_disk[key]), framework="pt", device=str(self._device(name))) as handle:
                value = handle.get_tensor("entry")
            self.read_back += 1
        else:
            value = self._compute(name, target)
            self.computed += 1
        self._keep(key, value)
        return value

    def _device(self, name: str) -> torch.device:
        return self.device if self.device is not None else read_matrix(self.modules[name]).device

    def _compute(self, name: str, target: LayerTarget) -> torch.Tensor:
        dense = self.dense(name)
        if not self.pruner.updates_weights:
            return self.pruner.mask(dense.float(), self.stats.get(name), target).bool()
        # the checks of the final prune (finite in and out, the target held), naming the layer
        return checked_prune(name, dense, self.pruner, self.stats.get(name), target).to(dense.dtype)

    def _keep(self, key: Key, value: torch.Tensor) -> None:
        self._entries[key] = value
        self._bytes += value.numel() * value.element_size()
        while self._bytes > self.memory_bytes and len(self._entries) > 1:
            old_key, old = self._entries.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
            if old_key not in self._on_disk:
                self._spill(old_key, old)
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _spill(self, key: Key, value: torch.Tensor) -> None:
        if self.folder is None:
            return  # no work folder: recomputed when needed again (the tests' small banks)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self._on_disk):07d}.safetensors"
        save_file({"entry": value.contiguous().to("cpu")}, str(path))
        self._on_disk[key] = path

    def reset(self, stats: Mapping[str, object]) -> None:
        """Forget every entry (in memory and on disk) and prune from ``stats`` from now on."""
        for path in self._on_disk.values():
            path.unlink(missing_ok=True)
        self._entries.clear()
        self._on_disk.clear()
        self._bytes = 0
        self.stats = stats

    @torch.no_grad()
    def weight(self, name: str, target: LayerTarget) -> torch.Tensor:
        """The layer's weight under ``target``, as the final prune would write it (model dtype, compute device)."""
        value = self.entry(name, target)
        if self.pruner.updates_weights:
            return value
        dense = self.dense(name)
        return (dense.float() * value).to(dense.dtype)  # the same product ScorePruner.prune computes

    def nbytes(self) -> Dict[str, int]:
        """Memory held (now and at the peak) and what was written to the work folder."""
        return {
            "bank": self._bytes,
            "bank_peak": self.peak_bytes,
            "bank_on_disk": sum(path.stat().st_size for path in self._on_disk.values() if path.exists()),
        }
