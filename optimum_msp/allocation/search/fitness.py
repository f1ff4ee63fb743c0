"""Fast fitness of candidate plans: loss of the pruned model on held-out calibration windows.

Four savings make hundreds of evaluations affordable:

* pruned weights come from a :class:`WeightBank` (computed once per layer and level) and are substituted at
  forward time, so a candidate costs no weight copy and the model is never written;
* a generation is evaluated *block-major*: all its candidates advance through block ``i`` together, so each block
  is onloaded (and its bank entries read) once per generation, and candidates that agree on every level up to
  block ``i`` share one forward through it;
* hidden states are cached per genome prefix across generations: a candidate that shares its first k blocks'
  levels with an evaluated one re-runs only blocks >= k;
* the model's own head (final norm, ``lm_head``) is run by replaying cached block outputs through the
  model's forward, which keeps this architecture-agnostic.

A fitness may be measured on some of the fitness batches only: the first ``batches`` (the search's multi-step
selection scores many candidates on few tokens and the best on all of them), or the batches ``windows`` names (a
search with a fitness pool scores each generation on its own draw of windows). Cached block outputs are kept per
batch, so a draw reuses whatever earlier draws computed for the same plan prefix and batch.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...modeling.sequential import BlockInputs, BlockRunner
from ...modeling.weights import substituted
from ...utils.memory import trim_heap
from ..levels import Genome, LevelSpace
from .bank import WeightBank

Hidden = List[torch.Tensor]


class FitnessEvaluator:
    def __init__(
        self,
        runner: BlockRunner,
        space: LevelSpace,
        bank: WeightBank,
        fitness_ids: torch.Tensor,
        kind: str = "ppl",
        batch_size: int = 1,
        cache_bytes: int = 3 << 30,
    ):
        self.runner = runner
        self.space = space
        self.bank = bank
        self.kind = kind
        self.batches = [fitness_ids[i : i + batch_size] for i in range(0, fitness_ids.shape[0], batch_size)]
        # every block's own arguments (masks, position embeddings differ between layer types), replayed with the
        # hidden states of a candidate plan
        self.inputs: BlockInputs = runner.capture(fitness_ids, batch_size)
        self.block_units: Dict[int, List[int]] = {}
        for unit, block in enumerate(space.unit_blocks):
            self.block_units.setdefault(block, []).append(unit)
        count = len(runner.blocks)
        # genome entries that decide blocks 0..b: the cache key of block b's output
        self._prefix_end = [sum(1 for ub in space.unit_blocks if ub <= b) for b in range(count)]
        # (block, genome prefix) -> {batch: that block's output}, least recently used first
        self._cache: "OrderedDict[Tuple, Dict[int, torch.Tensor]]" = OrderedDict()
        self._batch_bytes = [h.numel() * h.element_size() for h in self.inputs.hidden]
        self._entry_bytes = sum(self._batch_bytes)
        # at most cache_bytes, but always one plan's outputs of every block: the plan just run stays reusable
        self._cache_limit, self._cache_floor = cache_bytes, count
        self._cache_bytes = self._cache_peak_bytes = 0
        self._working_peak_bytes = 0
        self.blocks_run = 0
        self.evaluations = 0
        self.reference: Optional[List[torch.Tensor]] = None
        if kind == "kl":
            # fp32: KL is a small difference of log-probabilities, bf16 would swamp it
            self.reference = [F.log_softmax(l, dim=-1) for l in self._each_logits(self._run_dense())]

    def nbytes(self) -> Dict[str, int]:
        """Memory held: the block inputs of the fitness windows, the peak of the prefix cache of block outputs,
        the peak of one generation's hidden states alive at one block, and the dense reference log-probabilities
        (``kl`` fitness only)."""
        return {
            "fitness_inputs": self._entry_bytes,
            "hidden_cache_peak": self._cache_peak_bytes,
            "generation_hidden_peak": self._working_peak_bytes,
            "reference_logprobs": sum(r.numel() * r.element_size() for r in self.reference or ()),
        }

    # ------------------------------------------------------------------------------------------ pieces
    @torch.no_grad()
    def _run_dense(self) -> Hidden:
        hidden = list(self.inputs.hidden)
        for block in range(len(self.runner.blocks)):
            self.blocks_run += 1
            hidden = self.runner.run_block(block, self.inputs, hidden=hidden)
        return hidden

    @torch.no_grad()
    def _each_logits(self, final_hidden: Hidden, batches: Optional[Sequence[int]] = None) -> Iterator[torch.Tensor]:
        """Run the model's head on cached last-block outputs of ``batches`` (default: the first ones; see
        :meth:`BlockRunner.head`), one batch at a time: a whole pool's logits would be tokens x vocabulary floats."""
        batches = range(len(final_hidden)) if batches is None else batches
        for j, hidden in zip(batches, final_hidden):
            yield self.runner.head(hidden, self.batches[j]).logits.float()

    def _loss(self, logits: Iterable[torch.Tensor], batches: Optional[Sequence[int]] = None) -> float:
        """Mean per-token loss over ``logits`` of ``batches`` (default: the first ones); ``logits`` may be lazy,
        so that one batch's logits are alive at a time."""
        total, count = 0.0, 0
        for j, batch_logits in zip(itertools.count() if batches is None else batches, logits):
            ids = self.batches[j]
            if self.kind == "ppl":
                loss = F.cross_entropy(batch_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(batch_logits.device),
                                       reduction="sum")
                count += ids[:, 1:].numel()
            else:
                loss = F.kl_div(F.log_softmax(batch_logits, dim=-1), self.reference[j], log_target=True,
                                reduction="sum")
                count += ids.numel()
            total += float(loss)
        return total / count

    def _key(self, block: int, genome: Genome) -> Tuple:
        return (block, tuple(genome[: self._prefix_end[block]]))

    def _cached(self, key: Tuple, batches: Sequence[int]) -> Optional[Hidden]:
        """The cached outputs of ``batches`` under ``key``, when all of them are there."""
        known = self._cache.get(key)
        if known is None or any(j not in known for j in batches):
            return None
        self._cache.move_to_end(key)
        return [known[j] for j in batches]

    def _remember(self, key: Tuple, batches: Sequence[int], hidden: Hidden) -> None:
        known = self._cache.setdefault(key, {})
        for j, output in zip(batches, hidden):
            if j not in known:
                known[j] = output
                self._cache_bytes += self._batch_bytes[j]
        self._cache.move_to_end(key)
        while self._cache_bytes > self._cache_limit and len(self._cache) > self._cache_floor:
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= sum(self._batch_bytes[j] for j in dropped)
        self._cache_peak_bytes = max(self._cache_peak_bytes, self._cache_bytes)

    def _weights(self, block: int, genome: Genome) -> Dict[torch.nn.Module, torch.Tensor]:
        weights = {}
        for unit in self.block_units.get(block, ()):
            target = self.space.target(genome[unit])
            for name in self.space.units[unit]:
                weights[self.bank.modules[name]] = self.bank.weight(name, target)
        return weights

    def reset(self) -> None:
        """Forget the cached block outputs (after the bank changed: they were computed with its old weights)."""
        self._cache.clear()
        self._cache_bytes = 0

    # ---------------------------------------------------------------------------------------- evaluating
    @torch.no_grad()
    def evaluate(self, genomes: Sequence[Genome], batches: Optional[int] = None, on_block=None,
                 windows: Optional[Sequence[int]] = None) -> List[float]:
        """The fitness of each genome, block-major, on the fitness batches numbered ``windows`` (all by default), or
        the first ``batches`` of them.

        ``on_block(done, total)`` is called after each block with the blocks run so far for this call.
        """
        chosen = list(range(len(self.batches))) if windows is None else list(windows)
        if not chosen or any(not 0 <= j < len(self.batches) for j in chosen):
            raise ValueError(f"windows must name fitness batches in [0, {len(self.batches)}), got {windows!r}.")
        if batches is not None:
            chosen = chosen[: max(1, batches)]
        count = len(self.runner.blocks)
        distinct = list(dict.fromkeys(tuple(g) for g in genomes))
        # where each genome starts: after its longest cached prefix (whose output enters there)
        start: Dict[Genome, int] = {}
        entering: Dict[Tuple, Hidden] = {}
        for genome in distinct:
            start[genome] = 0
            for block in range(count - 1, -1, -1):
                key = self._key(block, genome)
                hit = self._cached(key, chosen)
                if hit is not None:
                    start[genome], entering[key] = block + 1, hit
                    break
        initial = [self.inputs.hidden[j] for j in chosen]
        previous: Dict[Tuple, Hidden] = {}  # outputs of the last block run, per prefix key
        final: Dict[Genome, Hidden] = {g: entering[self._key(count - 1, g)] for g in distinct if start[g] == count}
        first = min(start.values(), default=count)
        for block in range(first, count):
            todo: "OrderedDict[Tuple, Genome]" = OrderedDict()
            for genome in distinct:
                if start[genome] <= block:
                    todo.setdefault(self._key(block, genome), genome)
            outputs: Dict[Tuple, Hidden] = {}
            with self.runner.onloaded(block) as module:
                for key, genome in todo.items():
                    if block == 0:
                        hidden = initial
                    else:
                        parent = self._key(block - 1, genome)
                        hidden = previous[parent] if parent in previous else entering[parent]
                    with substituted(self._weights(block, genome)):
                        outputs[key] = self.runner.forward_block(module, block, self.inputs, hidden,
                                                                 batches=chosen)
                    self.blocks_run += 1
                    self._remember(key, chosen, outputs[key])
            previous = outputs
            # bank entries and hidden states of one block churn through the heap; give freed pages back so the
            # process's footprint follows what is alive (glibc keeps freed blocks of this size otherwise)
            trim_heap()
            alive = len(previous) * sum(self._batch_bytes[j] for j in chosen)
            self._working_peak_bytes = max(self._working_peak_bytes, alive)
            if on_block is not None:
                on_block(block - first + 1, count - first)
        for genome in distinct:
            if genome not in final:
                final[genome] = previous[self._key(count - 1, genome)]
        values = {}
        for genome in distinct:
            value = self._loss(self._each_logits(final[genome], chosen), chosen)
            values[genome] = value if math.isfinite(value) else float("inf")
            self.evaluations += 1
        return [values[tuple(g)] for g in genomes]

    def __call__(self, genome: Genome) -> float:
        return self.evaluate([genome])[0]
