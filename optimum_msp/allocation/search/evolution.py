"""Pruning-oriented evolutionary search over per-unit levels with an exactly held sparsity budget.

* Genome: one integer level per unit (see :class:`~optimum_msp.allocation.levels.LevelSpace`).
* Initial population: the Fisher allocation, the uniform plan, and perturbations of the Fisher plan.
* Each generation keeps the ``elite`` best, then breeds children from tournament-selected parents:
  one-point crossover (the child keeps parent A's levels up to the cut, so its cached hidden states are
  reused) followed by a budget repair behind the cut, and mutation by budget-preserving moves (one unit
  one level sparser, another unit of the same size one level denser). Every genome is feasible, so the
  global sparsity never drifts.
* Multi-step selection (``offspring`` and ``selection``, after EvoPress, Sieberling et al. 2024): a generation
  may breed many more children than it keeps, score them all on the first few fitness windows, keep the best,
  re-score those on more windows, and so on; only the last survivors get the full fitness and join the
  population (beside the elites, topped up from the old population when too few survive). Cheap screening lets a
  generation look at many plans without being fooled by a small sample at the end.
* A fitness pool (``pool``, after EvoPress): each generation scores its children, and its elites again, on its
  own draw of ``draw`` fitness batches out of ``pool``, so no plan stays on top for fitting one small sample; the
  search ends by comparing the final population's best and the seed plan on the whole pool.
* No genome is bred twice; randomness is drawn per generation from ``(seed, generation)``, and the
  state is saved after every generation, so an interrupted search resumes to the same result.
* A checkpoint is keyed by the search's ``settings`` (everything that changes what it computes: model,
  data, options; see :func:`optimum_msp.allocation.msp.search_settings`). One written under other settings is
  refused with an error naming the file and the differing settings, unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from transformers.utils import logging as hf_logging

from ... import distributed
from ..levels import Genome, LevelSpace

logger = logging.getLogger(__name__)


@dataclass
class SearchState:
    generation: int = 0  # generations completed
    population: List[Genome] = field(default_factory=list)
    fitness: Dict[Genome, float] = field(default_factory=dict)
    history: List[float] = field(default_factory=list)  # best fitness after each generation
    mean_history: List[float] = field(default_factory=list)  # the population's mean fitness after each generation
    refreshes: List[Genome] = field(default_factory=list)  # the plans the fitness was rebuilt around, in order
    scorings: int = 0  # full fitness measurements, re-scorings of elites on a new draw of the pool included

    def to_json(self, settings: dict) -> str:
        return json.dumps({
            "settings": settings, "generation": self.generation,
            "population": [list(g) for g in self.population],
            "fitness": [[list(g), f] for g, f in self.fitness.items()],
            "history": self.history, "mean_history": self.mean_history,
            "refreshes": [list(g) for g in self.refreshes], "scorings": self.scorings,
        })

    @classmethod
    def from_json(cls, text: str, settings: dict) -> Optional["SearchState"]:
        """The saved state, or ``None`` when it was written under other ``settings``."""
        data = json.loads(text)
        if data.get("settings") != settings:
            return None
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data: dict) -> "SearchState":
        return cls(data["generation"], [tuple(g) for g in data["population"]],
                   {tuple(g): f for g, f in data["fitness"]}, list(data["history"]), list(data.get("mean_history", [])),
                   [tuple(g) for g in data.get("refreshes", [])], int(data.get("scorings", len(data["fitness"]))))


def _normalised(settings: dict) -> dict:
    """``settings`` as they read back from the checkpoint (tuples become lists, keys strings; values JSON cannot
    hold, e.g. in a custom pruner's options, by their text)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def differing_settings(saved: Any, current: dict) -> List[str]:
    """Names of the settings that differ between a checkpoint's and the current run's (``saved`` may be anything)."""
    if not isinstance(saved, dict):
        return ["(the checkpoint records no settings)"]
    differing = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the option, not the group ("options.fitness_samples")
            differing.extend(f"{key}.{sub}" for sub in sorted(set(old) | set(new)) if old.get(sub) != new.get(sub))
        else:
            differing.append(key)
    return differing


class SearchCheckpointMismatch(ValueError):
    """A search checkpoint written under other settings than the current run's."""


class EvolutionarySearch:
    def __init__(
        self,
        space: LevelSpace,
        fitness: Callable[[Genome], float],
        seed_genome: Genome,
        population_size: int = 16,
        generations: int = 20,
        seed: int = 0,
        elite: int = 2,
        tournament: int = 3,
        crossover_rate: float = 0.7,
        checkpoint: Optional[str] = None,
        settings: Optional[dict] = None,
        overwrite: bool = False,
        offspring: int = 0,
        selection: Sequence[Tuple[int, int]] = (),
        refresh_every: int = 0,
        refresh: Optional[Callable[[Genome], None]] = None,
        pool: int = 0,
        draw: int = 0,
        finalists: int = 3,
    ):
        if population_size < 2:
            raise ValueError("population_size must be at least 2.")
        if pool and not 0 < draw < pool:
            raise ValueError(f"A fitness pool of {pool} batches needs a draw of 1 to {pool - 1} batches per "
                             f"generation, got {draw}.")
        self.space = space
        self.fitness_fn = fitness
        self.seed_genome = tuple(seed_genome)
        self.population_size = population_size
        self.generations = generations
        self.seed = seed
        self.elite = min(elite, population_size - 1)
        self.tournament = tournament
        self.crossover_rate = crossover_rate
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.overwrite = overwrite
        self.offspring = offspring or population_size - self.elite
        self.selection = [tuple(step) for step in selection]  # (fitness batches, survivors) before the full fitness
        self.settings = _normalised(dict(settings or {}, population_size=population_size, seed=seed,
                                         seed_genome=list(self.seed_genome), elite=self.elite,
                                         tournament=tournament, crossover_rate=crossover_rate,
                                         offspring=self.offspring, selection=self.selection,
                                         refresh_every=refresh_every, pool=pool, draw=draw,
                                         finalists=finalists if pool else 0))
        if refresh_every and refresh is None:
            raise ValueError("refresh_every needs a refresh function that rebuilds the fitness around a plan.")
        self.refresh_every = refresh_every
        self.refresh = refresh
        self.pool, self.draw, self.finalists = pool, draw, finalists
        self._windows: Optional[List[int]] = None  # the fitness batches of the current draw (None: all of them)
        self.final_fitness: Dict[Genome, float] = {}  # with a pool: the finalists' fitness on the whole pool
        self._screened: Dict[Tuple[Genome, int], float] = {}  # partial fitness per (genome, batches), this run only
        self.state = SearchState()
        self.new_evaluations = 0
        self.archived = 0  # full evaluations dropped at refreshes (this run)

    # ------------------------------------------------------------------------------------------ moves
    def _rng(self, generation: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + generation)

    def _draw(self, epoch: int) -> Optional[List[int]]:
        """The fitness batches of ``epoch`` (0: the initial population, g + 1: generation g), drawn from the pool on
        a stream of their own, so the breeding stays what it is without a pool; ``None`` without a pool."""
        if not self.pool:
            return None
        return sorted(random.Random(f"fitness-draw/{self.seed}/{epoch}").sample(range(self.pool), self.draw))

    def mutate(self, genome: Genome, rng: random.Random, moves: int = 1) -> Genome:
        """Budget-preserving moves: one unit one level up, another of the same group one level down."""
        genes = list(genome)
        space = self.space
        for _ in range(moves):
            for _attempt in range(50):
                up = rng.randrange(len(genes))
                mates = [i for i in range(len(genes)) if i != up and space.group_of[i] == space.group_of[up]]
                if not mates:
                    break
                down = rng.choice(mates)
                if genes[up] < space.upper[up] and genes[down] > space.lower[down]:
                    genes[up] += 1
                    genes[down] -= 1
                    break
        return tuple(genes)

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        """One-point crossover; the part behind the cut is repaired to the budget."""
        cut = rng.randrange(1, len(a)) if len(a) > 1 else 0
        child = list(a[:cut]) + list(b[cut:])
        space = self.space
        for group_id, total in space.group_sums.items():
            members = [i for i in range(cut, len(child)) if space.group_of[i] == group_id]
            excess = sum(child[i] for i in range(len(child)) if space.group_of[i] == group_id) - total
            while excess != 0 and members:
                movable = [i for i in members
                           if (child[i] > space.lower[i] if excess > 0 else child[i] < space.upper[i])]
                if not movable:
                    break
                i = rng.choice(movable)
                child[i] += -1 if excess > 0 else 1
                excess += -1 if excess > 0 else 1
            if excess != 0:
                return a  # cannot repair behind this cut: keep parent A
        return tuple(child)

    def _select(self, ranked: Sequence[Genome], rng: random.Random) -> Genome:
        contenders = [rng.randrange(len(ranked)) for _ in range(self.tournament)]
        return ranked[min(contenders)]  # ranked best first

    # ---------------------------------------------------------------------------------------- running
    def _score(self, genomes: Sequence[Genome], progress=None, batches: Optional[int] = None,
               everything: bool = False) -> List[float]:
        """Fitness of ``genomes`` (all at once when the fitness can: block-major, see
        :meth:`FitnessEvaluator.evaluate`) on the current draw of the pool (without a pool, or with ``everything``:
        on every fitness batch), its first ``batches`` when given; the progress bar moves block by block."""
        evaluate_many = getattr(self.fitness_fn, "evaluate", None)
        if evaluate_many is None:
            if batches is not None or self.pool:
                raise ValueError("multi-step selection and a fitness pool need a fitness with "
                                 "evaluate(genomes, batches=..., windows=...)")
            values = []
            for genome in genomes:
                values.append(self.fitness_fn(genome))
                if progress is not None:
                    progress.update(1)
            return values
        shown = [0]

        def on_block(done: int, total: int) -> None:
            reached = len(genomes) * done // total
            if progress is not None and reached > shown[0]:
                progress.update(reached - shown[0])
                shown[0] = reached

        options = {} if batches is None else {"batches": batches}
        if self._windows is not None and not everything:
            options["windows"] = self._windows
        # under several processes each scores a share (genomes sorted, so shared prefixes stay on one process and
        # its cache of block outputs serves them); every process then holds every value and breeds alike
        genomes = list(genomes)
        mine = distributed.split_work(len(genomes), genomes)
        values = evaluate_many([genomes[i] for i in mine], on_block=on_block, **options)
        values = distributed.gather_values(len(genomes), mine, values)
        if progress is not None:
            progress.update(len(genomes) - shown[0])
        return values

    def _evaluate(self, population: Sequence[Genome], progress=None, again: bool = False) -> None:
        """Give every genome of ``population`` not scored yet (with ``again``: every one) its full fitness."""
        new = [g for g in dict.fromkeys(population) if again or g not in self.state.fitness]
        if not new:
            return
        for genome, value in zip(new, self._score(new, progress)):
            self.state.fitness[genome] = value
        self.new_evaluations += len(new)
        self.state.scorings += len(new)
        if progress is not None and not self.pool:  # with a pool, values of different draws do not compare
            progress.set_postfix(best=f"{min(self.state.fitness.values()):.4f}")

    def _screen(self, children: List[Genome], progress=None) -> List[Genome]:
        """Multi-step selection: the children that survive every step (best first), scored on few batches."""
        for batches, survivors in self.selection:
            if len(children) <= survivors:
                continue
            todo = [g for g in children if (g, batches) not in self._screened]
            for genome, value in zip(todo, self._score(todo, progress, batches)):
                self._screened[(genome, batches)] = value
            children = sorted(children, key=lambda g: (self._screened[(g, batches)], g))[:survivors]
        return children

    def _per_generation(self) -> int:
        """Scorings per generation, the progress bar's unit: every screening step and the full fitness."""
        counts, alive = [], self.offspring
        for _batches, survivors in self.selection:
            counts.append(alive)
            alive = min(alive, survivors)
        elites = self.elite if self.pool else 0  # scored again on each draw
        return sum(counts) + min(alive, self.population_size - self.elite) + elites

    def _ranked(self, population: Sequence[Genome]) -> List[Genome]:
        return sorted(set(population), key=lambda g: (self.state.fitness[g], g))

    def initial_population(self) -> List[Genome]:
        rng = self._rng(-1)
        population = [self.seed_genome]
        uniform = self.space.uniform()
        if uniform not in population:
            population.append(uniform)
        attempts = 0
        while len(population) < self.population_size and attempts < 100 * self.population_size:
            attempts += 1
            child = self.mutate(self.seed_genome, rng, moves=rng.randint(1, max(1, len(self.space) // 4)))
            if child not in population:
                population.append(child)
        return population

    def _save(self) -> None:
        if self.checkpoint is None or not distributed.is_main_process():  # one writer; every process has the state
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        temporary.write_text(self.state.to_json(self.settings))
        os.replace(temporary, self.checkpoint)

    def _resume(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        try:
            data = json.loads(self.checkpoint.read_text())
            saved = data.get("settings") if isinstance(data, dict) else None
            differing = differing_settings(saved, self.settings)
            state = None if differing else SearchState.from_data(data)
        except (OSError, ValueError, KeyError, TypeError) as error:
            if not self.overwrite:
                raise ValueError(
                    f"The search checkpoint {self.checkpoint} cannot be read ({type(error).__name__}: {error}). Delete "
                    "it, choose another search_checkpoint, or pass search_checkpoint_overwrite=True to start afresh "
                    "and overwrite it."
                ) from None
            logger.warning("Search checkpoint %s is unreadable (%s); overwriting it (search_checkpoint_overwrite).",
                           self.checkpoint, error)
            return False
        if differing:
            if not self.overwrite:
                raise SearchCheckpointMismatch(
                    f"The search checkpoint {self.checkpoint} was written under other settings ({', '.join(differing)} "
                    "differ): resuming it would return a plan searched for another model, data or options. Use the "
                    "settings it was written with, choose another search_checkpoint, or pass "
                    "search_checkpoint_overwrite=True to start afresh and overwrite it."
                )
            logger.warning("Search checkpoint %s was written under other settings (%s differ); starting afresh and "
                           "overwriting it (search_checkpoint_overwrite).", self.checkpoint, ", ".join(differing))
            return False
        self.state = state
        logger.info("Resuming the search from generation %d (%s)", state.generation, self.checkpoint)
        return True

    def run(self) -> Genome:
        # one step per scoring, from the first one: the initial population alone can take many minutes
        per_generation = self._per_generation()
        refreshes = (self.generations - 1) // self.refresh_every if self.refresh_every else 0
        finalists = self.finalists + 1 if self.pool else 0
        progress = hf_logging.tqdm(total=self.population_size * (1 + refreshes) + self.generations * per_generation
                                   + finalists, desc="MSP search (evaluations)",
                                   disable=not hf_logging.is_progress_bar_enabled())
        if self._resume():
            progress.update(min(progress.total, self.population_size + self.state.generation * per_generation))
            self._windows = self._draw(self.state.generation)
            if self.state.refreshes:  # the fitness the saved values were measured with
                self.refresh(self.state.refreshes[-1])
        else:
            self.state = SearchState(population=self.initial_population())
            self._windows = self._draw(0)
            self._evaluate(self.state.population, progress)
            self._save()
        while self.state.generation < self.generations:
            generation = self.state.generation
            rng = self._rng(generation)
            ranked = self._ranked(self.state.population)
            elites = list(ranked[: self.elite])
            if self.pool:  # a new draw: the elites are scored again on it, next to the children
                self._windows = self._draw(generation + 1)
                self._screened.clear()
            children: List[Genome] = []
            attempts = 0
            while len(children) < self.offspring and attempts < 50 * self.offspring:
                attempts += 1
                a = self._select(ranked, rng)
                child = self.crossover(a, self._select(ranked, rng), rng) if rng.random() < self.crossover_rate else a
                child = self.mutate(child, rng, moves=rng.randint(1, 2))
                if child in children or child in elites or child in self.state.fitness:
                    continue  # never evaluate a genome twice
                children.append(child)
            survivors = self._screen(children, progress)[: self.population_size - self.elite]
            next_population = elites + survivors
            for genome in ranked[self.elite:]:  # too few survivors: the old population's next best stay
                if len(next_population) >= self.population_size:
                    break
                if genome not in next_population:
                    next_population.append(genome)
            self._evaluate(survivors, progress)
            if self.pool:  # every member on this generation's draw, so that ranking them compares like with like
                self._evaluate([g for g in next_population if g not in survivors], progress, again=True)
            self.state.population = next_population
            self.state.generation += 1
            best = self._ranked(next_population)[0]
            self.state.history.append(self.state.fitness[best])
            values = [self.state.fitness[g] for g in next_population]
            self.state.mean_history.append(sum(values) / len(values))
            if self.refresh_every and self.state.generation % self.refresh_every == 0 \
                    and self.state.generation < self.generations:
                self._refresh(best, progress)
            self._save()
            progress.set_postfix(best=f"{self.state.fitness[best]:.4f}", generation=self.state.generation)
        if self.pool:
            self._final(progress)
        progress.close()
        return self.best

    def _final(self, progress=None) -> None:
        """With a pool: the final population's ``finalists`` best (on the last draw) and the seed plan, compared on
        every batch of the pool; the best of them is the search's result."""
        candidates = list(dict.fromkeys(self._ranked(self.state.population)[: self.finalists]
                                        + [self.seed_genome]))
        values = self._score(candidates, progress, everything=True)
        self.final_fitness = dict(zip(candidates, values))

    def _refresh(self, best: Genome, progress=None) -> None:
        """Rebuild the fitness around ``best`` (e.g. the bank's statistics gathered with it), then score the
        population again: values measured before are not comparable and are dropped."""
        logger.info("Generation %d: rebuilding the fitness around the best plan so far", self.state.generation)
        self.state.refreshes.append(best)
        self.refresh(best)
        self.archived += len(self.state.fitness)
        self.state.fitness = {}
        self._screened.clear()
        self._evaluate(self.state.population, progress)

    @property
    def best(self) -> Genome:
        if self.final_fitness:
            return min(self.final_fitness, key=lambda g: (self.final_fitness[g], g))
        if self.pool:  # values of different draws do not compare: the current population's best on its draw
            return self._ranked(self.state.population)[0]
        return min(self.state.fitness, key=lambda g: (self.state.fitness[g], g))

    @property
    def best_fitness(self) -> float:
        """The fitness of :attr:`best` (with a pool: on the whole pool)."""
        return (self.final_fitness or self.state.fitness)[self.best]
