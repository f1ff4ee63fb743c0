"""Input statistics for allocators (OWL's outlier ratios, the MSP search's weight bank): of the dense model,
or gathered by a sequential prune with a seed plan (inputs from pruned blocks, as the final prune sees them).

Gathering them costs the two passes of a uniform prune, and they depend only on the model's weights, the
calibration windows, the kind of statistics (Wanda's input norms, SparseGPT's Hessians) and the seed plan. Like the
Fisher traces they are cached on disk, so trying other search settings, targets or allocations on the same
model and data skips those passes. Layers that read the same input share one accumulator, in memory and in
the cache file. A SparseGPT entry for SmolLM2-135M is ~0.4 GB (one Hessian per distinct input).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from safetensors import safe_open
from safetensors.torch import save_file

from .. import distributed
from ..apply import apply_targets, dense_statistics
from ..checks import check_all_statistics
from ..modeling.weights import WeightSnapshot, restored
from .base import Allocation, AllocationContext
from .cache import UnhashableModelError, cache_path, fingerprint, write_atomically

logger = logging.getLogger(__name__)


def dense_layer_statistics(
    context: AllocationContext, make_stats: Callable[[int], Any], desc: str = "Dense statistics",
    use_cache: bool = True,
) -> Dict[str, Any]:
    """Input statistics of every layer of ``context.layers`` on the dense model, from the cache if possible."""

    def compute() -> Dict[str, Any]:
        stats: Dict[str, Any] = {}
        for _index, block_stats in dense_statistics(context.runner, context.layers, context.calibration.ids,
                                                    make_stats, context.batch_size, desc=desc):
            stats.update(block_stats)
        return stats

    return _cached(context, make_stats, (), compute, use_cache)


def seeded_layer_statistics(
    context: AllocationContext, targets: Allocation, snapshot: Optional[WeightSnapshot] = None,
    use_cache: bool = True,
) -> Dict[str, Any]:
    """Input statistics gathered as a sequential prune with ``targets`` (by ``context.pruner``) gathers them:
    each block's inputs come from the blocks before it *pruned to those targets*, not from the dense model.

    The weights are restored afterwards (from ``snapshot`` when the caller holds one of the dense weights).
    """
    pruner = context.pruner

    def compute() -> Dict[str, Any]:
        logger.info("Search statistics: a sequential %s prune with the seed plan (restored afterwards)", pruner.name)
        stats: Dict[str, Any] = {}
        with restored(context.modules, snapshot):
            apply_targets(context.runner, context.layers, targets, pruner, context.calibration.ids,
                          context.batch_size, on_statistics=stats.update)
        return stats

    plan = sorted((name, target.describe()) for name, target in targets.items())
    # the pruner's options change the prune, hence the statistics downstream of it
    settings = ("seeded", pruner.name, repr(pruner.options), plan)
    return _cached(context, pruner.new_statistics, settings, compute, use_cache)


def _cached(context: AllocationContext, make_stats: Callable[[int], Any], settings: tuple,
            compute: Callable[[], Dict[str, Any]], use_cache: bool) -> Dict[str, Any]:
    ids = context.calibration_ids("Input statistics")
    layers = context.modules
    kind = type(make_stats(1)).__name__
    path = None
    if use_cache:
        try:
            path = cache_path("statistics", fingerprint(context.model, layers, ids, kind, context.batch_size,
                                                        *settings), ".safetensors")
        except UnhashableModelError as error:
            logger.info("%s are not cached: %s", kind, error)
            use_cache = False
    if use_cache and distributed.all_true(path.is_file()):
        try:
            stats = _load(path, make_stats, layers)
            logger.info("%s read from cache %s", kind, path)
            check_all_statistics(stats)
            return stats
        except Exception as error:  # a damaged entry costs a recomputation, never a failed prune
            logger.warning("Ignoring the unreadable statistics cache %s (%s); recomputing.", path, error)
    stats = compute()
    # NaN/inf statistics would make OWL's outlier ratios and the search's bank meaningless; never cache them
    check_all_statistics(stats)
    if use_cache and all(hasattr(stat, "STATE") for stat in stats.values()):
        write_atomically(path, lambda temporary: _save(stats, temporary))
    return stats


def _save(stats: Dict[str, Any], path: Path) -> None:
    slots: Dict[int, int] = {}
    tensors, layers, tokens, widths = {}, {}, {}, {}
    for name, stat in stats.items():
        if id(stat) not in slots:
            slot = slots[id(stat)] = len(slots)
            tokens[slot], widths[slot] = stat.tokens, getattr(stat, stat.STATE[0]).shape[0]
            for field in stat.STATE:
                tensors[f"{slot}.{field}"] = getattr(stat, field).contiguous()
        layers[name] = slots[id(stat)]
    metadata = {"layers": json.dumps(layers), "tokens": json.dumps(tokens), "in_features": json.dumps(widths)}
    save_file(tensors, str(path), metadata=metadata)


def _load(path: Path, make_stats: Callable[[int], Any], layers: Dict[str, Any]) -> Dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    names = json.loads(metadata["layers"])
    if set(names) != set(layers):
        raise ValueError("the entry was written for other layers")
    tokens, widths = json.loads(metadata["tokens"]), json.loads(metadata["in_features"])
    shared = {}
    for slot, width in widths.items():
        stat = make_stats(width)
        for field in stat.STATE:
            value = tensors[f"{slot}.{field}"]
            expected = getattr(stat, field)
            if value.shape != expected.shape or value.dtype != expected.dtype:
                raise ValueError(f"{field} is {value.dtype}{list(value.shape)}, "
                                 f"expected {expected.dtype}{list(expected.shape)}")
            setattr(stat, field, value)
        stat.tokens = tokens[slot]
        shared[slot] = stat
    return {name: shared[str(slot)] for name, slot in names.items()}
