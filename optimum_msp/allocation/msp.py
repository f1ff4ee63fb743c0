"""The ``msp`` allocator: Fisher-seeded evolutionary search of per-unit sparsity levels.

It orchestrates nothing of its own: the calibration windows, the held-out fitness windows and the pruner
come from the run (:class:`~optimum_msp.allocation.base.AllocationContext`); it builds the level space,
seeds it from the Fisher allocation, gathers the input statistics its weight bank prunes with, and searches.
Every weight it changes is restored before it returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from ..options import option
from ..pruners.base import Pruner
from ..version import __version__
from .base import ALLOCATORS, AllocationContext, AllocationResult
from . import cache
from .cache import UnhashableModelError, ids_fingerprint, model_fingerprint
from .fisher import FisherOptions, fisher_genome, fisher_sensitivity
from .levels import LevelSpace
from .search import EvolutionarySearch, FitnessEvaluator, WeightBank
from .statistics import StatisticsStore, dense_layer_statistics, seeded_layer_statistics

logger = logging.getLogger(__name__)


@dataclass
class SearchOptions(FisherOptions):
    fitness: str = option("ppl", "MSP search objective on held-out calibration text: mean next-token NLL of the "
                          "pruned model (ppl) or KL divergence to the dense model (kl)", choices=("ppl", "kl"))
    # 2 x 512 rather than 4 x 256: the same tokens and search time, and windows long enough to show what a plan
    # costs at long context (docs/msp.md, "What the defaults rest on")
    fitness_samples: int = option(2, "held-out windows the search's fitness is measured on", kind=int, low=1)
    fitness_seqlen: int = option(512, "tokens per fitness window, the BOS included when the bos rule adds one",
                                 kind=int, low=1)
    fitness_pool: int = option(
        0, "MSP search: held-out windows each generation draws its fitness_samples windows from, anew every "
        "generation (the elites are scored again on each draw), so that no plan wins by fitting one small sample; "
        "the search ends by comparing the final population's 3 best and the Fisher seed on the whole pool (0: the "
        "same fitness_samples windows every generation)", kind=int, low=0)
    search_statistics: str = option(
        "auto", "input statistics the search's pruned weights come from: of the dense model (dense), or as a "
        "sequential prune with the Fisher seed plan gathers them (seed); auto: seed for pruners that update the "
        "weights they keep (SparseGPT), dense otherwise", choices=("auto", "dense", "seed"))
    final_statistics: str = option(
        "search", "input statistics the final prune takes after an MSP search: those the search's weight bank "
        "pruned with (search: the dense model's or the seed plan's, see search_statistics), so the saved model is "
        "the one the search scored and the final prune needs no forward pass; or a sequential prune with the "
        "searched plan gathering its own (sequential)", choices=("search", "sequential"))
    population_size: int = option(12, "MSP search: plans per generation", kind=int, low=2)
    generations: int = option(10, "MSP search: generations", kind=int, low=0)
    offspring: int = option(
        0, "MSP search: new plans bred per generation (0: population_size - 2, each given the full fitness); with "
        "selection_steps most of them are only screened on a few fitness windows", kind=int, low=0)
    selection_steps: str = option(
        "", "MSP search multi-step selection before the full fitness: comma-separated WINDOWS:SURVIVORS, e.g. "
        "'1:8,2:4' scores every child on the first fitness window and keeps the best 8, scores those on the first 2 "
        "and keeps 4; the survivors get the full fitness ('' : none)")
    statistics_refresh: int = option(
        0, "MSP search with search_statistics=seed: every this many generations, gather the bank's statistics again "
        "with the best plan so far (one more sequential statistics pass each time) and score the population anew, "
        "so the bank describes the model the search is heading for (0: never)", kind=int, low=0)
    search_cache_mb: int = option(
        1024, "memory for the search's cache of block outputs per plan prefix (less memory: more block runs, "
        "never another result)", kind=int, low=0)
    search_bank_mb: int = option(
        1024, "memory on the compute device for the search's pruned weights per layer and level; what does not fit "
        "goes to the work folder on disk (less memory: more disk reads, never another result)", kind=int, low=0)
    search_work_dir: Optional[str] = option(
        None, "folder for the search's work files (input statistics that are not cached, bank entries pushed out of "
        "memory), removed afterwards; default: a temporary folder in the cache directory", optional=True)
    search_checkpoint: Optional[str] = option(None, "file the MSP search saves each generation to and resumes from",
                                              optional=True)
    search_checkpoint_overwrite: bool = option(
        False, "when search_checkpoint was written with other settings (model, data, options), start afresh and "
        "overwrite it instead of refusing", kind=bool)

    def check_together(self, sparsity: Optional[float] = None, **context):
        super().check_together(sparsity=sparsity, **context)
        if self.fitness_pool and self.fitness_pool <= self.fitness_samples:
            raise ValueError(f"fitness_pool must be 0 (no pool) or more than fitness_samples ({self.fitness_samples})"
                             f", the windows each generation draws from it; got {self.fitness_pool}.")
        steps = self.selection()
        children = self.offspring or self.population_size - 2
        for (windows, survivors), previous in zip(steps, [(0, children)] + steps):
            if not (previous[0] < windows < self.fitness_samples):
                raise ValueError(f"selection_steps: the windows of each step must grow and stay below fitness_samples "
                                 f"({self.fitness_samples}), got {self.selection_steps!r}.")
            if not (1 <= survivors < previous[1]):
                raise ValueError(f"selection_steps: each step must keep fewer plans than it scores (offspring "
                                 f"{children} first) and at least one, got {self.selection_steps!r}.")

    def selection(self) -> List[Tuple[int, int]]:
        """``selection_steps`` as ``[(windows, survivors), ...]``."""
        steps = []
        for part in filter(None, (p.strip() for p in self.selection_steps.split(","))):
            try:
                windows, survivors = (int(v) for v in part.split(":"))
            except ValueError:
                raise ValueError(f"selection_steps: {part!r} is not WINDOWS:SURVIVORS (two integers, e.g. '2:4'); "
                                 f"got {self.selection_steps!r}.") from None
            steps.append((windows, survivors))
        return steps


def _model_key(context: AllocationContext) -> str:
    """The dense model's fingerprint (every parameter and buffer, see :mod:`optimum_msp.allocation.cache`)."""
    try:
        return model_fingerprint(context.model)
    except UnhashableModelError as error:
        # offloaded weights cannot be read here: key on the architecture, and say what that cannot catch
        logger.warning("The search checkpoint key cannot include the model's weights (%s): resuming will not notice "
                       "another model of the same architecture.", error)
        layout = [(name, str(p.dtype), tuple(p.shape)) for name, p in context.model.named_parameters()]
        return "layout:" + hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def search_settings(context: AllocationContext, space: LevelSpace, statistics: str, fitness_ids) -> Dict[str, Any]:
    """Everything that changes what the search computes, as the key of its checkpoint: a checkpoint written under
    other settings is refused (or, with ``search_checkpoint_overwrite``, replaced), never silently resumed.

    Left out on purpose: ``generations`` (a resumed search may run longer), ``search_cache_mb``,
    ``search_bank_mb`` and ``search_work_dir`` (memory and disk, never results) and the checkpoint's own path. The seed genome, population size and seed are added by the search.
    """
    options, budget, pruner = context.options, context.budget, context.pruner
    level_options = {name: getattr(options, name) for name in
                     ("granularity", "max_deviation", "level_step", "max_layer_sparsity",
                      "fisher_samples", "fisher_seqlen", "fitness_samples", "fitness_seqlen", "fitness_pool",
                      "search_statistics")}
    return {
        "version": __version__,
        "method": pruner.name,
        "pruner_options": dataclasses.asdict(pruner.options),
        "sparsity": budget.sparsity,
        "pattern": budget.pattern,
        "m": budget.m,
        "fitness": options.fitness,
        "units": len(space),
        "statistics": statistics,
        "options": level_options,
        "levels": {"units": space.units, "numels": space.numels, "base": space.base, "step": space.step,
                   "lower": space.lower, "upper": space.upper, "m": space.m},
        "model": _model_key(context),
        "calibration_ids": ids_fingerprint(context.calibration.ids if context.calibration is not None else None),
        "fitness_ids": ids_fingerprint(fitness_ids),
        "batch_size": context.batch_size,
    }


@contextlib.contextmanager
def work_folder(parent: Optional[str]) -> Iterator[Path]:
    """A fresh folder for the search's work files under ``parent`` (default: the cache directory), removed
    afterwards whatever happens."""
    base = Path(parent) if parent else cache.cache_dir() / "work"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="msp-search-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def search_statistics(choice: str, pruner: Pruner) -> str:
    """``"dense"`` or ``"seed"``: what ``search_statistics=choice`` means for this pruner."""
    if choice != "auto":
        return choice
    # a pruner that updates the kept weights (SparseGPT) depends most on where its inputs come from
    return "seed" if pruner.updates_weights else "dense"


@ALLOCATORS.register("msp", options=SearchOptions, needs_calibration=True)
def msp(context: AllocationContext) -> AllocationResult:
    options, budget, pruner = context.options, context.budget, context.pruner
    space = LevelSpace.build(budget, options, context.layers, context.numels)
    started = time.perf_counter()
    traces, blocks = fisher_sensitivity(context)
    seed_genome = fisher_genome(space, traces, budget, options)
    fisher_done = time.perf_counter()

    statistics = search_statistics(options.search_statistics, pruner)
    if options.statistics_refresh and statistics != "seed":
        raise ValueError(f"statistics_refresh={options.statistics_refresh} rebuilds statistics gathered with a "
                         f"plan, but this search's bank uses {statistics!r} statistics: set search_statistics="
                         "'seed' (or 'auto' with a pruner that updates weights, e.g. sparsegpt), or "
                         "statistics_refresh=0.")
    fitness_ids = context.calibration.held_out(options.fitness_pool or options.fitness_samples,
                                               options.fitness_seqlen, context.seed + 1)
    pool = draw = 0
    if options.fitness_pool:  # in fitness batches
        # given fitness_ids (held_out_ids) are the pool whatever their number
        pool = -(-fitness_ids.shape[0] // context.batch_size)
        draw = -(-options.fitness_samples // context.batch_size)
        if draw >= pool:
            raise ValueError(f"fitness_pool={options.fitness_pool} and fitness_samples={options.fitness_samples} make "
                             f"{pool} and {draw} batches of batch_size={context.batch_size}: nothing to draw. Raise "
                             "fitness_pool or lower batch_size.")
    settings = search_settings(context, space, statistics, fitness_ids) if options.search_checkpoint else None
    handing_over = options.final_statistics == "search" and pruner.needs_calibration
    with work_folder(options.search_work_dir) as work:
        # statistics handed to the final prune must outlive the work folder: beside it, removed once closed
        stats_dir = str(work.parent if handing_over else work)
        stats: Mapping = {}
        if pruner.needs_calibration and statistics == "seed":
            # inputs of every block as the final prune will see them, near the seed plan: from pruned blocks
            stats = seeded_layer_statistics(context, space.targets(seed_genome), work_dir=stats_dir)
        elif pruner.needs_calibration:
            stats = dense_layer_statistics(context, pruner.new_statistics, work_dir=stats_dir)
        statistics_done = time.perf_counter()
        bank = WeightBank(pruner, context.modules, stats, device=context.runner.device,
                          memory_bytes=options.search_bank_mb << 20, folder=work / "bank")
        evaluator = FitnessEvaluator(context.runner, space, bank, fitness_ids, options.fitness, context.batch_size,
                                     cache_bytes=options.search_cache_mb << 20)

        refresh_seconds = [0.0]

        def refresh(genome) -> None:  # the bank's statistics, gathered again with ``genome``'s plan
            started = time.perf_counter()
            if isinstance(bank.stats, StatisticsStore):
                bank.stats.close()
            bank.reset(seeded_layer_statistics(context, space.targets(genome), work_dir=stats_dir))
            evaluator.reset()
            refresh_seconds[0] += time.perf_counter() - started

        search_started, search_cpu_started = time.perf_counter(), time.process_time()
        search = EvolutionarySearch(
            space, evaluator, seed_genome, options.population_size, options.generations, context.seed,
            checkpoint=options.search_checkpoint, settings=settings,
            overwrite=options.search_checkpoint_overwrite, offspring=options.offspring,
            # windows -> the fitness batches that hold them
            selection=[(-(-windows // context.batch_size), survivors) for windows, survivors in options.selection()],
            refresh_every=options.statistics_refresh, refresh=refresh, pool=pool, draw=draw,
        )
        best = search.run()
        search_seconds = time.perf_counter() - search_started
        search_cpu_seconds = time.process_time() - search_cpu_started
        memory = {name: round(size / 2**20, 1) for name, size in {**bank.nbytes(), **evaluator.nbytes()}.items()}
        if isinstance(bank.stats, StatisticsStore):
            memory["statistics_on_disk"] = round(bank.stats.nbytes_on_disk() / 2**20, 1)
            if not handing_over:
                bank.stats.close()
        final_statistics = bank.stats if handing_over else None
    fitness = search.state.fitness
    summary = {
        "fitness": options.fitness,
        "statistics": statistics,
        "generations": options.generations,
        "population_size": options.population_size,
        "seed": context.seed,
        "granularity": options.granularity,
        # with a pool: the final comparison's values on the whole pool (the uniform plan is not in it)
        "best_fitness": search.best_fitness,
        "fisher_fitness": search.final_fitness.get(seed_genome) if pool else fitness.get(seed_genome),
        "uniform_fitness": None if pool else fitness.get(space.uniform()),
        "fitness_pool": options.fitness_pool,
        "history": search.state.history,
        "mean_history": search.state.mean_history,
        "offspring": search.offspring,
        "selection_steps": options.selection_steps,
        "statistics_refresh": options.statistics_refresh,
        "refreshed_around": len(search.state.refreshes),
        "levels": [space.sparsity(s) for s in best],
    }
    report = {
        "fisher_seconds": round(fisher_done - started, 2),
        "statistics_seconds": round(statistics_done - fisher_done, 2),  # the bank's input statistics pass
        "search_seconds": round(search_seconds, 2),
        "search_cpu_seconds": round(search_cpu_seconds, 2),  # robust to other processes on the machine
        "refresh_seconds": round(refresh_seconds[0], 2),  # statistics passes of statistics_refresh, in search_seconds
        # full ones (with a pool, the elites' re-scorings too); screened ones and the finalists apart
        "evaluations": search.state.scorings if pool else len(fitness) + search.archived,
        "finalists": len(search.final_fitness),
        "screened": len(search._screened),
        "evaluations_this_run": search.new_evaluations,
        "blocks_run": evaluator.blocks_run,
        "evaluations_here": evaluator.evaluations,  # this process's share under several processes
        "bank_entries_computed": bank.computed,
        "bank_entries_read_back": bank.read_back,
        "memory_mb": memory,  # what the search held (peak RSS also has the model, one block's statistics, slack)
    }
    logger.info("MSP search: best %s fitness %.5f (Fisher seed %s, uniform %s) after %d evaluations in %.0fs",
                options.fitness, summary["best_fitness"], summary["fisher_fitness"], summary["uniform_fitness"],
                report["evaluations"], search_seconds)
    summary["final_statistics"] = options.final_statistics
    return AllocationResult(space.targets(best), traces, blocks, search=summary, report=report,
                            statistics=final_statistics)
