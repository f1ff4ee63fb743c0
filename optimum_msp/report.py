"""``report.md`` beside a pruned checkpoint: the settings, the plan (summary, per-block table, figure), what the run
cost (timings and memory of ``report.json``) and the evaluation results recorded for the folder.

The report is built from the folder's own files (the plan in ``config.json``, ``msp_config.json``, ``report.json``,
the model card's ``model-index``), so a save and a later ``optimum-msp eval --update-card`` write it the same way.
:func:`compare_allocations` records, while the model is still dense, the per-layer sparsity other allocations would
give the same layers (``report.json``'s ``comparison``), which the figure draws beside the plan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Union

from .plan import CONFIG_KEY, SparsityPlan

logger = logging.getLogger(__name__)

#: the human-readable report beside a saved checkpoint
REPORT_FILENAME = "report.md"
#: the run report (timings, memory, counters; never in config.json) that ``MSPPruner.save_pretrained`` writes
RUN_REPORT_FILENAME = "report.json"
#: the allocations a report can compare a plan with, in the order it shows them
DEFAULT_COMPARISONS = ("uniform", "owl")


def default_comparisons(allocation: str, method: str = "wanda") -> tuple:
    """What ``optimum-msp prune`` compares a plan with unless told: the uniform plan (free), and OWL for an MSP-Wanda
    plan. OWL needs the dense model's input norms, which an MSP-Wanda run has just cached (the comparison then takes
    about a second on SmolLM2-135M); any other run would pay one more statistics pass over the calibration windows
    (443 CPU s on SmolLM2-135M, as long as a uniform prune's own pass), so it is left to ``--compare-with owl``."""
    return ("uniform", "owl") if allocation == "msp" and method == "wanda" else ("uniform",)


# ----------------------------------------------------------------------------------------------- comparison
def compare_allocations(context: Any, config: Any, names: Iterable[str]) -> Dict[str, Dict[str, float]]:
    """Per-layer sparsity that each allocation in ``names`` gives the run's layers, budget and calibration.

    Call it before any weight changes (the allocators read the dense model). Skipped, with a log line: the run's
    own allocation, a fixed N:M pattern (nothing to allocate), and allocators that need calibration data when the
    run has none. OWL reads the dense input statistics from the cache an MSP-Wanda run has just filled; otherwise it
    costs one statistics pass over the calibration windows (logged with its time).
    """
    from .allocation import ALLOCATORS

    compared: Dict[str, Dict[str, float]] = {}
    if config.pattern_kind == "n:m":
        return compared
    for name in dict.fromkeys(names):
        if name == config.allocation:
            continue
        entry = ALLOCATORS.entry(name)
        if entry.flags.get("needs_calibration") and context.calibration is None:
            logger.info("The report does not compare with %s: it needs calibration data, which this run has none of.",
                        name)
            continue
        started = time.perf_counter()
        options = entry.options.from_values(vars(config))
        options.check()
        result = entry.item(dataclasses.replace(context, options=options))
        compared[name] = {layer: target.sparsity for layer, target in result.targets.items()}
        logger.info("Allocation %s for the report's comparison: %.1fs", name, time.perf_counter() - started)
    return compared


# ------------------------------------------------------------------------------------------- reading a folder
def read_plan(folder: Union[str, os.PathLike]) -> SparsityPlan:
    """The plan in ``folder/config.json``; ``ValueError`` saying what is missing (a folder, a config, a plan)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a directory saved by optimum-msp.")
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no config.json; pass a directory saved by optimum-msp.") from None
    except ValueError as error:
        raise ValueError(f"{folder}/config.json is not valid JSON ({error}).") from None
    if CONFIG_KEY not in config:
        raise ValueError(f"{folder} holds no sparsity plan ({CONFIG_KEY!r} in config.json): it is not a checkpoint "
                         "pruned by optimum-msp.")
    plan = SparsityPlan.from_dict(config[CONFIG_KEY])
    # config.json is written with sorted keys ("layers.10" before "layers.2"): back to block order for display
    plan.layers = dict(sorted(plan.layers.items(), key=lambda item: natural_key(item[0])))
    plan.block_sensitivity = dict(sorted(plan.block_sensitivity.items(), key=lambda item: int(item[0])))
    return plan


def natural_key(name: str) -> list:
    """Sort key reading the numbers in a name as numbers: ``layers.2`` before ``layers.10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def recorded_results(folder: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """Every evaluation result recorded in ``folder``: the model card's ``model-index`` (``optimum-msp eval
    --update-card``, whole-split perplexity of ``prune``) and the run report's evaluation (``prune --eval-windows``).

    Rows: ``{"dataset", "split", "metric", "value", "note", "source"}``.
    """
    folder = Path(folder)
    rows: List[Dict[str, Any]] = []
    card = folder / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        try:
            results = ModelCard.load(card).data.eval_results or []
        except Exception as error:  # noqa: BLE001 - a hand-edited card must not break a report
            logger.warning("Could not read the results in %s (%s).", card, error)
            results = []
        for result in results:
            args = result.dataset_args or {}
            rows.append({"dataset": result.dataset_name, "split": result.dataset_split or "-",
                         "metric": result.metric_name or result.metric_type, "value": result.metric_value,
                         "note": ", ".join(f"{k} {v}" for k, v in args.items()), "source": "model card"})
    evaluation = _read_json(folder / RUN_REPORT_FILENAME).get("evaluation")
    if isinstance(evaluation, dict) and "wikitext2_test_ppl" in evaluation:
        value = evaluation["wikitext2_test_ppl"]
        # a whole-split number is in the card already (prune puts it there)
        if not any(isinstance(r["value"], (int, float)) and math.isclose(r["value"], value) for r in rows):
            windows = evaluation.get("windows")
            note = [f"{'all' if windows == 'all' else f'first {windows}'} windows of {evaluation.get('seqlen')} tokens"]
            if evaluation.get("bos") is not None:
                note.append("BOS first" if evaluation["bos"] else "no BOS")
            rows.append({"dataset": "WikiText-2 (raw)", "split": "test", "metric": "perplexity", "value": value,
                         "note": ", ".join(note), "source": "prune (report.json)"})
    return rows


# --------------------------------------------------------------------------------------------------- the text
def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def _table(header: List[str], rows: Iterable[Iterable[Any]], right: Iterable[int] = ()) -> List[str]:
    right = set(right)
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _flatten(data: Mapping[str, Any], prefix: str = "") -> List[tuple]:
    rows = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def _ordered(comparison: Mapping[str, Any]) -> List[str]:
    """The compared allocations, the default ones first (uniform, then OWL)."""
    return sorted(comparison, key=lambda name: (DEFAULT_COMPARISONS + (name,)).index(name))


def _blocks(plan: SparsityPlan, comparison: Mapping[str, Mapping[str, float]]) -> List[str]:
    """One row per decoder block: its layers, weights, parameter-weighted sparsity (this plan and the compared
    ones) and Fisher trace."""
    from .plotting import _block_of

    groups: Dict[str, List[str]] = {}
    for name in plan.layers:
        groups.setdefault(_block_of(name), []).append(name)
    others = [name for name in _ordered(comparison)
              if name != plan.allocation and all(layer in comparison[name] for layer in plan.layers)]
    header = ["block", "layers", "weights", plan.allocation, *others, "Fisher trace"]
    rows = []
    for index, (block, names) in enumerate(groups.items()):
        numel = sum(plan.layers[n].numel for n in names)

        def weighted(sparsity):
            return f"{sum(plan.layers[n].numel * sparsity(n) for n in names) / numel:.4f}"

        trace = plan.block_sensitivity.get(str(index))
        rows.append([block, len(names), f"{numel:,}", weighted(lambda n: plan.layers[n].target.sparsity),
                     *(weighted(lambda n, o=o: comparison[o][n]) for o in others),
                     "-" if trace is None else f"{trace:.4g}"])
    return _table(header, rows, right=range(1, len(header)))


def render_report(folder: Union[str, os.PathLike]) -> str:
    """The text of ``report.md`` for the checkpoint in ``folder``."""
    from .plotting import PLOT_FILENAME
    from .version import __version__

    folder = Path(folder)
    plan = read_plan(folder)
    settings = _read_json(folder / "msp_config.json")
    run = _read_json(folder / RUN_REPORT_FILENAME)
    comparison = run.get("comparison") or {}
    achieved = plan.achieved_sparsity
    calibration = plan.calibration or {}
    lines = [f"# Pruning report: {plan.method} / {plan.allocation} at {plan.target_sparsity:g} sparsity", "",
             f"Written by optimum-msp {__version__}. The plan is in `config.json` (`{CONFIG_KEY}`) and is verified "
             "against the weights on load; `optimum-msp inspect` checks it per layer.", "", "## Plan", ""]
    numel = sum(layer.numel for layer in plan.layers.values())
    lines += _table(["", ""], [
        ("method", plan.method), ("allocation", plan.allocation),
        ("pattern", plan.pattern + (f" (M = {plan.m}; N:M counts weights kept)" if plan.m else "")),
        ("target sparsity", f"{plan.target_sparsity:.4f}"), ("planned sparsity", f"{plan.planned_sparsity:.4f}"),
        ("achieved sparsity", "-" if achieved is None else f"{achieved:.4f}"),
        ("pruned layers", f"{len(plan.layers)} ({numel:,} weights)"),
        ("calibration", ", ".join(f"{k}={v}" for k, v in calibration.items()) or "-"),
    ])
    if (folder / PLOT_FILENAME).is_file():
        from .plotting import _NAMES, comparison_series

        others = [_NAMES.get(n, n) for n in comparison_series(plan, comparison)]  # drawn beside the bars
        panels = ["Top: each layer's sparsity (bars)" + (f", beside the {' and '.join(others)} plan"
                                                          f"{'s' if len(others) > 1 else ''} of the same layers "
                                                          f"(line{'s' if len(others) > 1 else ''})"
                                                          if others else "")]
        if plan.block_sensitivity:
            panels.append("the decoder blocks' Fisher trace")
        if plan.search.get("history"):
            panels.append("the search's fitness per generation")
        lines += ["", f"![per-layer sparsity, block sensitivity and search progress]({PLOT_FILENAME})", "",
                  "; then ".join(panels) + "."]
    lines += ["", "### Per decoder block", "", *_blocks(plan, comparison)]
    if plan.search:
        search = plan.search
        lines += ["", "## Search", ""]
        keys = ["fitness", "population_size", "generations", "granularity", "statistics", "fitness_pool",
                "best_fitness", "fisher_fitness", "uniform_fitness"]
        if not search.get("fitness_pool"):  # no pool, no row
            keys.remove("fitness_pool")
        # a pool's search reports its final values on the whole pool, and no uniform value
        lines += _table(["", ""], [(key, _number(search[key])) for key in keys if search.get(key) is not None])
        if search.get("fitness_pool"):
            lines += ["", f"Best and Fisher fitness on all {search['fitness_pool']} pool windows; the history below "
                          "is on each generation's own draw."]
        history, means = list(search.get("history") or []), list(search.get("mean_history") or [])
        if history:
            has_mean = len(means) == len(history)
            header = ["generation", "best fitness"] + (["mean fitness"] if has_mean else [])
            rows = [[g + 1, f"{best:.5g}"] + ([f"{means[g]:.5g}"] if has_mean else [])
                    for g, best in enumerate(history)]
            lines += ["", *_table(header, rows, right=range(len(header)))]
            if not has_mean:
                lines += ["", "(This run recorded the best fitness per generation only, not the population's mean.)"]
    if settings:
        lines += ["", "## Settings", "", "`msp_config.json` (`optimum-msp prune --config` re-runs it):", ""]
        lines += _table(["setting", "value"], [(key, json.dumps(value)) for key, value in settings.items()
                                               if key != "quant_method"])
    costs = _flatten({key: value for key, value in run.items() if key not in ("comparison", "evaluation")})
    if costs:
        lines += ["", "## Run: timings and memory", "",
                  "From `report.json` (times in seconds, wall time unless named cpu; memory in MB):", ""]
        lines += _table(["entry", "value"], [(key, _number(value)) for key, value in costs], right=[1])
    lines += ["", "## Evaluation", ""]
    results = recorded_results(folder)
    if results:
        lines += _table(["dataset", "split", "metric", "value", "how", "recorded in"],
                        [(r["dataset"], r["split"], r["metric"], _number(r["value"]), r["note"] or "-", r["source"])
                         for r in results], right=[3])
    else:
        lines += ["None recorded. `optimum-msp eval DIR --tasks wikitext2,arc_easy --update-card` adds some."]
    return "\n".join(lines) + "\n"


def write_report(folder: Union[str, os.PathLike]) -> Path:
    """(Re)write ``folder/report.md`` from the folder's files; the file is replaced whole, never half-written."""
    from .utils.io import write_text_atomically

    folder = Path(folder)
    return write_text_atomically(folder / REPORT_FILENAME, render_report(folder))
