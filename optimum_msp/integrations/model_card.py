"""Model cards for pruned checkpoints: the plan in words and tables, the results in ``model-index`` and, for
registered Hub benchmarks, in ``.eval_results/``.

``build_model_card(plan, base_model, results)`` returns a ``huggingface_hub.ModelCard`` whose metadata
carries the evaluation results as ``model-index`` (so the Hub shows them) and whose text gives the base
model, method, allocation, target and achieved sparsity, pattern, calibration recipe, seed, the search
summary and a per-layer table. :func:`write_eval_results` writes the Hub's newer evaluation-results files
(``.eval_results/*.yaml``, ``huggingface_hub.EvalResultEntry``) for the results whose dataset is a benchmark
registered on the Hub (:data:`HUB_BENCHMARKS`); they then show on the benchmark's leaderboard.

Only whole-split numbers go into either: a result measured on part of a split (``dataset_args`` with a
``limit`` or ``max_windows``, as :meth:`ZeroShotResults.to_model_index` writes for a limited run) is left out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..plan import SparsityPlan

logger = logging.getLogger(__name__)

Result = Union[EvalResult, Mapping[str, Any]]

#: ``dataset_args`` keys that say a result covers only part of its split
PARTIAL_ARGS = ("limit", "max_windows")
EVAL_RESULTS_FOLDER = ".eval_results"


@dataclasses.dataclass(frozen=True)
class HubBenchmark:
    """A dataset registered as a benchmark on the Hub, and which ``model-index`` results are scores on it.

    A result matches when its ``dataset_type`` is ``dataset_id``, its ``dataset_config`` is ``dataset_config``
    (when given) and its ``metric_type`` is ``metric``; it is then written as an entry for ``task_id`` (the
    task id of the benchmark's ``eval.yaml``).
    """

    dataset_id: str
    task_id: str
    metric: str
    dataset_config: Optional[str] = None

    def matches(self, result: EvalResult) -> bool:
        return (result.dataset_type == self.dataset_id and result.metric_type == self.metric
                and (self.dataset_config is None or result.dataset_config == self.dataset_config))


#: Benchmarks whose registration on the Hub is documented (huggingface_hub's ``EvalResultEntry`` and the Hub's
#: eval-results page use GPQA Diamond as their example). The zero-shot tasks of optimum-msp's own scorer (ARC,
#: HellaSwag, ...) are not among them, so their results stay in ``model-index`` only. Append a
#: :class:`HubBenchmark` for another registered benchmark (its ``eval.yaml`` names the task ids).
HUB_BENCHMARKS: List[HubBenchmark] = [
    # lm-eval's gpqa_diamond_* tasks read Idavidrein/gpqa, config gpqa_diamond, and report accuracy as ``acc``
    HubBenchmark(dataset_id="Idavidrein/gpqa", task_id="gpqa_diamond", metric="acc", dataset_config="gpqa_diamond"),
]

#: what the search's fitness numbers are (the ``ppl`` fitness is a mean NLL, whose exp would be a perplexity)
FITNESS_UNITS = {"ppl": "the mean next-token NLL (nats per token)", "kl": "the KL divergence to the dense model "
                 "(nats per token)"}


def perplexity_result(value: float, dataset: str = "wikitext2", split: str = "test", seqlen: int = 2048,
                      bos: Optional[bool] = None) -> EvalResult:
    """An ``EvalResult`` for WikiText-2 perplexity measured as :func:`optimum_msp.evaluation.perplexity` does.

    ``bos``: whether the windows started with the BOS token (``perplexity_report(...)["bos"]``), named in the
    metric so that a BOS number is not read against the literature's no-BOS tables; ``None``: not said."""
    names = {"wikitext2": ("wikitext", "WikiText-2 (raw)", "wikitext-2-raw-v1")}
    dataset_type, dataset_name, dataset_config = names.get(dataset, (dataset, dataset, None))
    return EvalResult(
        task_type="text-generation", task_name="Language modelling", dataset_type=dataset_type,
        dataset_name=dataset_name, dataset_config=dataset_config, dataset_split=split, metric_type="perplexity",
        metric_name=f"Perplexity (seqlen {seqlen}{_BOS_NAMES[None if bos is None else bool(bos)]})",
        metric_value=float(value),
    )


_BOS_NAMES = {None: "", True: ", BOS first in each window", False: ", no BOS"}


def _as_eval_result(result: Result) -> EvalResult:
    return result if isinstance(result, EvalResult) else EvalResult(**dict(result))


def is_partial(result: EvalResult) -> bool:
    """Whether ``result`` was measured on part of its split only (its ``dataset_args`` say so)."""
    args = result.dataset_args or {}
    return any(args.get(key) is not None for key in PARTIAL_ARGS)


def whole_split_results(results: Iterable[Result]) -> List[EvalResult]:
    """``results`` as ``EvalResult`` without the partial ones (each left out is logged)."""
    kept = []
    for result in map(_as_eval_result, results):
        if is_partial(result):
            logger.warning("Not putting %s %s = %s in the model card: it was measured on part of the split (%s).",
                           result.dataset_name, result.metric_type, result.metric_value,
                           ", ".join(f"{k}={result.dataset_args[k]}" for k in PARTIAL_ARGS
                                     if (result.dataset_args or {}).get(k) is not None))
            continue
        kept.append(result)
    return kept


def eval_result_entries(results: Iterable[Result],
                        benchmarks: Optional[Iterable[HubBenchmark]] = None) -> Dict[str, List[Any]]:
    """The Hub evaluation-results entries (``huggingface_hub.EvalResultEntry``) of the whole-split ``results``
    that are scores on a registered benchmark, by file name (``"<task_id>.yaml"``).

    Empty when this ``huggingface_hub`` has no ``EvalResultEntry`` (it came with 1.x).
    """
    try:
        from huggingface_hub import EvalResultEntry
    except ImportError:
        logger.info("huggingface_hub %s has no EvalResultEntry: no .eval_results files written (model-index only).",
                    getattr(__import__("huggingface_hub"), "__version__", "?"))
        return {}
    benchmarks = list(HUB_BENCHMARKS if benchmarks is None else benchmarks)
    files: Dict[str, List[Any]] = {}
    for result in whole_split_results(results):
        for benchmark in benchmarks:
            if not benchmark.matches(result):
                continue
            details = [result.metric_name or result.metric_type]
            details += [f"{key}={value}" for key, value in sorted((result.dataset_args or {}).items())]
            entry = EvalResultEntry(dataset_id=benchmark.dataset_id, task_id=benchmark.task_id,
                                    value=result.metric_value, notes=f"optimum-msp: {'; '.join(details)}")
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", benchmark.task_id) + ".yaml"
            files.setdefault(name, []).append(entry)
    return files


def write_eval_results(folder: Union[str, os.PathLike], results: Iterable[Result],
                       benchmarks: Optional[Iterable[HubBenchmark]] = None) -> List[Path]:
    """Write ``folder/.eval_results/<task_id>.yaml`` for every registered benchmark among the whole-split
    ``results`` (see :func:`eval_result_entries`); returns the files written (none when nothing matches)."""
    files = eval_result_entries(results, benchmarks)
    if not files:
        return []
    import yaml
    from huggingface_hub import eval_result_entries_to_yaml

    written = []
    for name, entries in files.items():
        path = Path(folder) / EVAL_RESULTS_FOLDER / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


def _summary_rows(plan: SparsityPlan) -> List[str]:
    achieved = plan.achieved_sparsity
    calibration = plan.calibration or {}
    rows = [
        ("Method", plan.method),
        ("Allocation", plan.allocation),
        ("Pattern", plan.pattern + (f" (M = {plan.m}; N:M counts weights kept)" if plan.m else "")),
        ("Target sparsity", f"{plan.target_sparsity:.4f}"),
        ("Planned sparsity", f"{plan.planned_sparsity:.4f}"),
        ("Achieved sparsity", "-" if achieved is None else f"{achieved:.4f}"),
        ("Pruned layers", str(len(plan.layers))),
        ("Calibration", ", ".join(f"{k}={v}" for k, v in calibration.items()) or "-"),
        ("Seed", str(calibration.get("seed", "-"))),
    ]
    return ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows]


