from .base import ALLOCATORS, Allocation, AllocationContext, register_allocator, uniform_target
from . import fisher, msp, owl, uniform  # noqa: F401  (registration)

__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "register_allocator", "uniform_target"]
