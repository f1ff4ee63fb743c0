from __future__ import annotations

from .base import ALLOCATORS, AllocationContext, AllocationResult, uniform_target


@ALLOCATORS.register("uniform")
def uniform(context: AllocationContext) -> AllocationResult:
    """Every targeted layer gets the same sparsity (or the same N:M)."""
    target = uniform_target(context.budget)
    return AllocationResult({name: target for name in context.numels})
