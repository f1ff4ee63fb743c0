from .base import PRUNERS, Pruner, ScorePruner, build_pruner, get_pruner
from . import magnitude, sparsegpt, wanda  # noqa: F401  (registration)

__all__ = ["PRUNERS", "Pruner", "ScorePruner", "build_pruner", "get_pruner"]
