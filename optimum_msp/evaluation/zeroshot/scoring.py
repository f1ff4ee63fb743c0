"""Log-likelihood scoring of ``(context, continuation)`` requests, as lm-eval's ``loglikelihood``.

For each request the result is ``(sum of log p(continuation token | everything before), is_greedy)``,
where ``is_greedy`` says every continuation token is the argmax prediction (LAMBADA's accuracy).

Two execution paths give the same numbers (up to float rounding):

* **shared context** (default): requests with the same context (the choices of one question) run the
  context once with ``use_cache=True``; its key/value cache is then repeated once per continuation
  and the continuations run as one padded batch. Several questions share a forward: contexts are
  right-padded, so the continuation pass masks the padding hole ``[len(context), longest context)``
  with a 2-D attention mask and passes explicit ``position_ids`` (each row continues at its own
  context length). A continuation of one token needs no second pass at all: its log-probability is
  read from the context's last logits (BoolQ, RTE and most answer words).
* **full sequence**: ``context + continuation[:-1]`` per request, right-padded, one forward per batch
  (what lm-eval does). Used for contexts that nothing shares (LAMBADA, WinoGrande's per-option
  contexts), for sliding-window models whose window is shorter than a sequence, and for everything
  when ``share_context=False`` (the benchmark's baseline).

Right padding needs no attention mask in a causal model: real tokens never attend to later positions,
so whatever sits in the padding cannot change a score.
"""

from __future__ import annotations

import inspect
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from .tokenization import encode_pair, model_max_length, truncate_context

logger = logging.getLogger(__name__)

TokenPair = Tuple[Tuple[int, ...], Tuple[int, ...]]  # (context ids, continuation ids)
Score = Tuple[float, bool]  # (loglikelihood, is_greedy)

_PAD_ID = 0  # any valid id: padded positions are never read


