from __future__ import annotations

from .base import Allocation, AllocationContext, register_allocator, uniform_target


@register_allocator("uniform")
def uniform(context: AllocationContext) -> Allocation:
    """Every targeted layer gets the same sparsity (or the same N:M)."""
    target = uniform_target(context.config)
    return {name: target for name in context.numels}
