"""``evaluate_tasks``: documents -> requests -> log-likelihoods -> lm-eval's per-task metrics."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ...data import tokenizer_adds_bos
from .data import Limit, load_task_docs
from .registry import LOGLIKELIHOOD, get_task
from .results import TaskResult, ZeroShotResults, mean, mean_stderr, perplexity, perplexity_stderr
from .scoring import DEFAULT_MAX_BATCH_TOKENS, LoglikelihoodScorer

logger = logging.getLogger(__name__)

#: Every registered task, in the order tables list them.
DEFAULT_TASKS = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "lambada_openai",
    "openbookqa",
    "piqa",
    "rte",
    "winogrande",
)


def evaluate_tasks(
    model,
    tokenizer=None,
    tasks: Union[str, Sequence[str]] = DEFAULT_TASKS,
    limit: Limit = None,
    batch_size: int = 32,
    data_dir: Optional[Union[str, Path]] = None,
    from_hub: bool = False,
    share_context: bool = True,
    max_length: Optional[int] = None,
    show_progress: bool = True,
    log_samples: bool = False,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> ZeroShotResults:
    """Zero-shot accuracy of a causal LM on lm-eval-harness tasks, scored as lm-eval scores them.

    Args:
        model: a ``PreTrainedModel`` (causal LM), or a Hub id / folder / bundled alias to load.
        tokenizer: its tokenizer; loaded from ``model`` when omitted.
        tasks: task names (see :func:`list_tasks`), or one name.
        limit: lm-eval's ``--limit``: the first ``limit`` documents of each task, or a fraction if < 1.
        batch_size: sequences per forward pass.
        max_batch_tokens: cap on rows x padded length per forward pass (bounds memory on long passages).
        data_dir: folder laid out like ``shared/data``; default: :func:`optimum_msp.utils.local_data_dir`,
            then the Hub datasets lm-eval loads.
        from_hub: ignore local files and read the Hub.
        share_context: run a question's shared context once and reuse its KV cache for every choice
            (same numbers, fewer FLOPs). ``False`` runs one full sequence per choice, as lm-eval does.
        max_length: model window for left truncation; default as lm-eval derives it from the config.
        show_progress: tqdm bar per task (respects ``transformers`` progress-bar settings).
        log_samples: keep per-document loglikelihoods and predictions in ``TaskResult.samples``.
    """
    model, tokenizer = _resolve_model(model, tokenizer)
    names: List[str] = [tasks] if isinstance(tasks, str) else list(tasks)
    definitions = [get_task(name) for name in names]  # fail on a typo before any work
    scorer = LoglikelihoodScorer(
        model, tokenizer, batch_size=batch_size, max_length=max_length, share_context=share_context,
        show_progress=show_progress, max_batch_tokens=max_batch_tokens,
    )
    results = {}
    for task in definitions:
        start = time.perf_counter()
        docs = load_task_docs(task, limit=limit, data_dir=data_dir, from_hub=from_hub)
        if not docs:
            raise ValueError(f"{task.name}: no documents to evaluate (limit={limit!r})")
        per_doc = [task.build_requests(doc) for doc in docs]
        flat = [request for doc in per_doc for request in doc.requests]
        scores = scorer.score(flat, description=task.name)
        results[task.name] = _aggregate(task, per_doc, scores, log_samples)
        results[task.name].seconds = time.perf_counter() - start
        logger.info("%s: %s", task.name, results[task.name].to_dict())
    config = {
        "limit": limit,
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "share_context": share_context,
        "num_fewshot": 0,
        # contexts start with BOS exactly when the tokenizer adds one by default (lm-eval's add_bos_token unset)
        "bos": tokenizer_adds_bos(tokenizer),
        "model": getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__,
    }
    return ZeroShotResults(results, config)


def _aggregate(task, per_doc, scores, log_samples: bool) -> TaskResult:
    offset = 0
    correct, correct_norm, loglikelihoods, samples = [], [], [], []
    for doc_index, doc in enumerate(per_doc):
        doc_scores = scores[offset : offset + len(doc.requests)]
        offset += len(doc.requests)
        lls = [value for value, _ in doc_scores]
        if task.output_type == LOGLIKELIHOOD:
            loglikelihoods.append(lls[0])
            correct.append(float(doc_scores[0][1]))
            if log_samples:
                samples.append({"doc": doc_index, "loglikelihood": lls[0], "is_greedy": doc_scores[0][1]})
            continue
        prediction = _first_argmax(lls)
        # acc_norm divides by the choice's length in characters (lm-eval's ``completion_len``).
        normalised = _first_argmax([value / len(choice) for value, choice in zip(lls, doc.choices)])
        correct.append(float(prediction == doc.gold))
        correct_norm.append(float(normalised == doc.gold))
        if log_samples:
            samples.append({"doc": doc_index, "loglikelihoods": lls, "gold": doc.gold, "prediction": prediction,
                            "prediction_norm": normalised})
    result = TaskResult(task=task.name, n=len(per_doc), acc=mean(correct), acc_stderr=mean_stderr(correct))
    if "acc_norm" in task.metrics:
        result.acc_norm, result.acc_norm_stderr = mean(correct_norm), mean_stderr(correct_norm)
    if "perplexity" in task.metrics:
        result.perplexity, result.perplexity_stderr = perplexity(loglikelihoods), perplexity_stderr(loglikelihoods)
    if log_samples:
        result.samples = samples
    return result


def _first_argmax(values: Sequence[float]) -> int:
    """``numpy.argmax``: the first index of the maximum (ties go to the earlier choice)."""
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def _resolve_model(model, tokenizer):
    if isinstance(model, (str, Path)):
        from ...modeling import load_model, load_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_model(model)
    elif tokenizer is None:
        from ...modeling import load_tokenizer

        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("Pass the tokenizer: the model does not say where it was loaded from.")
        tokenizer = load_tokenizer(name)
    elif isinstance(tokenizer, (str, Path)):
        from ...modeling import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer
