"""Aggregated zero-shot metrics (lm-eval's aggregations and stderr) and their export formats."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from .registry import get_task


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (n - 1) over sqrt(n).

    For 0/1 accuracies this is ``sqrt(p * (1 - p) / (n - 1))``. ``nan`` below two values.
    """
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def perplexity(loglikelihoods: Sequence[float]) -> float:
    """lm-eval's ``perplexity`` aggregation: ``exp(-mean(per-doc target loglikelihood))``."""
    return math.exp(-mean(loglikelihoods))


def perplexity_stderr(loglikelihoods: Sequence[float]) -> float:
    """Delta-method stderr of :func:`perplexity` (``ppl * stderr(mean ll)``).

    lm-eval bootstraps this one (100k resamples); the delta method is its deterministic first-order
    equivalent and agrees with the bootstrap to a few percent on LAMBADA-sized samples.
    """
    return perplexity(loglikelihoods) * mean_stderr(loglikelihoods)


@dataclasses.dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: Optional[float] = None
    acc_norm_stderr: Optional[float] = None
    perplexity: Optional[float] = None
    perplexity_stderr: Optional[float] = None
    seconds: Optional[float] = None
    # Per-document details (``log_samples=True``): loglikelihoods, gold and predictions, for audits.
    samples: Optional[List[dict]] = dataclasses.field(default=None, repr=False)

    @property
    def ppl(self) -> Optional[float]:
        return self.perplexity

    @property
    def examples_per_second(self) -> Optional[float]:
        return self.n / self.seconds if self.seconds else None

    def metrics(self) -> Dict[str, float]:
        """The reported metrics of the task (lm-eval names), without the stderr entries."""
        names = get_task(self.task).metrics
        return {name: getattr(self, name) for name in names}

    def to_dict(self, include_samples: bool = False) -> dict:
        data = {key: value for key, value in dataclasses.asdict(self).items() if value is not None}
        if not include_samples:
            data.pop("samples", None)
        return data


@dataclasses.dataclass
class ZeroShotResults:
    results: Dict[str, TaskResult]
    config: dict = dataclasses.field(default_factory=dict)

    def __getitem__(self, task: str) -> TaskResult:
        return self.results[task]

    def __iter__(self):
        return iter(self.results.values())

    def __len__(self) -> int:
        return len(self.results)

    def to_dict(self, include_samples: bool = False) -> dict:
        return {
            "results": {name: result.to_dict(include_samples) for name, result in self.results.items()},
            "config": dict(self.config),
        }

    def to_json(self, path: Union[str, os.PathLike], include_samples: bool = False) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(include_samples), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return path

    def to_markdown(self) -> str:
        """One row per task: acc and acc_norm as percentages ± stderr, perplexity, n, wall time."""
        lines = ["| task | acc (%) | acc_norm (%) | ppl | n | time (s) |", "|---|---|---|---|---|---|"]
        for result in self.results.values():
            acc_norm = _percent(result.acc_norm, result.acc_norm_stderr) if result.acc_norm is not None else "-"
            ppl = f"{result.perplexity:.2f} ± {result.perplexity_stderr:.2f}" if result.perplexity is not None else "-"
            seconds = f"{result.seconds:.1f}" if result.seconds is not None else "-"
            lines.append(
                f"| {result.task} | {_percent(result.acc, result.acc_stderr)} | {acc_norm} | {ppl} | {result.n} "
                f"| {seconds} |"
            )
        return "\n".join(lines)

    def to_model_index(self, model_name: str) -> List[dict]:
        """The ``model-index`` list of a Hugging Face model card (``huggingface_hub.ModelCardData`` format).

        One result per task (task type ``text-generation``, the lm-eval Hub dataset with its config and
        split, zero-shot), with the task's metrics as fractions. Stderr has no slot in the format and is
        left out; evaluations run with a ``limit`` carry it in the dataset ``args``.
        """
        entries = []
        limit = self.config.get("limit")
        for name, result in self.results.items():
            task = get_task(name)
            source = task.hub[0]
            dataset = {"name": task.pretty_name, "type": source.path}
            if source.name:
                dataset["config"] = source.name
            dataset["split"] = source.split
            dataset["args"] = {"num_few_shot": 0, **({"limit": limit} if limit is not None else {})}
            metrics = [
                {"type": metric, "value": value, "name": _METRIC_NAMES.get(metric, metric)}
                for metric, value in result.metrics().items()
            ]
            entries.append(
                {"task": {"type": "text-generation", "name": "Text Generation"}, "dataset": dataset, "metrics": metrics}
            )
        return [{"name": model_name, "results": entries}]


_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy", "perplexity": "perplexity"}


def _percent(value: float, stderr: Optional[float]) -> str:
    if stderr is None or math.isnan(stderr):
        return f"{100 * value:.2f}"
    return f"{100 * value:.2f} ± {100 * stderr:.2f}"
