"""Fast fitness of a candidate plan: loss of the pruned model on held-out calibration windows.

Three savings make hundreds of evaluations affordable:

* pruned weights come from a :class:`WeightBank` (computed once per layer and level), so an evaluation
  only swaps tensors in;
* hidden states are cached per genome prefix: a candidate that shares its first k blocks' levels with an
  evaluated one re-runs only blocks >= k;
* the model's own head (final norm, ``lm_head``) is run by replaying cached block outputs through the
  model's forward, which keeps this architecture-agnostic.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ...modeling.sequential import BlockInputs, BlockRunner
from ..levels import Genome, LevelSpace
from .bank import WeightBank


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
        # every block's own arguments (masks, position embeddings differ between layer types), replayed by
        # runner.run_block with the hidden states of a candidate plan
        self.inputs: BlockInputs = runner.capture(fitness_ids, batch_size)
        self.block_units: Dict[int, List[int]] = {}
        for unit, block in enumerate(space.unit_blocks):
            self.block_units.setdefault(block, []).append(unit)
        count = len(runner.blocks)
        # genome entries that decide blocks 0..b: the cache key of block b's output
        self._prefix_end = [sum(1 for ub in space.unit_blocks if ub <= b) for b in range(count)]
        self._cache: "OrderedDict[Tuple, List[torch.Tensor]]" = OrderedDict()
        self._entry_bytes = sum(h.numel() * h.element_size() for h in self.inputs.hidden)
        self._cache_entries = max(count, cache_bytes // max(self._entry_bytes, 1))
        self._cache_peak_entries = 0
        self.blocks_run = 0
        self.evaluations = 0
        self.reference: Optional[List[torch.Tensor]] = None
        if kind == "kl":
            bank.restore()
            # fp32: KL is a small difference of log-probabilities, bf16 would swamp it
            self.reference = [F.log_softmax(l, dim=-1) for l in self._logits(self._run_dense())]

    def nbytes(self) -> Dict[str, int]:
        """Memory held: the block inputs of the fitness windows, the peak of the prefix cache of block
        outputs, and the dense reference log-probabilities (``kl`` fitness only)."""
        return {
            "fitness_inputs": self._entry_bytes,
            "hidden_cache_peak": self._cache_peak_entries * self._entry_bytes,
            "reference_logprobs": sum(r.numel() * r.element_size() for r in self.reference or ()),
        }

    @torch.no_grad()
    def _run_dense(self) -> List[torch.Tensor]:
        hidden = list(self.inputs.hidden)
        for block in range(len(self.runner.blocks)):
            hidden = self._run_block(block, hidden)
        return hidden

    def _run_block(self, block: int, hidden: List[torch.Tensor]) -> List[torch.Tensor]:
        self.blocks_run += 1
        return self.runner.run_block(block, self.inputs, hidden=hidden)

    @torch.no_grad()
    def _logits(self, final_hidden: List[torch.Tensor]) -> List[torch.Tensor]:
        """Run the model's head on cached last-block outputs (see :meth:`BlockRunner.head`)."""
        return [self.runner.head(final_hidden[j], ids).logits.float() for j, ids in enumerate(self.batches)]

    def _loss(self, logits: List[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for j, (ids, batch_logits) in enumerate(zip(self.batches, logits)):
            if self.kind == "ppl":
                loss = F.cross_entropy(batch_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().to(batch_logits.device),
                                       reduction="sum")
                count += ids[:, 1:].numel()
            else:
                reference = self.reference[j]
                loss = F.kl_div(F.log_softmax(batch_logits, dim=-1), reference, log_target=True, reduction="sum")
                count += ids.numel()
            total += float(loss)
        return total / count

    def _key(self, block: int, genome: Genome) -> Tuple:
        return (block, tuple(genome[: self._prefix_end[block]]))

    @torch.no_grad()
    def __call__(self, genome: Genome) -> float:
        count = len(self.runner.blocks)
        start, hidden = 0, list(self.inputs.hidden)
        for block in range(count - 1, -1, -1):  # longest cached prefix
            key = self._key(block, genome)
            if key in self._cache:
                self._cache.move_to_end(key)
                start, hidden = block + 1, self._cache[key]
                break
        for block in range(start, count):
            for unit in self.block_units.get(block, ()):
                target = self.space.target(genome[unit])
                for name in self.space.units[unit]:
                    self.bank.load(name, target)
            hidden = self._run_block(block, hidden)
            self._cache[self._key(block, genome)] = hidden
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
            self._cache_peak_entries = max(self._cache_peak_entries, len(self._cache))
        self.evaluations += 1
        value = self._loss(self._logits(hidden))
        return value if math.isfinite(value) else float("inf")
