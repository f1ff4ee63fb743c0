"""Perplexity as the pruning literature measures it (SparseGPT, Wanda): the whole test text joined,
tokenized once, cut into non-overlapping ``seqlen`` windows (remainder dropped), exp(mean NLL)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from ..data import evaluation_windows, load_text, tokenize_text


def evaluation_ids(tokenizer, dataset: str = "wikitext2", split: str = "test") -> torch.Tensor:
    return tokenize_text(tokenizer, load_text(dataset, split))


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token NLL of every window (``[windows]``)."""
    device = model.get_input_embeddings().weight.device
    nlls = []
    progress = hf_logging.tqdm(
        total=windows.shape[0], desc="Perplexity", disable=not hf_logging.is_progress_bar_enabled()
    )
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        )
        nlls.append(loss.view(batch.shape[0], -1).mean(dim=1).cpu())
        progress.update(batch.shape[0])
    progress.close()
    return torch.cat(nlls)


def perplexity(
    model,
    tokenizer=None,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    input_ids: Optional[torch.Tensor] = None,
) -> float:
    """Perplexity of ``model`` on ``dataset``/``split`` (or on pre-tokenized ``input_ids`` [1, N]).

    ``max_windows`` evaluates only the first windows (quick sweeps); ``None`` uses the whole split.
    """
    for name, value, low in (("seqlen", seqlen, 2), ("batch_size", batch_size, 1)):
        # seqlen 1 has no next token to predict (mean of nothing: NaN); 0 divides by zero while windowing
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"perplexity: {name} must be an integer >= {low}, got {value!r}.")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"perplexity: max_windows must be a positive integer or None, got {max_windows!r}.")
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("perplexity needs a tokenizer (or pre-tokenized input_ids).")
        input_ids = evaluation_ids(tokenizer, dataset, split)
    was_training = model.training
    model.eval()
    try:
        nlls = window_nlls(model, evaluation_windows(input_ids, seqlen, max_windows), batch_size)
    finally:
        model.train(was_training)
    return math.exp(nlls.mean().item())
