from .base import ALLOCATORS, Allocation, AllocationContext, register_allocator, uniform_target
from . import uniform  # noqa: F401  (registration)

__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "register_allocator", "uniform_target"]
