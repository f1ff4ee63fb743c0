"""Apply per-layer targets with a pruner, block by block (the standard sequential scheme).

Cost: one capture pass to the first block, then per block one pass that gathers input statistics and one
pass of the pruned block that produces the next block's inputs: 2 forward passes over the calibration
set in total (data-free pruners skip both).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from . import checks, distributed
from .modeling.offload import read_matrix, write_matrix
from .modeling.sequential import BlockRunner, forward_with_statistics
from .modeling.weights import WeightSnapshot
from .plan import LayerTarget
from .pruners.base import Pruner

logger = logging.getLogger(__name__)


@torch.no_grad()
def prune_layer(module: nn.Module, pruner: Pruner, stats, target: LayerTarget,
                device: Optional[torch.device] = None, name: str = "") -> float:
    """Prune ``module`` in place to ``target`` (computed in fp32 on ``device``, stored in the weight's own dtype and
    place, offloaded or not); return its achieved sparsity. Non-finite inputs or a result that misses the target
    raise (naming ``name``) before the weight is changed: see :mod:`optimum_msp.checks`."""
    weight = read_matrix(module)
    pruned = checks.checked_prune(name, weight.to(device or weight.device), pruner, stats, target).to(weight.dtype)
    write_matrix(module, pruned)
    return float((pruned == 0).sum()) / pruned.numel()


@torch.no_grad()
def apply_targets(
    runner: BlockRunner,
    layers: List[Dict[str, nn.Module]],
    targets: Mapping[str, LayerTarget],
    pruner: Pruner,
    calibration: Optional[torch.Tensor] = None,
    batch_size: int = 1,
    on_statistics: Optional[Callable[[Dict[str, object]], None]] = None,
    restore: bool = False,
    feed: Optional[Mapping[str, LayerTarget]] = None,
) -> Dict[str, float]:
    """Prune every layer named in ``targets``; return achieved sparsity per layer.

    ``on_statistics`` receives each block's input statistics (layer name -> accumulator) before its layers
    are pruned with them. With ``restore``, each block is put back as it was once its pruned outputs have fed
    the next block: the pass gathers what a sequential prune sees and leaves the model unchanged, holding a
    copy of one block's weights at a time.

    ``feed``: the targets each block is pruned to while its outputs become the next block's inputs, when they are
    not ``targets`` themselves (``None``, the standard sequential prune). ``{}`` feeds every block's dense outputs
    forward (each layer pruned with the dense model's input statistics); another plan feeds what a sequential prune
    with that plan sees. Either way each layer ends pruned to ``targets`` with the statistics it was fed: the
    model an MSP search scored through its weight bank (:class:`~optimum_msp.allocation.search.WeightBank`).
    """
    achieved: Dict[str, float] = {}
    if not pruner.needs_calibration:
        if restore:
            raise ValueError("restore=True is for statistics passes, which need a pruner that uses calibration data.")
        for block_layers in layers:
            for name, module in block_layers.items():
                if name in targets:
                    achieved[name] = prune_layer(module, pruner, None, targets[name], runner.device, name)
        return achieved
    if calibration is None:
        raise ValueError(f"The {pruner.name!r} pruner needs calibration data.")
    if restore and feed is not None:
        raise ValueError("restore=True prunes each block to its targets only while it feeds the next one; feed= "
                         "names other targets for that, so pass one or the other.")
    inputs = runner.capture(distributed.shard(calibration), batch_size)
    pruned_block: Optional[WeightSnapshot] = None  # the block to put back once its outputs are the next inputs
    pending: Dict[str, Tuple[nn.Module, object]] = {}  # layers to prune to ``targets`` once their block has fed on

    def settle() -> None:  # the block before fed the next one: put it back, prune it to its own targets
        nonlocal pruned_block
        if pruned_block is not None:
            pruned_block.restore()
            pruned_block = None
        for name, (module, stats) in pending.items():
            achieved[name] = prune_layer(module, pruner, stats, targets[name], runner.device, name)
        pending.clear()

    try:
        for index, _block in runner.walk(inputs, desc=f"Pruning ({pruner.name})"):
            settle()
            chosen = {name: module for name, module in layers[index].items() if name in targets}
            if not chosen:
                continue
            stats = forward_with_statistics(runner, index, inputs, chosen, pruner.new_statistics)
            if on_statistics is not None:
                on_statistics(stats)
            last = index == len(runner.blocks) - 1  # its outputs feed nothing
            if restore:
                if last:
                    continue  # pruning it would be undone unseen
                pruned_block = WeightSnapshot(chosen)
            elif feed is not None and not last:
                fed = {name: module for name, module in chosen.items() if name in feed}
                pruned_block = WeightSnapshot(fed) if fed else None
                for name, module in fed.items():
                    prune_layer(module, pruner, stats[name], feed[name], runner.device, name)
                pending.update({name: (module, stats[name]) for name, module in chosen.items()})
                continue
            for name, module in chosen.items():
                achieved[name] = prune_layer(module, pruner, stats[name], targets[name], runner.device, name)
            del stats
        if not restore:
            settle()
    finally:
        if pruned_block is not None:
            pruned_block.restore()
    return achieved


@torch.no_grad()
def prune_with_statistics(
    runner: BlockRunner, layers: List[Dict[str, nn.Module]], targets: Mapping[str, LayerTarget], pruner: Pruner,
    stats: Mapping[str, object],
) -> Dict[str, float]:
    """Prune every layer named in ``targets`` with input statistics gathered before (e.g. the MSP search's, a
    :class:`~optimum_msp.allocation.statistics.StatisticsStore` read one block at a time): no forward pass.
    Return achieved sparsity per layer."""
    achieved: Dict[str, float] = {}
    progress = hf_logging.tqdm(layers, desc=f"Pruning ({pruner.name}, given statistics)",
                               disable=not hf_logging.is_progress_bar_enabled())
    for block_layers in progress:
        for name, module in block_layers.items():
            if name in targets:
                achieved[name] = prune_layer(module, pruner, stats[name] if pruner.needs_calibration else None,
                                             targets[name], runner.device, name)
    return achieved


@torch.no_grad()
def dense_statistics(
    runner: BlockRunner, layers: List[Dict[str, nn.Module]], calibration: torch.Tensor, make_stats,
    batch_size: int = 1, desc: str = "Dense statistics",
) -> Iterator[Tuple[int, Dict[str, object]]]:
    """Yield ``(block index, {layer: input statistics})`` of the *unpruned* model, block by block.

    Allocators (OWL, MSP) look at the dense model; the caller keeps only what it needs per block, so
    memory stays at one block's activations plus what the caller retains.
    """
    inputs = runner.capture(distributed.shard(calibration), batch_size)
    for index, _block in runner.walk(inputs, desc=desc):
        if layers[index]:
            yield index, forward_with_statistics(runner, index, inputs, layers[index], make_stats)
