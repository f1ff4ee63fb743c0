"""Perplexity as the pruning literature measures it (SparseGPT, Wanda): the whole test text joined,
tokenized once (no special tokens), cut into non-overlapping windows (remainder dropped), exp(mean NLL).

Two protocols, chosen by ``bos`` (the same rule as the calibration windows, :func:`optimum_msp.data.resolve_bos`):

* **literature** (``bos="never"``, :data:`optimum_msp.data.LITERATURE_BOS`; the LLaMA tables of SparseGPT and
  Wanda): every window is ``seqlen`` text tokens; its first token is context only, the other ``seqlen - 1`` are
  scored.
* **BOS** (``bos="always"``, and ``"auto"`` for tokenizers that add a BOS to a plain encode: LLaMA-2, Gemma): every
  window is the BOS token then ``seqlen - 1`` text tokens (the text is cut every ``seqlen - 1`` tokens). The BOS
  position is not scored; the first text token is predicted from the BOS, so all ``seqlen - 1`` text tokens are
  scored. Each window is then what lm-eval's rolling log-likelihood scores for a document of those ``seqlen - 1``
  tokens with the BOS as its prefix token (lm-eval puts it before a document's first window only; here every
  window is a fresh sequence and gets one).

Either way a window is ``seqlen`` tokens long and ``seqlen - 1`` tokens are scored per window.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from ..data import Bos, evaluation_windows, load_text, resolve_bos, tokenize_text


def evaluation_ids(tokenizer, dataset: str = "wikitext2", split: str = "test") -> torch.Tensor:
    """The whole text of ``dataset``/``split`` as ``[1, N]`` token ids, without special tokens."""
    return tokenize_text(tokenizer, load_text(dataset, split))


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Mean next-token NLL of every window (``[windows]``): position ``i`` predicts token ``i + 1``, so a window's
    first token (text, or the BOS) is never a target."""
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


def perplexity_report(
    model,
    tokenizer=None,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    input_ids: Optional[torch.Tensor] = None,
    bos: Bos = "auto",
) -> Dict[str, Any]:
    """:func:`perplexity` with how it was measured: ``{"perplexity", "seqlen", "windows", "scored_tokens",
    "bos"}`` (``bos``: whether the windows started with the BOS token; ``scored_tokens`` = windows x (seqlen - 1))."""
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
    bos_token_id = resolve_bos(bos, tokenizer)
    windows = evaluation_windows(input_ids, seqlen, max_windows, bos_token_id)
    was_training = model.training
    model.eval()
    try:
        nlls = window_nlls(model, windows, batch_size)
    finally:
        model.train(was_training)
    count = int(windows.shape[0])
    return {"perplexity": math.exp(nlls.mean().item()), "seqlen": seqlen, "windows": count,
            "scored_tokens": count * (seqlen - 1), "bos": bos_token_id is not None}


def perplexity(
    model,
    tokenizer=None,
    dataset: str = "wikitext2",
    split: str = "test",
    seqlen: int = 2048,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    input_ids: Optional[torch.Tensor] = None,
    bos: Bos = "auto",
) -> float:
    """Perplexity of ``model`` on ``dataset``/``split`` (or on pre-tokenized ``input_ids`` [1, N], no special tokens).

    ``seqlen`` is each window's whole length, the BOS included; ``seqlen - 1`` tokens are scored per window.
    ``bos``: ``"auto"`` (a BOS first in every window when the tokenizer adds one to a plain encode; none without a
    tokenizer), ``"always"``, or ``"never"``, the literature protocol of the published LLaMA tables (see the module
    docstring). ``max_windows`` evaluates only the first windows (quick sweeps); ``None`` uses the whole split.
    :func:`perplexity_report` also returns the window count and the protocol.
    """
    return perplexity_report(model, tokenizer, dataset, split, seqlen, max_windows, batch_size, input_ids,
                             bos)["perplexity"]