class LoglikelihoodScorer:
    """Scores requests for one model/tokenizer pair.

    ``batch_size`` counts sequences per forward (continuation rows for the shared-context path,
    whole requests for the full-sequence path), as lm-eval's ``--batch_size`` does.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 32,
        max_length: Optional[int] = None,
        share_context: bool = True,
        show_progress: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.share_context = share_context
        self.show_progress = show_progress
        self.device = model.get_input_embeddings().weight.device
        forward_parameters = inspect.signature(model.forward).parameters
        # Only the scored positions need the (vocabulary-wide) lm_head; most CausalLMs can skip the rest.
        self._can_trim_logits = "logits_to_keep" in forward_parameters
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        self._sliding_window = window if isinstance(window, int) and window > 0 else None

    # ------------------------------------------------------------------ public
    def tokenize(self, requests: Sequence[Tuple[str, str]]) -> List[TokenPair]:
        pairs = []
        for context, continuation in requests:
            context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            if not continuation_ids:
                raise ValueError(f"Continuation {continuation!r} encodes to no tokens")
            context_ids = truncate_context(context_ids, continuation_ids, self.max_length)
            pairs.append((tuple(context_ids), tuple(continuation_ids)))
        return pairs

    def score(self, requests: Sequence[Tuple[str, str]], description: str = "Scoring") -> List[Score]:
        return self.score_tokens(self.tokenize(requests), description)

    @torch.no_grad()
    def score_tokens(self, pairs: Sequence[TokenPair], description: str = "Scoring") -> List[Score]:
        results: List[Optional[Score]] = [None] * len(pairs)
        shared, alone = self._split_by_sharing(pairs)
        progress = hf_logging.tqdm(
            total=len(pairs), desc=description, disable=not (self.show_progress and hf_logging.is_progress_bar_enabled())
        )
        was_training = self.model.training
        self.model.eval()  # dropout off: scores must be deterministic
        try:
            for batch in self._batches_of_groups(shared):
                for index, score in self._score_shared_context(batch, pairs):
                    results[index] = score
                progress.update(sum(len(indices) for _, indices in batch))
            alone.sort(key=lambda index: (-(len(pairs[index][0]) + len(pairs[index][1])), index))
            for start in range(0, len(alone), self.batch_size):
                chunk = alone[start : start + self.batch_size]
                for index, score in zip(chunk, self._score_full_sequences([pairs[i] for i in chunk])):
                    results[index] = score
                progress.update(len(chunk))
        finally:
            self.model.train(was_training)
            progress.close()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ grouping
    def _split_by_sharing(self, pairs: Sequence[TokenPair]):
        """Context -> request indices for contexts used more than once; the other indices go alone."""
        by_context: Dict[Tuple[int, ...], List[int]] = {}
        for index, (context, _) in enumerate(pairs):
            by_context.setdefault(context, []).append(index)
        shared, alone = [], []
        for context, indices in by_context.items():
            longest = len(context) + max(len(pairs[i][1]) for i in indices)
            window_too_short = self._sliding_window is not None and longest > self._sliding_window
            if self.share_context and len(indices) > 1 and not window_too_short:
                shared.append((context, indices))
            else:
                alone.extend(indices)
        # Longest contexts first (as lm-eval): similar lengths share a batch, and memory peaks come early.
        shared.sort(key=lambda group: (-len(group[0]), group[1][0]))
        return shared, alone

    def _batches_of_groups(self, groups):
        batch, rows = [], 0
        for group in groups:
            # A sliding window is applied on cache positions, which the padding hole of a shorter context
            # would shift: such models get one context per batch (no hole).
            full = rows + len(group[1]) > self.batch_size or self._sliding_window is not None
            if batch and full:
                yield batch
                batch, rows = [], 0
            batch.append(group)
            rows += len(group[1])
        if batch:
            yield batch

    # ------------------------------------------------------------------ forwards
    def _score_shared_context(self, groups, pairs: Sequence[TokenPair]) -> List[Tuple[int, Score]]:
        context_lengths = [len(context) for context, _ in groups]
        longest_context = max(context_lengths)
        context_ids = torch.full((len(groups), longest_context), _PAD_ID, dtype=torch.long)
        for row, (context, _) in enumerate(groups):
            context_ids[row, : len(context)] = torch.tensor(context)
        last_positions = torch.tensor([length - 1 for length in context_lengths])

        kwargs = {}
        if self._can_trim_logits:
            kept = torch.unique(last_positions)  # sorted
            kwargs["logits_to_keep"] = kept.to(self.device)
            last_columns = torch.searchsorted(kept, last_positions)
        else:
            last_columns = last_positions
        output = self.model(input_ids=context_ids.to(self.device), use_cache=True, **kwargs)
        group_rows = torch.arange(len(groups))
        last_logprobs = F.log_softmax(output.logits[group_rows, last_columns.to(output.logits.device)].float(), -1)
        cache = output.past_key_values
        del output

        # Every request of the batch: its group, and its continuation.
        rows = [(g, index) for g, (_, indices) in enumerate(groups) for index in indices]
        scores = {}
        for g, index in rows:
            first = pairs[index][1][0]
            scores[index] = [last_logprobs[g, first].item(), bool(last_logprobs[g].argmax().item() == first)]

        longer = [(g, index) for g, index in rows if len(pairs[index][1]) > 1]
        if longer:
            cache.reorder_cache(torch.tensor([g for g, _ in longer], device=self.device))
            width = max(len(pairs[index][1]) for _, index in longer) - 1
            inputs = torch.full((len(longer), width), _PAD_ID, dtype=torch.long)
            targets = torch.full((len(longer), width), -1, dtype=torch.long)
            attention = torch.ones((len(longer), longest_context + width), dtype=torch.long)
            positions = torch.empty((len(longer), width), dtype=torch.long)
            for row, (g, index) in enumerate(longer):
                continuation = pairs[index][1]
                inputs[row, : len(continuation) - 1] = torch.tensor(continuation[:-1])
                targets[row, : len(continuation) - 1] = torch.tensor(continuation[1:])
                attention[row, context_lengths[g] : longest_context] = 0  # the padding hole of this context
                positions[row] = context_lengths[g] + torch.arange(width)
            logits = self.model(
                input_ids=inputs.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
            ).logits
            logprob_sums, greedy = _score_targets(logits, targets.to(logits.device))
            for row, (_, index) in enumerate(longer):
                scores[index][0] += logprob_sums[row].item()
                scores[index][1] = scores[index][1] and bool(greedy[row].item())
        return [(index, (float(value), bool(is_greedy))) for index, (value, is_greedy) in scores.items()]

    def _score_full_sequences(self, chunk: Sequence[TokenPair]) -> List[Score]:
        """lm-eval's path: ``(context + continuation)[:-1]`` right-padded; score the continuation slots."""
        lengths = [len(context) + len(continuation) - 1 for context, continuation in chunk]
        width = max(lengths)
        inputs = torch.full((len(chunk), width), _PAD_ID, dtype=torch.long)
        targets = torch.full((len(chunk), width), -1, dtype=torch.long)
        for row, (context, continuation) in enumerate(chunk):
            sequence = context + continuation
            inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
            targets[row, len(context) - 1 : len(sequence) - 1] = torch.tensor(continuation)
        kwargs = {}
        first_scored = min(len(context) for context, _ in chunk) - 1
        if self._can_trim_logits and first_scored > 0:
            kwargs["logits_to_keep"] = width - first_scored  # keep the tail that holds every scored slot
            targets = targets[:, first_scored:]
        logits = self.model(input_ids=inputs.to(self.device), use_cache=False, **kwargs).logits
        logprob_sums, greedy = _score_targets(logits, targets.to(logits.device))
        return [(logprob_sums[row].item(), bool(greedy[row].item())) for row in range(len(chunk))]


def _score_targets(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log-prob of the targets (``-1`` = not scored) and whether all are the argmax."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    scored = targets >= 0
    safe_targets = targets.clamp(min=0)
    picked = logprobs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    sums = torch.where(scored, picked, torch.zeros_like(picked)).sum(dim=1)
    greedy = ((logprobs.argmax(dim=-1) == safe_targets) | ~scored).all(dim=1)
    return sums, greedy
