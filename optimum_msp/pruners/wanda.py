from __future__ import annotations

import torch

from .base import PRUNERS, ScorePruner


class InputNorms:
    """Running sum over calibration tokens of x_j^2 for every input feature j."""

    STATE = ("sum_squares",)  # the tensors that, with ``tokens``, are the whole accumulated state (cache)

    def __init__(self, in_features: int):
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sum_squares += (x * x).sum(dim=0).to(self.sum_squares)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens."""
        return self.sum_squares.sqrt().float()


@PRUNERS.register("wanda")
class WandaPruner(ScorePruner):
    """Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row / N:M group."""

    name = "wanda"

    def new_statistics(self, in_features):
        return InputNorms(in_features)

    def scores(self, weight, stats):
        return weight.abs() * stats.norms.to(weight.device).unsqueeze(0)
