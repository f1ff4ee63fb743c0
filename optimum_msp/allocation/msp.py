"""The ``msp`` allocator: Fisher-seeded evolutionary search of per-unit sparsity levels."""

from __future__ import annotations

import logging
import time

import torch

from ..data import calibration_text_ids, locate_windows, sample_starts, take_windows
from ..pruners import get_pruner
from ..pruners.base import ScorePruner
from .base import Allocation, AllocationContext, register_allocator
from .fisher import fisher_genome
from .levels import LevelSpace
from .statistics import dense_layer_statistics, seeded_layer_statistics
from .search import EvolutionarySearch, FitnessEvaluator, WeightBank

logger = logging.getLogger(__name__)


def fitness_windows(context: AllocationContext) -> torch.Tensor:
    """Held-out windows for the search's fitness: from the calibration text, disjoint from the windows
    the pruning statistics use, never from an evaluation split."""
    if context.fitness_ids is not None:
        return context.fitness_ids
    config = context.config
    if context.tokenizer is None:
        raise ValueError("The MSP search needs held-out fitness windows: give the pruner a tokenizer, or fitness_ids=.")
    ids = calibration_text_ids(context.tokenizer, config.calibration_dataset, config.calibration_split)
    # the calibration windows actually used, whoever drew them (the msp allocator always runs with calibration)
    taken = [] if context.calibration is None else locate_windows(ids, context.calibration)
    starts = sample_starts(ids.shape[1], config.fitness_samples, config.fitness_seqlen, config.seed + 1,
                           exclude=taken)
    return take_windows(ids, starts, config.fitness_seqlen)


def search_statistics(config, pruner) -> str:
    """``"dense"`` or ``"seed"``: what ``config.search_statistics`` means for this pruner."""
    if config.search_statistics != "auto":
        return config.search_statistics
    # a pruner that updates the kept weights (SparseGPT) depends most on where its inputs come from
    return "dense" if isinstance(pruner, ScorePruner) else "seed"


@register_allocator("msp", needs_calibration=True)
def msp(context: AllocationContext) -> Allocation:
    config = context.config
    space = LevelSpace.build(config, context.layers, context.numels)
    started = time.perf_counter()
    seed_genome = fisher_genome(context, space)
    fisher_done = time.perf_counter()

    pruner = get_pruner(config.method, block_size=config.block_size, dampening=config.dampening)
    statistics = search_statistics(config, pruner)
    modules = {name: module for block in context.layers for name, module in block.items()}
    bank = WeightBank(pruner, modules, {})  # keeps the dense weights
    try:
        if pruner.needs_calibration and statistics == "seed":
            # inputs of every block as the final prune will see them, near the seed plan: from pruned blocks
            bank.stats = seeded_layer_statistics(context, pruner, space.targets(seed_genome))
            bank.restore()
        elif pruner.needs_calibration:
            bank.stats = dense_layer_statistics(context, pruner.new_statistics)
        statistics_done = time.perf_counter()
        evaluator = FitnessEvaluator(context.runner, space, bank, fitness_windows(context), config.fitness,
                                     config.batch_size, cache_bytes=config.search_cache_mb << 20)
        search_started, search_cpu_started = time.perf_counter(), time.process_time()
        search = EvolutionarySearch(
            space, evaluator, seed_genome, config.population_size, config.generations, config.seed,
            checkpoint=config.search_checkpoint,
            settings={"method": config.method, "sparsity": config.sparsity, "pattern": config.pattern,
                      "fitness": config.fitness, "units": len(space), "statistics": statistics},
        )
        best = search.run()
        search_seconds = time.perf_counter() - search_started
        search_cpu_seconds = time.process_time() - search_cpu_started
        memory = {name: round(size / 2**20, 1) for name, size in {**bank.nbytes(), **evaluator.nbytes()}.items()}
    finally:
        bank.restore()
    fitness = search.state.fitness
    context.extras["search"] = {
        "fitness": config.fitness,
        "statistics": statistics,
        "generations": config.generations,
        "population_size": config.population_size,
        "seed": config.seed,
        "granularity": config.granularity,
        "best_fitness": fitness[best],
        "fisher_fitness": fitness.get(seed_genome),
        "uniform_fitness": fitness.get(space.uniform()),
        "history": search.state.history,
        "evaluations": len(fitness),
        "evaluations_this_run": search.new_evaluations,
        "fisher_seconds": round(fisher_done - started, 2),
        "statistics_seconds": round(statistics_done - fisher_done, 2),  # the bank's input statistics pass
        "search_seconds": round(search_seconds, 2),
        "search_cpu_seconds": round(search_cpu_seconds, 2),  # robust to other processes on the machine
        "blocks_run": evaluator.blocks_run,
        "memory_mb": memory,  # what the search held (peak RSS also has the model, statistics, allocator slack)
        "levels": [space.sparsity(s) for s in best],
    }
    logger.info("MSP search: best %s fitness %.5f (Fisher seed %.5f, uniform %s) after %d evaluations in %.0fs",
                config.fitness, fitness[best], fitness[seed_genome], fitness.get(space.uniform()), len(fitness),
                search_seconds)
    return space.targets(best)
