"""Fisher-trace sensitivity and the ``fisher`` allocator.

The empirical Fisher information of a unit is estimated by its trace: the sum, over calibration
sequences, of the squared gradient of that sequence's LM loss with respect to the unit's weights
(per-sequence gradients, not the square of the batch gradient). Gradients are reduced to one scalar per
layer as soon as they are accumulated and then freed, so no optimizer state or full gradient set is kept.
Results are cached on disk, keyed by model weights, data and settings.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from ..checks import check_finite_values
from ..options import option
from .base import ALLOCATORS, AllocationContext, AllocationResult, Budget
from .cache import UnhashableModelError, cache_path, fingerprint, write_atomically
from .levels import Genome, LevelOptions, LevelSpace

logger = logging.getLogger(__name__)


def fisher_traces(
    model: nn.Module, layers: Dict[str, nn.Module], ids: torch.Tensor, use_cache: bool = True
) -> Dict[str, float]:
    """Empirical Fisher trace of every layer in ``layers`` over the sequences of ``ids`` ([n, seqlen])."""
    path = None
    if use_cache:
        try:
            path = cache_path("fisher", fingerprint(model, layers, ids, "fisher"), ".json")
        except UnhashableModelError as error:
            logger.info("Fisher traces are not cached: %s", error)
            use_cache = False
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text())
            if set(cached) != set(layers):
                raise ValueError("the entry was written for other layers")
            check_finite_values("cached Fisher trace", cached)
            logger.info("Fisher traces read from cache %s", path)
            return cached
        except Exception as error:  # a damaged entry costs a recomputation, never a failed prune
            logger.warning("Ignoring the unreadable Fisher cache %s (%s); recomputing.", path, error)

    traces = {name: 0.0 for name in layers}
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    handles = []
    was_training = model.training
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for name, module in layers.items():
            module.weight.requires_grad_(True)

            def reduce(parameter, name=name):
                traces[name] += float(parameter.grad.float().pow(2).sum())
                parameter.grad = None  # free it now: one scalar per layer is all we keep

            handles.append(module.weight.register_post_accumulate_grad_hook(reduce))
        model.eval()
        device = model.get_input_embeddings().weight.device
        for row in hf_logging.tqdm(range(ids.shape[0]), desc="Fisher trace",
                                   disable=not hf_logging.is_progress_bar_enabled()):
            sequence = ids[row : row + 1].to(device)
            loss = model(input_ids=sequence, labels=sequence, use_cache=False).loss
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
            parameter.grad = None
        model.train(was_training)
    # a NaN/inf trace (non-finite loss or gradients) would silently order the blocks arbitrarily
    check_finite_values("Fisher trace (squared gradients of the calibration loss)", traces)
    if use_cache:
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(traces)))
    return traces


@dataclass
class FisherOptions(LevelOptions):
    fisher_samples: int = option(16, "the Fisher trace uses the first this many calibration windows", kind=int, low=1)
    fisher_seqlen: int = option(512, "... and their first this many tokens", kind=int, low=1)


def fisher_sensitivity(context: AllocationContext) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Fisher traces of the context's layers, and their sums per decoder block (keys: block index as text)."""
    options = context.options
    ids = context.calibration_ids("Fisher sensitivity")[: options.fisher_samples, : options.fisher_seqlen]
    traces = fisher_traces(context.model, context.modules, ids)
    blocks = {str(index): sum(traces[name] for name in block) for index, block in enumerate(context.layers) if block}
    return traces, blocks


def sensitivity_sparsities(space: LevelSpace, traces: Dict[str, float], target: float,
                           deviation: float) -> List[float]:
    """Continuous per-unit sparsities: units with a higher Fisher trace per weight keep more weights.

    Per-weight sensitivity is compared on a log scale (traces span orders of magnitude across depth),
    mapped linearly onto [target + deviation (least sensitive), target - deviation (most sensitive)].
    """
    scores = []
    for unit, numel in zip(space.units, space.numels):
        per_weight = sum(traces[name] for name in unit) / numel
        scores.append(math.log(max(per_weight, 1e-30)))
    low, high = min(scores), max(scores)
    span = high - low if high > low else 1.0
    return [target + deviation * (1.0 - 2.0 * (score - low) / span) for score in scores]


def fisher_genome(space: LevelSpace, traces: Dict[str, float], budget: Budget, options: LevelOptions) -> Genome:
    return space.quantize(sensitivity_sparsities(space, traces, budget.sparsity, options.max_deviation))


@ALLOCATORS.register("fisher", options=FisherOptions, needs_calibration=True)
def fisher(context: AllocationContext) -> AllocationResult:
    """Sensitivity-driven allocation: more sensitive units (higher Fisher trace per weight) keep more."""
    started = time.perf_counter()
    space = LevelSpace.build(context.budget, context.options, context.layers, context.numels)
    traces, blocks = fisher_sensitivity(context)
    genome = fisher_genome(space, traces, context.budget, context.options)
    return AllocationResult(space.targets(genome), traces, blocks,
                            report={"fisher_seconds": round(time.perf_counter() - started, 2)})
