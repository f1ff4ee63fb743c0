"""Apply per-layer targets with a pruner, block by block (the standard sequential scheme).

Cost: one capture pass to the first block, then per block one pass that gathers input statistics and one
pass of the pruned block that produces the next block's inputs: 2 forward passes over the calibration
set in total (data-free pruners skip both).

Under several processes (:mod:`optimum_msp.distributed`) every process holds a block's summed statistics, and
:func:`prune_block` splits the block's layers between them: each prunes its share, then every pruned weight is
broadcast from the process that pruned it, so all hold the same block before its outputs feed the next one.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from . import checks, distributed
from .modeling.offload import matrix_shape, read_matrix, write_matrix
from .modeling.sequential import BlockRunner, advance_with_statistics, forward_with_statistics
from .modeling.weights import WeightSnapshot
from .plan import LayerTarget
from .pruners.base import Pruner

logger = logging.getLogger(__name__)

#: Under several processes, whether they split each block's layers (each prunes its share, then the pruned weights
#: are broadcast: :func:`prune_block`) rather than every process pruning every layer. The default: the split takes
#: each process's share of the per-layer work off it for one broadcast of the weights, while pruning everything on
#: every process repeats it all (and on rank 0 alone, then broadcasting, costs that and the broadcast).
#: ``bench/distributed.py --no-split`` measures the other way.
SPLIT_LAYERS = True

Job = Tuple[nn.Module, object, LayerTarget]  # a layer to prune: the module, its input statistics, its target


@torch.no_grad()
def prune_layer(module: nn.Module, pruner: Pruner, stats, target: LayerTarget,
                device: Optional[torch.device] = None, name: str = "") -> float:
    """Prune ``module`` in place to ``target`` (computed in fp32 on ``device``, stored in the weight's own dtype and
    place, offloaded or not); return its achieved sparsity. Non-finite inputs or a result that misses the target
    raise (naming ``name``) before the weight is changed: see :mod:`optimum_msp.checks`."""
    weight = read_matrix(module)
    pruned = checks.checked_prune(name, weight.to(device or weight.device), pruner, stats, target).to(weight.dtype)
    write_matrix(module, pruned)
    return _sparsity(pruned)


def _sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def _work(jobs: Dict[str, Job], pruner: Pruner) -> Tuple[List[List[str]], List[float]]:
    """The units a block's layers are split in, and the estimated work of each. A pruner that updates the kept
    weights (SparseGPT) factors each distinct input's statistics once (``in³``, shared by q/k/v or gate/up, which
    therefore stay together) and updates each layer's columns one after another (``out·in²``); a masking pruner
    (Wanda) scores and sorts each layer alone (``out·in``)."""
    units: Dict[int, List[str]] = {}
    for name, (module, stats, _target) in jobs.items():
        shared = pruner.updates_weights and stats is not None
        units.setdefault(id(stats) if shared else id(module), []).append(name)
    costs = []
    for names in units.values():
        shapes = [matrix_shape(jobs[name][0]) for name in names]
        if pruner.updates_weights:
            costs.append(float(shapes[0][1]) ** 3 + sum(float(rows) * cols * cols for rows, cols in shapes))
        else:
            costs.append(sum(float(rows) * cols for rows, cols in shapes))
    return list(units.values()), costs


@torch.no_grad()
def prune_block(jobs: Dict[str, Job], pruner: Pruner, device: Optional[torch.device] = None) -> Dict[str, float]:
    """Prune the layers of ``jobs`` (name -> module, statistics, target: one block's) with :func:`prune_layer`;
    return the achieved sparsity of every one of them.

    Under several processes (and :data:`SPLIT_LAYERS`), each prunes only its share: the layers are assigned by
    estimated work (:func:`_work`, :func:`~optimum_msp.distributed.assign`), the same on every process; then each
    pruned weight is broadcast from its owner and written by the others, bit for bit, so every process ends with
    the same weights (and the same returned sparsities) as if it had pruned them all. Every process must call it
    with the same layers. One process: every layer pruned here, in order, no collective call.
    """
    if distributed.world_size() == 1 or not SPLIT_LAYERS:
        return {name: prune_layer(module, pruner, stats, target, device, name)
                for name, (module, stats, target) in jobs.items()}
    units, costs = _work(jobs, pruner)
    owner = {name: process for names, process in zip(units, distributed.assign(costs)) for name in names}
    here = distributed.rank()
    achieved: Dict[str, float] = {}
    error: Optional[BaseException] = None
    for name, (module, stats, target) in jobs.items():
        if owner[name] == here:
            try:
                achieved[name] = prune_layer(module, pruner, stats, target, device, name)
            except Exception as caught:  # noqa: BLE001 - raised below, once every process knows
                error = caught
                break
    # a process that failed must not leave the others waiting for its weights forever
    if not distributed.all_true(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"Another process failed to prune its share of the layers {list(jobs)}; its error is in "
                           "its own output.")
    for name, (module, _stats, _target) in jobs.items():  # one order on every process
        weight = distributed.broadcast(read_matrix(module), owner[name])
        if owner[name] != here:
            write_matrix(module, weight)
            achieved[name] = _sparsity(weight)
    return {name: achieved[name] for name in jobs}


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
) -> Dict[str, float]:
    """Prune every layer named in ``targets``; return achieved sparsity per layer.

    ``on_statistics`` receives each block's input statistics (layer name -> accumulator) before its layers
    are pruned with them. With ``restore``, each block is put back as it was once its pruned outputs have fed
    the next block: the pass gathers what a sequential prune sees and leaves the model unchanged, holding a
    copy of one block's weights at a time.
    """
    achieved: Dict[str, float] = {}
    if not pruner.needs_calibration:
        if restore:
            raise ValueError("restore=True is for statistics passes, which need a pruner that uses calibration data.")
        # every process prunes every layer: without statistics to wait for, a mask costs about what sending it would
        for index, block_layers in enumerate(layers):
            for name, module in block_layers.items():
                if name in targets:
                    achieved[name] = prune_layer(module, pruner, None, targets[name], runner.block_device(index), name)
        return achieved
    if calibration is None:
        raise ValueError(f"The {pruner.name!r} pruner needs calibration data.")
    inputs = runner.capture(distributed.shard(calibration), batch_size)
    pruned_block: Optional[WeightSnapshot] = None  # the block to put back once its outputs are the next inputs
    try:
        for index, _block in runner.walk(inputs, desc=f"Pruning ({pruner.name})"):
            if pruned_block is not None:
                pruned_block.restore()
                pruned_block = None
            chosen = {name: module for name, module in layers[index].items() if name in targets}
            if not chosen:
                continue
            stats = forward_with_statistics(runner, index, inputs, chosen, pruner.new_statistics)
            if on_statistics is not None:
                on_statistics(stats)
            if restore:
                if index == len(runner.blocks) - 1:
                    continue  # its outputs feed nothing: pruning it would be undone unseen
                pruned_block = WeightSnapshot(chosen)
            achieved.update(prune_block({name: (module, stats[name], targets[name]) for name, module in chosen.items()},
                                        pruner, runner.block_device(index)))
            del stats
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
    for index, block_layers in enumerate(progress):
        jobs = {name: (module, stats[name] if pruner.needs_calibration else None, targets[name])
                for name, module in block_layers.items() if name in targets}
        if jobs:  # under several processes each prunes its share of the block (see prune_block)
            achieved.update(prune_block(jobs, pruner, runner.block_device(index)))
    return achieved


@torch.no_grad()
def dense_statistics(
    runner: BlockRunner, layers: List[Dict[str, nn.Module]], calibration: torch.Tensor, make_stats,
    batch_size: int = 1, desc: str = "Dense statistics",
) -> Iterator[Tuple[int, Dict[str, object]]]:
    """Yield ``(block index, {layer: input statistics})`` of the *unpruned* model, block by block.

    Allocators (OWL, MSP) look at the dense model; the caller keeps only what it needs per block, so
    memory stays at one block's activations plus what the caller retains. One forward pass over the calibration
    set: the blocks are not pruned, so the pass that gathers a block's statistics also feeds the next block.
    """
    inputs = runner.capture(distributed.shard(calibration), batch_size)
    last = len(runner.blocks) - 1
    for index in hf_logging.tqdm(range(last + 1), desc=desc, disable=not hf_logging.is_progress_bar_enabled()):
        if index == last:  # its outputs feed nothing: the statistics pass alone, stopped after the last input
            stats = forward_with_statistics(runner, index, inputs, layers[index], make_stats) if layers[index] else {}
        elif layers[index]:  # the block stays dense: one pass gathers its statistics and the next block's inputs
            stats = advance_with_statistics(runner, index, inputs, layers[index], make_stats)
        else:
            runner.advance(index, inputs)
            stats = {}
        if stats:
            yield index, stats
