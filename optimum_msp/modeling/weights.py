"""Snapshots of layer weights, restored around anything that changes them for a while (a trial prune of one
block), and :func:`substituted`: running linear layers with other weights without writing them anywhere (the MSP
search's candidates)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .offload import is_offloaded, read_matrix, read_stored, write_matrix


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


def _bias(module: nn.Module) -> Optional[torch.Tensor]:
    if getattr(module, "bias", None) is None:
        return None
    return read_stored(module, "bias") if is_offloaded(module) else module.bias


class _WithWeight:
    """A linear layer's forward with another ``[out, in]`` weight (the layer's own bias)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self.weight.to(x.device, x.dtype), bias)


@contextlib.contextmanager
def substituted(weights: Mapping[nn.Module, torch.Tensor]) -> Iterator[None]:
    """Inside the context, each linear module computes with the given ``[out, in]`` weight instead of its own.

    Nothing is written to the model: the module's ``forward`` is shadowed for the duration (an instance attribute,
    as accelerate's own hooks are), so a model held on the host or offloaded to disk is never rewritten, no dense
    copy is needed to restore it, and swapping a candidate in costs nothing. The model's forward hooks still run;
    an offloaded layer's own weight is simply never loaded.
    """
    missing = object()
    shadowed = []
    try:
        for module, weight in weights.items():
            shadowed.append((module, module.__dict__.get("forward", missing)))
            module.forward = _WithWeight(weight, _bias(module))
        yield
    finally:
        for module, previous in reversed(shadowed):
            if previous is missing:
                del module.forward
            else:
                module.forward = previous
