"""Model cards for pruned checkpoints: the plan in words and tables, the results in ``model-index``.

``build_model_card(plan, base_model, results)`` returns a ``huggingface_hub.ModelCard`` whose metadata
carries the evaluation results as ``model-index`` (so the Hub shows them) and whose text gives the base
model, method, allocation, target and achieved sparsity, pattern, calibration recipe, seed, the search
summary and a per-layer table.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Mapping, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..plan import SparsityPlan

Result = Union[EvalResult, Mapping[str, Any]]

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
    eval_results = [_as_eval_result(r) for r in results]
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
