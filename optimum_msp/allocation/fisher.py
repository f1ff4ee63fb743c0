"""Fisher-trace sensitivity and the ``fisher`` allocator.

The empirical Fisher information of a unit is estimated by its trace: the sum, over calibration
sequences, of the squared gradient of that sequence's LM loss with respect to the unit's weights
(per-sequence gradients, not the square of the batch gradient). Gradients are reduced to one scalar per
layer as soon as they are accumulated and then freed, so no optimizer state or full gradient set is kept.
Results are cached on disk, keyed by model weights, data and settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .. import distributed
from ..checks import check_finite_values
from ..modeling.offload import is_offloaded
from ..modeling.sequential import BlockRunner, block_output, input_device
from ..options import option
from .base import ALLOCATORS, AllocationContext, AllocationResult, Budget
from .cache import UnhashableModelError, cache_path, fingerprint, write_atomically
from .levels import Genome, LevelOptions, LevelSpace

logger = logging.getLogger(__name__)


def fisher_traces(
    model: nn.Module, layers: Dict[str, nn.Module], ids: torch.Tensor, use_cache: bool = True,
    runner: Optional[BlockRunner] = None, blockwise: Optional[bool] = None,
) -> Dict[str, float]:
    """Empirical Fisher trace of every layer in ``layers`` over the sequences of ``ids`` ([n, seqlen]).

    Two ways, the same quantity: one backward through the whole model per sequence (the model in memory on
    one device), or block by block (``blockwise``; the default when the model is offloaded or computed on
    another device than it is kept on, and it needs ``runner``), holding one block's weights on the compute
    device and every block's input activations of one sequence, never the whole model's gradients.
    """
    path = None
    if use_cache:
        try:
            path = cache_path("fisher", fingerprint(model, layers, ids, "fisher"), ".json")
        except UnhashableModelError as error:
            logger.info("Fisher traces are not cached: %s", error)
            use_cache = False
    cached = _read_cache(path, layers) if use_cache and path.is_file() else None
    # every process reads the entry or every process recomputes: one recomputing alone would wait in the reduction
    if distributed.all_true(cached is not None):
        logger.info("Fisher traces read from cache %s", path)
        return cached
    if blockwise is None:
        blockwise = runner is not None and _spread_out(model, runner)
    if blockwise and runner is None:
        raise ValueError("The block-wise Fisher pass needs the model's BlockRunner (runner=).")
    # several processes: each takes its share of the sequences (the cache key above holds all of them), and the
    # traces, sums over sequences, are summed over processes; a process with no sequence adds zeros
    ids = distributed.shard(ids, "Fisher windows", allow_empty=True)
    with _frozen(model):
        traces = _blockwise_traces(runner, layers, ids) if blockwise else _whole_model_traces(model, layers, ids)
    traces = distributed.reduce_values(traces)
    # a NaN/inf trace (non-finite loss or gradients) would silently order the blocks arbitrarily
    check_finite_values("Fisher trace (squared gradients of the calibration loss)", traces)
    if use_cache:
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(traces)))
    return traces


def _read_cache(path, layers: Dict[str, nn.Module]) -> Optional[Dict[str, float]]:
    """The cached traces, or ``None`` when the entry cannot be used (a damaged entry costs a recomputation, never a
    failed prune)."""
    try:
        cached = json.loads(path.read_text())
        if set(cached) != set(layers):
            raise ValueError("the entry was written for other layers")
        check_finite_values("cached Fisher trace", cached)
        return cached
    except Exception as error:  # noqa: BLE001
        logger.warning("Ignoring the unreadable Fisher cache %s (%s); recomputing.", path, error)
        return None


def _spread_out(model: nn.Module, runner: BlockRunner) -> bool:
    """Whether the model's weights are not all in memory on the device its blocks are computed on."""
    return runner.device != input_device(model) or any(is_offloaded(module) for module in model.modules())


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter accumulates a gradient unless asked to; eval mode; both restored afterwards."""
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    was_training = model.training
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.eval()
        yield
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
            parameter.grad = None
        model.train(was_training)


def _progress(count: int):
    return hf_logging.tqdm(range(count), desc="Fisher trace", disable=not hf_logging.is_progress_bar_enabled())


def _whole_model_traces(model: nn.Module, layers: Dict[str, nn.Module], ids: torch.Tensor) -> Dict[str, float]:
    traces = {name: 0.0 for name in layers}
    handles = []
    try:
        for name, module in layers.items():
            module.weight.requires_grad_(True)

            def reduce(parameter, name=name):
                traces[name] += float(parameter.grad.float().pow(2).sum())
                parameter.grad = None  # free it now: one scalar per layer is all we keep

            handles.append(module.weight.register_post_accumulate_grad_hook(reduce))
        device = input_device(model)
        for row in _progress(ids.shape[0]):
            sequence = ids[row : row + 1].to(device)
            loss = model(input_ids=sequence, labels=sequence, use_cache=False).loss
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return traces


def _blockwise_traces(runner: BlockRunner, layers: Dict[str, nn.Module], ids: torch.Tensor) -> Dict[str, float]:
    """Per sequence: a forward block by block keeping each block's input, the head's gradient, then a backward
    block by block. A linear layer's weight gradient is ``dY^T X`` (inputs ``X``, output gradients ``dY``, both
    caught by hooks), so no weight needs ``requires_grad``, which offloaded weights (re-created by accelerate for
    every forward) could not carry."""
    traces = {name: 0.0 for name in layers}
    owner = {name: index for index in range(len(runner.blocks)) for name in layers
             if name.startswith(f"{runner.block_prefix}.{index}.")}
    for row in _progress(ids.shape[0]):
        sequence = ids[row : row + 1]
        inputs = runner.capture(sequence, 1)
        hidden = [inputs.hidden[0]]
        with torch.no_grad():
            for index in range(len(runner.blocks)):
                hidden.append(runner.run_block(index, inputs, hidden=hidden[-1:])[0])
        final = hidden.pop().detach().requires_grad_(True)
        with torch.enable_grad():
            loss = runner.head(final, sequence, labels=sequence).loss
            (grad,) = torch.autograd.grad(loss, final)
        grad = grad.to(runner.block_device(len(runner.blocks) - 1))
        for index in reversed(range(len(runner.blocks))):
            chosen = {name: layers[name] for name, block in owner.items() if block == index}
            grad = _block_backward(runner, index, inputs, hidden[index], grad, chosen, traces)
    return traces


def _block_backward(runner: BlockRunner, index: int, inputs, block_input: torch.Tensor, grad: torch.Tensor,
                    chosen: Dict[str, nn.Module], traces: Dict[str, float]) -> torch.Tensor:
    """Backward through block ``index``: add the squared weight gradients of ``chosen`` to ``traces`` and return
    the gradient with respect to the block's input."""
    seen: Dict[str, list] = {name: [] for name in chosen}
    handles = []
    for name, module in chosen.items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen[name].append(args[0].detach())))
        handles.append(module.register_full_backward_hook(
            lambda m, grad_in, grad_out, name=name: seen[name].append(grad_out[0].detach())))
    try:
        device = runner.block_device(index)  # a block's input and output gradient on its device (blocks on GPUs)
        x = block_input.detach().to(device).requires_grad_(True)
        with torch.enable_grad(), runner.onloaded(index) as block:
            out = block_output(runner.call(block, index, inputs, x, 0))
            (grad_in,) = torch.autograd.grad(out, x, grad_outputs=grad.to(device))
    finally:
        for handle in handles:
            handle.remove()
    for name, (layer_input, layer_grad) in ((n, v) for n, v in seen.items() if len(v) == 2):
        weight_grad = layer_grad.reshape(-1, layer_grad.shape[-1]).float().t() @ layer_input.reshape(
            -1, layer_input.shape[-1]).float()  # [out, in], the same norm for Conv1D's [in, out]
        traces[name] += float(weight_grad.pow(2).sum())
    missing = [name for name, values in seen.items() if len(values) != 2]
    if missing:
        raise RuntimeError(f"The block-wise Fisher pass saw layer(s) {missing} run other than exactly once per "
                           "sequence; use a model held in memory (the whole-model Fisher pass).")
    return grad_in


@dataclass
class FisherOptions(LevelOptions):
    fisher_samples: int = option(16, "the Fisher trace uses the first this many calibration windows", kind=int, low=1)
    fisher_seqlen: int = option(512, "... and their first this many tokens (their BOS, when they start with one, "
                                "included)", kind=int, low=1)


def fisher_sensitivity(context: AllocationContext) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Fisher traces of the context's layers, and their sums per decoder block (keys: block index as text)."""
    options = context.options
    ids = context.calibration_ids("Fisher sensitivity")[: options.fisher_samples, : options.fisher_seqlen]
    traces = fisher_traces(context.model, context.modules, ids, runner=context.runner)
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
