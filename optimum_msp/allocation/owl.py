"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2024).

Per decoder block, the outlier ratio is the share of Wanda scores |W| * ||X|| above ``owl_threshold``
times the block's mean score (on the dense model). Blocks with more outliers keep more weights: the
ratios are mapped linearly onto densities in [1 - target - lambda, 1 - target + lambda] and shifted so
the global sparsity is exactly the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict

import torch

from ..modeling.offload import read_matrix
from ..options import option
from ..statistics import InputNorms
from .base import ALLOCATORS, AllocationContext, AllocationResult
from .levels import LevelOptions, LevelSpace
from .statistics import dense_layer_statistics


@dataclass
class OWLOptions(LevelOptions):
    owl_threshold: float = option(5.0, "OWL: a score above this multiple of its block's mean score is an outlier",
                                  kind=float, low=0.0, low_open=True)
    owl_lambda: float = option(0.08, "OWL: block sparsities range over target +- this", kind=float, low=0.0, high=1.0,
                               high_open=True)


def outlier_ratios(context: AllocationContext) -> Dict[int, float]:
    """Outlier ratio of every decoder block that has targeted layers."""
    stats = dense_layer_statistics(context, InputNorms, desc="OWL outliers")
    ratios = {}
    for index, block in enumerate(context.layers):
        if not block:
            continue
        scores = []
        for name, module in block.items():
            weight = read_matrix(module).float()
            scores.append((weight.abs() * stats[name].norms.to(weight.device).unsqueeze(0)).flatten())
        scores = torch.cat(scores)
        ratios[index] = float((scores > context.options.owl_threshold * scores.mean()).float().mean())
    return ratios


@ALLOCATORS.register("owl", options=OWLOptions, needs_calibration=True)
def owl(context: AllocationContext) -> AllocationResult:
    options = context.options
    # OWL's unit is the decoder block, whatever granularity the search would use; a fine grid keeps it close to
    # its continuous allocation
    levels = dataclasses.replace(options, granularity="block", max_deviation=max(options.max_deviation,
                                 options.owl_lambda), level_step=min(options.level_step, 0.005))
    space = LevelSpace.build(context.budget, levels, context.layers, context.numels)
    ratios = outlier_ratios(context)
    values = [ratios[block] for block in space.unit_blocks]
    low, high = min(values), max(values)
    span = high - low if high > low else 1.0
    # more outliers -> denser: sparsity = target + lambda * (1 - 2 * normalised ratio)
    sparsities = [context.budget.sparsity + options.owl_lambda * (1.0 - 2.0 * (v - low) / span) for v in values]
    return AllocationResult(space.targets(space.quantize(sparsities)))
