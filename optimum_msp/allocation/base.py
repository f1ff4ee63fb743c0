"""Allocators turn a global target into per-layer targets (the sparsity plan's levels).

Every allocator returns targets whose parameter-weighted global sparsity equals the requested one
exactly. The discrete level sets are shared: for mixed N:M, a per-layer N (weights kept per group of M);
for unstructured sparsity, a grid of levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..configuration import MSPConfig
from ..plan import LayerTarget
from ..registry import Registry

Allocation = Dict[str, LayerTarget]


@dataclass
class AllocationContext:
    """Everything an allocator may look at."""

    model: nn.Module
    config: MSPConfig
    layers: List[Dict[str, nn.Module]]  # per decoder block: full name -> linear module
    calibration: Optional[torch.Tensor] = None  # [samples, seqlen] token ids, when the run has data
    runner: Any = None  # the BlockRunner of the model
    tokenizer: Any = None
    fitness_ids: Optional[torch.Tensor] = None  # held-out windows for search fitness (default: drawn)
    extras: Dict[str, Any] = field(default_factory=dict)  # what allocators hand back (sensitivities, search)

    @property
    def numels(self) -> Dict[str, int]:
        return {name: module.weight.numel() for block in self.layers for name, module in block.items()}


@dataclass
class Allocator:
    fn: Callable[[AllocationContext], Allocation]
    needs_calibration: bool = False


ALLOCATORS: Registry[Allocator] = Registry("allocation")


def register_allocator(name: str, needs_calibration: bool = False):
    def decorator(fn: Callable[[AllocationContext], Allocation]):
        ALLOCATORS.register(name)(Allocator(fn, needs_calibration))
        return fn

    return decorator


def uniform_target(config: MSPConfig) -> LayerTarget:
    """The one target every layer gets under uniform allocation."""
    nm = config.nm
    if nm is not None:
        return LayerTarget.nm(*nm)
    if config.pattern_kind == "mixed-n:m":
        n = (1.0 - config.sparsity) * config.m
        if abs(n - round(n)) > 1e-9:
            raise ValueError(
                f"Uniform allocation cannot reach {config.sparsity:.4g} sparsity with M={config.m} "
                f"(N would be {n:.3g}); use allocation='owl', 'fisher' or 'msp', or a sparsity that is a "
                f"multiple of 1/{config.m}."
            )
        return LayerTarget.nm(int(round(n)), config.m)
    return LayerTarget(sparsity=config.sparsity)
