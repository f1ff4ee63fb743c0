"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2024).

Per decoder block, the outlier ratio is the share of Wanda scores |W| * ||X|| above ``owl_threshold``
times the block's mean score (on the dense model). Blocks with more outliers keep more weights: the
ratios are mapped linearly onto densities in [1 - target - lambda, 1 - target + lambda] and shifted so
the global sparsity is exactly the target.
"""

from __future__ import annotations

import torch

from ..modeling.blocks import weight_matrix
from ..pruners.wanda import InputNorms
from .base import Allocation, AllocationContext, register_allocator
from .levels import LevelSpace
from .statistics import dense_layer_statistics


def outlier_ratios(context: AllocationContext) -> dict:
    """Outlier ratio of every decoder block that has targeted layers."""
    config = context.config
    stats = dense_layer_statistics(context, InputNorms, desc="OWL outliers")
    ratios = {}
    for index, block in enumerate(context.layers):
        if not block:
            continue
        scores = [
            (weight_matrix(module).abs().float() * stats[name].norms.unsqueeze(0)).flatten()
            for name, module in block.items()
        ]
        scores = torch.cat(scores)
        ratios[index] = float((scores > config.owl_threshold * scores.mean()).float().mean())
    return ratios


@register_allocator("owl", needs_calibration=True)
def owl(context: AllocationContext) -> Allocation:
    config = context.config
    # OWL's unit is the decoder block, whatever granularity the search would use.
    space = LevelSpace.build(_block_config(config), context.layers, context.numels)
    ratios = outlier_ratios(context)
    values = [ratios[block] for block in space.unit_blocks]
    low, high = min(values), max(values)
    span = high - low if high > low else 1.0
    # more outliers -> denser: sparsity = target + lambda * (1 - 2 * normalised ratio)
    sparsities = [config.sparsity + config.owl_lambda * (1.0 - 2.0 * (v - low) / span) for v in values]
    context.extras["owl_outlier_ratio"] = {str(k): v for k, v in ratios.items()}
    return space.targets(space.quantize(sparsities))


def _block_config(config):
    from dataclasses import replace

    # a fine grid keeps OWL close to its continuous allocation
    return replace(config, granularity="block", max_deviation=max(config.max_deviation, config.owl_lambda),
                   level_step=min(config.level_step, 0.005))
