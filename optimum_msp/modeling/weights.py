"""Snapshots of layer weights, restored around anything that changes them for a while (a trial prune, the
MSP search swapping candidate weights in)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from .offload import read_matrix, write_matrix


class WeightSnapshot:
    """A copy of the given layers' weights, as they are now, that can be put back with :meth:`restore`.

    Used as a context manager it restores on exit, whatever happened inside::

        with WeightSnapshot(modules) as dense:
            ...  # prune, swap, evaluate
        # the weights are back to what they were
    """

    def __init__(self, modules: Dict[str, nn.Module]):
        self.modules = modules
        self.weights: Dict[str, torch.Tensor] = {
            name: read_matrix(module).detach().clone() for name, module in modules.items()
        }

    @torch.no_grad()
    def restore(self) -> None:
        for name, module in self.modules.items():
            write_matrix(module, self.weights[name])

    def nbytes(self) -> int:
        return sum(weight.numel() * weight.element_size() for weight in self.weights.values())

    def __enter__(self) -> "WeightSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@contextlib.contextmanager
def restored(modules: Dict[str, nn.Module], snapshot: Optional[WeightSnapshot] = None) -> Iterator[WeightSnapshot]:
    """Restore ``modules``' weights on exit, from ``snapshot`` when the caller holds one (no second copy)."""
    snapshot = snapshot if snapshot is not None else WeightSnapshot(modules)
    try:
        yield snapshot
    finally:
        snapshot.restore()
