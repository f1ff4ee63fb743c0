from .base import ALLOCATORS, Allocation, AllocationContext, AllocationResult, Budget, uniform_target
from . import fisher, msp, owl, uniform  # noqa: F401  (registration)

__all__ = ["ALLOCATORS", "Allocation", "AllocationContext", "AllocationResult", "Budget", "uniform_target"]