def _search_section(plan: SparsityPlan) -> str:
    search = plan.search
    if not search:
        return ""
    keys = ["fitness", "population_size", "generations", "best_fitness", "fisher_fitness", "uniform_fitness"]
    lines = ["## Sparsity search", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {search[key]} |" for key in keys if key in search]
    if search.get("fitness") in FITNESS_UNITS:
        lines += ["", f"Fitness values are {FITNESS_UNITS[search['fitness']]} on held-out calibration windows."]
    if search.get("history"):
        lines += ["", "Best fitness per generation: " + ", ".join(f"{v:.5g}" for v in search["history"])]
    return "\n".join(lines) + "\n"


def _results_table(results: Iterable[EvalResult]) -> str:
    lines = ["| dataset | split | metric | value |", "|---|---|---|---:|"]
    for r in results:
        lines.append(f"| {r.dataset_name} | {r.dataset_split or '-'} | {r.metric_name or r.metric_type} | "
                     f"{r.metric_value:.4g} |")
    return "\n".join(lines)


def build_model_card(
    plan: SparsityPlan,
    base_model: Optional[str] = None,
    results: Iterable[Result] = (),
    model_name: Optional[str] = None,
    plot_path: Optional[str] = None,
) -> ModelCard:
    eval_results = whole_split_results(results)  # a partial-split number never goes into a card
    base_name = (base_model or "model").split("/")[-1]
    name = model_name or f"{base_name}-{plan.method}-{plan.allocation}-{plan.target_sparsity:g}"
    data = ModelCardData(
        base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
        tags=["pruned", "sparse", "optimum-msp", f"{plan.method}", f"allocation-{plan.allocation}"],
        model_name=name, eval_results=eval_results or None,
    )
    sections = [
        f"# {name}", "",
        f"`{base_model or 'this model'}` pruned with **{plan.method}** and the **{plan.allocation}** sparsity "
        f"allocation of optimum-msp (Mixed Sparsity Pruning). The per-layer plan is "
        "stored in `config.json` under `sparsity_plan` and verified against the weights when the model is "
        "loaded with `optimum_msp` imported; stock `transformers` loads it as a dense model.", "",
        "## Pruning", "", *_summary_rows(plan), "",
    ]
    if eval_results:
        sections += ["## Results", "", _results_table(eval_results), ""]
    search = _search_section(plan)
    if search:
        sections += [search]
    if plot_path:
        sections += ["## Allocation", "", f"![per-layer sparsity]({plot_path})", ""]
    sections += ["## Per-layer plan", "", "<details><summary>Per-layer targets</summary>", "",
                 plan.layer_table(), "", "</details>", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections)
    return ModelCard(content)
