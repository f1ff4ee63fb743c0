from __future__ import annotations


from .base import PRUNERS, ScorePruner


@PRUNERS.register("magnitude")
class MagnitudePruner(ScorePruner):
    """Keep the largest |W| (per output row, or per N:M group). Needs no calibration data."""

    name = "magnitude"
    needs_calibration = False

    def scores(self, weight, stats):
        return weight.abs()
