from __future__ import annotations

from ..statistics import InputNorms
from .base import PRUNERS, ScorePruner

__all__ = ["InputNorms", "WandaPruner"]


@PRUNERS.register("wanda")
class WandaPruner(ScorePruner):
    """Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row / N:M group."""

    name = "wanda"

    def new_statistics(self, in_features):
        return InputNorms(in_features)

    def scores(self, weight, stats):
        return weight.abs() * stats.norms.to(weight.device).unsqueeze(0)
