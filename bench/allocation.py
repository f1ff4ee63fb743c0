"""Allocation benchmark: uniform / OWL / Fisher / MSP x pruners x targets on the bundled SmolLM2-135M.

Protocol (shared/DESIGN.md): WikiText-2 raw test PPL at seqlen 2048; calibration 32 random 2048-token
windows of WikiText-2 raw validation (seed 0); the MSP search's fitness windows are drawn from the same
validation text, disjoint from the calibration windows. Sweeps report the first 16 test windows; rows run
with --full use the whole test split. Each row runs in its own process; results are appended to
bench/results/allocation.jsonl and the table is printed from that file.

    python bench/allocation.py --threads 1 --rows wanda:0.75:uniform wanda:0.75:owl wanda:0.75:msp
    python bench/allocation.py --threads 1 --rows sparsegpt:2:8:msp      # mixed N:M, M=8, 75 %
    python bench/allocation.py --table
    python bench/allocation.py --matrix        # PPL per pruner x target x allocation, uniform from baselines.py

Seed spread: ``--seeds 0,1,2`` runs every row once per seed (``--seed s``: the calibration windows, the MSP
fitness windows and the search are all drawn from it; the test windows stay the same), one row per seed in the
results file; ``--seeds-table`` prints mean (min-max) per cell and allocation, and calls MSP a gain over its
Fisher seed only where it beats it by more than the seed-to-seed spread:

    python bench/allocation.py --threads 1 --seeds 0,1,2 --rows wanda:0.75:uniform wanda:0.75:owl \
        wanda:0.75:fisher wanda:0.75:msp
    python bench/allocation.py --seeds-table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS, SWEEP_WINDOWS, Timer, append_result, git_commit, markdown_table, peak_rss_mb, read_results, run_rows,
    set_threads, wikitext_perplexity,
)

from optimum_msp.commands.arguments import add_config_arguments  # noqa: E402

OUT = RESULTS / "allocation.jsonl"
ALLOCATIONS = ("uniform", "owl", "fisher", "msp")
COLUMNS = ["method", "target", "allocation", "seed", "eval_windows", "ppl", "ppl_16", "achieved_sparsity", "search_s",
           "search_cpu_s", "evaluations", "evals_per_s", "dense_fwd_evals_per_s", "best_fitness", "uniform_fitness",
           "prune_s", "threads"]


def parse_target(fields: Sequence[str]):
    """``[SPARSITY]`` (unstructured) or ``[N, M]`` (mixed N:M, average N of every M) -> (config fields, label);
    ValueError on anything else."""
    if len(fields) == 1:
        return {"sparsity": float(fields[0])}, fields[0]
    n, m = fields
    return {"pattern": "mixed-n:m", "m": int(m), "sparsity": 1 - int(n) / int(m)}, f"{n}:{m} avg"


def parse_row(row: str):
    """``method:sparsity:allocation`` (unstructured) or ``method:N:M:allocation`` (mixed N:M, average N:M)."""
    method, *fields, allocation = row.split(":")
    target, label = parse_target(fields)
    return method, target, allocation, label


def run_row(row: str, args) -> None:
    from optimum_msp import MSPPruner
    from optimum_msp.commands.arguments import config_from_args, config_overrides

    set_threads(args.threads)
    method, target, allocation, label = parse_row(row)
    # the row names method, target and allocation; every other config flag comes from the command line
    config = config_from_args(args, defaults=dict(method=method, allocation=allocation, **target)).resolved()
    pruner = MSPPruner.from_pretrained(args.model)
    # one seed draws the calibration windows, the fitness windows (disjoint from them) and the search
    calibration = pruner.calibration(config)
    with Timer() as prune:
        pruner.prune(config, calibration=calibration.ids)
    result = {"row": row, "method": method, "target": label, "allocation": allocation, "threads": args.threads,
              "overrides": config_overrides(args), "prune_s": prune.wall, "prune_cpu_s": prune.cpu,
              "achieved_sparsity": pruner.plan.achieved_sparsity, "planned_sparsity": pruner.plan.planned_sparsity,
              "fitness": getattr(config, "fitness", None), "max_deviation": config.max_deviation,
              "granularity": config.granularity, "seed": config.seed, "commit": git_commit()}
    fitness_ids = calibration.held_out(config.fitness_samples, config.fitness_seqlen, config.seed + 1)
    search, cost = pruner.plan.search, pruner.report.get("allocation", {})
    if search:
        result.update(search_s=cost["search_seconds"], search_cpu_s=cost.get("search_cpu_seconds"),
                      evaluations=cost["evaluations"],
                      evals_per_s=cost["evaluations"] / max(cost["search_seconds"], 1e-9),
                      best_fitness=search["best_fitness"], uniform_fitness=search["uniform_fitness"],
                      fisher_fitness=search["fisher_fitness"], history=search["history"],
                      fisher_s=cost["fisher_seconds"], statistics_s=cost.get("statistics_seconds"),
                      search_cache_mb=config.search_cache_mb, fitness_samples=config.fitness_samples,
                      blocks_run=cost["blocks_run"], search_memory_mb=cost.get("memory_mb"),
                      population_size=config.population_size, generations=config.generations)
        result["dense_fwd_evals_per_s"] = 1.0 / _dense_fitness_forward_seconds(pruner.model, fitness_ids)
    # the search scores plans through its weight bank; this is the same loss on the model actually built
    result["final_fitness_nll"] = _final_fitness_nll(pruner.model, fitness_ids)
    result["levels"] = sorted({layer.target.describe() for layer in pruner.plan.layers.values()})
    windows = None if args.full else args.eval_windows
    result.update(wikitext_perplexity(pruner.model, pruner.tokenizer, windows))
    result["peak_rss_mb"] = peak_rss_mb()
    result["plan"] = pruner.plan.to_dict()  # whole plan, for optimum_msp.plotting later
    append_result(Path(args.output), result)


def _final_fitness_nll(model, ids) -> float:
    """Mean next-token NLL of the pruned model on the fitness windows: ``fitness="ppl"`` without the bank."""
    import torch

    with torch.no_grad():  # equal-length windows: the mean of per-window means is the per-token mean
        losses = [float(model(input_ids=ids[i : i + 1], labels=ids[i : i + 1], use_cache=False).loss)
                  for i in range(ids.shape[0])]
    return sum(losses) / len(losses)


def _dense_fitness_forward_seconds(model, ids) -> float:
    """One plain forward of the fitness windows through the whole model: the unit evaluations/s compares to."""
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        for row in range(ids.shape[0]):
            model(input_ids=ids[row : row + 1], use_cache=False)
    return time.perf_counter() - started


def _cell_key(row: dict):
    """(pruner, target label, allocation) of an allocation row, or of a baselines.py row (uniform)."""
    if "allocation" in row:
        return row["method"], row["target"], row["allocation"]
    pattern = row.get("pattern")
    if row.get("method") == "dense" or pattern in (None, "-"):
        return None
    if ":" in str(pattern):  # a uniform N:M plan is the mixed N:M plan with every layer at the average
        n, m = str(pattern).split(":")
        return row["method"], f"{n}:{m} avg", "uniform"
    return row["method"], str(pattern), "uniform"


def _default_settings(row: dict) -> bool:
    """Rows run with the defaults of their day only: another seed, level range, fitness or budget is a different
    experiment. Rows record the flags they were given (``overrides``); older rows are compared field by field."""
    from optimum_msp import MSPConfig

    defaults = MSPConfig(sparsity=0.5, allocation="msp")
    if "overrides" in row:
        # search_cache_mb changes block runs, never the plan (tests/allocation/test_search.py); the default seed
        # given explicitly (a --seeds run) is the default experiment
        return not {name for name, value in row["overrides"].items()
                    if name != "search_cache_mb" and not (name == "seed" and value == defaults.seed)}
    if (row.get("seed") not in (None, defaults.seed) or row.get("max_deviation") not in (None, defaults.max_deviation)
            or row.get("granularity") not in (None, defaults.granularity)):
        return False
    if row.get("allocation") != "msp":
        return True
    # search_cache_mb is not compared: the cache changes block runs, never the plan (tests/allocation/test_search.py)
    return (row.get("fitness") == defaults.fitness
            and row.get("population_size") in (None, defaults.population_size)
            and row.get("generations") in (None, defaults.generations)
            and row.get("fitness_samples") in (None, defaults.fitness_samples))


def matrix(paths) -> str:
    """PPL per (pruner, target) and allocation: "16-window PPL (full-split PPL)".

    Per cell the latest full-split row wins (its 16-window value is read from the same run), else the latest
    16-window row. The last columns compare MSP with uniform, OWL and its own Fisher seed on the same split."""
    cells = {}
    for path in paths:
        for row in read_results(Path(path)):
            key = _cell_key(row)
            if key is None or not _default_settings(row):
                continue
            full = "ppl_16" in row
            previous = cells.get(key)
            if previous is None or full or "ppl_16" not in previous:
                cells[key] = row

    def pair(row):
        if row is None:
            return None, None
        return (row["ppl_16"], row["ppl"]) if "ppl_16" in row else (row["ppl"], None)

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    def compare(msp, other):
        (m16, mfull), (o16, ofull) = msp, other
        if mfull is not None and ofull is not None:
            return ratio(mfull, ofull) + " (full)"
        return ratio(m16, o16)

    lines = ["| pruner | target | " + " | ".join(ALLOCATIONS) + " | msp / uniform | msp / owl | msp / fisher |",
             "|" + "---|" * (len(ALLOCATIONS) + 5)]
    for method, target in sorted({key[:2] for key in cells}):
        values = {a: pair(cells.get((method, target, a))) for a in ALLOCATIONS}
        shown = []
        for a in ALLOCATIONS:
            ppl16, full = values[a]
            shown.append("-" if ppl16 is None else _short(ppl16) + ("" if full is None else f" ({_short(full)})"))
        lines.append(f"| {method} | {target} | " + " | ".join(shown)
                     + "".join(f" | {compare(values['msp'], values[other])}" for other in ("uniform", "owl", "fisher"))
                     + " |")
    return "\n".join(lines)


def _short(value: float) -> str:
    return f"{value:.4g}" if value < 1e4 else f"{value:.3g}"


# ------------------------------------------------------------------------------------------------ seed spread
def seed_list(text: str) -> List[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (the ``--seeds`` flag)."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}.")
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, got {text!r}.")
    return seeds


def _settings_key(row: dict) -> Optional[str]:
    """What must agree, beside the seed, for rows to be seeds of one experiment: the flags given (minus the seed
    and the memory-only search_cache_mb) and the test windows. ``None``: a row whose settings are unknown."""
    if "overrides" in row:
        overrides = {k: v for k, v in row["overrides"].items() if k not in ("seed", "search_cache_mb")}
    elif _default_settings(row):
        overrides = {}
    else:
        return None
    windows = SWEEP_WINDOWS if "ppl_16" in row else row.get("eval_windows")  # a full-split row also has ppl_16
    return json.dumps({"overrides": overrides, "eval_windows": windows}, sort_keys=True)


def seed_cells(rows: Sequence[dict]) -> Dict[tuple, Dict[str, Dict[int, float]]]:
    """``{(method, target, settings): {allocation: {seed: PPL}}}`` of the allocation rows (a later row of the same
    cell, allocation and seed replaces an earlier one). PPL: the 16-window value of a full-split row."""
    cells: Dict[tuple, Dict[str, Dict[int, float]]] = {}
    for row in rows:
        settings = _settings_key(row) if "allocation" in row and "ppl" in row else None
        if settings is None:
            continue
        ppl = row.get("ppl_16", row["ppl"])
        seed = row.get("seed", 0)
        cells.setdefault((row["method"], row["target"], settings), {}).setdefault(row["allocation"], {})[seed] = ppl
    return cells


def spread(values: Sequence[float]) -> float:
    """Seed-to-seed spread: max - min (0 for one value)."""
    return max(values) - min(values)


def msp_verdict(fisher: Dict[int, float], msp: Dict[int, float]) -> str:
    """Whether MSP beats its Fisher seed, on the seeds both ran (lower PPL is better).

    ``gain``: MSP's mean PPL is below Fisher's by more than the larger of their seed-to-seed spreads (max - min);
    ``loss``: above it by more than that; ``within spread``: neither; ``-``: fewer than 2 common seeds (no spread
    to compare with)."""
    common = sorted(set(fisher) & set(msp))
    if len(common) < 2:
        return "-"
    f, m = [fisher[s] for s in common], [msp[s] for s in common]
    margin = max(spread(f), spread(m))
    difference = statistics.mean(f) - statistics.mean(m)
    if difference > margin:
        return "gain"
    if -difference > margin:
        return "loss"
    return "within spread"


def seeds_won(fisher: Dict[int, float], msp: Dict[int, float]) -> str:
    """On how many of the seeds both ran MSP's PPL is below its Fisher seed's, e.g. ``"3/3"`` (``"-"``: none)."""
    common = sorted(set(fisher) & set(msp))
    return f"{sum(msp[s] < fisher[s] for s in common)}/{len(common)}" if common else "-"


def _mean_range(values: Dict[int, float], seeds: int) -> str:
    if not values:
        return "-"
    shown = list(values.values())
    text = _short(statistics.mean(shown))
    if len(shown) > 1:
        text += f" ({_short(min(shown))}–{_short(max(shown))})"
    return text + (f" [{len(shown)} seeds]" if len(shown) != seeds else "")


def seed_table(rows: Sequence[dict]) -> str:
    """Mean PPL over seeds (min–max) per (pruner, target, settings) and allocation, and MSP against its Fisher seed
    on their common seeds. Settings other than the defaults are named in the ``settings`` column."""
    lines = ["| pruner | target | settings | seeds | " + " | ".join(ALLOCATIONS)
             + " | msp / fisher | fisher − msp | spread | msp vs fisher |",
             "|" + "---|" * (len(ALLOCATIONS) + 8)]
    for (method, target, settings), by_allocation in sorted(seed_cells(rows).items()):
        seeds = sorted(set().union(*(set(v) for v in by_allocation.values())))
        fisher, msp = by_allocation.get("fisher", {}), by_allocation.get("msp", {})
        common = sorted(set(fisher) & set(msp))
        compared = ("-", "-", "-")
        if common:
            f = statistics.mean(fisher[s] for s in common)
            m = statistics.mean(msp[s] for s in common)
            margin = max(spread([fisher[s] for s in common]), spread([msp[s] for s in common]))
            compared = (f"{m / f:.2f}x", _short(f - m), _short(margin) if len(common) > 1 else "-")
        named = json.loads(settings)
        label = ", ".join(f"{k}={v}" for k, v in sorted(named["overrides"].items()))
        label = (label + "; " if label else "") + f"{named['eval_windows']} test windows"
        lines.append(f"| {method} | {target} | {label} | {','.join(map(str, seeds))} | "
                     + " | ".join(_mean_range(by_allocation.get(a, {}), len(seeds)) for a in ALLOCATIONS)
                     + " | " + " | ".join(compared) + f" | {msp_verdict(fisher, msp)} |")
    lines.append("")
    lines.append("PPL: mean over seeds (min–max); [n seeds] where a cell has fewer seeds than its row. MSP against "
                 "Fisher on the seeds both ran: spread = the larger of their max − min; gain / loss only where the "
                 "means differ by more than that.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", nargs="*", default=[
        f"{m}:{t}:{a}" for t in ("0.75", "0.7") for m in ("wanda", "sparsegpt") for a in ("uniform", "owl", "msp")
    ])
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    # every MSPConfig flag but the ones a row names (rows run with a non-default flag stay out of the matrix)
    add_config_arguments(parser, exclude=("method", "sparsity", "pattern", "m", "allocation"), config_file=False)
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--matrix", nargs="*", default=None, metavar="JSONL",
                        help="print the PPL matrix from these result files (default: allocation + baselines)")
    parser.add_argument("--seeds", type=seed_list, default=None, metavar="S0,S1,...",
                        help="run every row once per seed (calibration windows, fitness windows and search redrawn "
                             "together); instead of --seed")
    parser.add_argument("--seeds-table", nargs="*", default=None, metavar="JSONL",
                        help="print mean (min-max) over seeds per cell and allocation, with MSP's gain over Fisher "
                             "(default file: --output)")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.matrix is not None:
        print(matrix(args.matrix or [OUT, RESULTS / "baselines.jsonl"]))
        return
    if args.seeds_table is not None:
        print(seed_table([row for path in (args.seeds_table or [args.output]) for row in read_results(Path(path))]))
        return
    if args.table:
        print(markdown_table(read_results(Path(args.output)), COLUMNS))
        return
    if args.single:
        run_row(args.single, args)
        return
    if args.seeds is None:
        run_rows(__file__, args.rows, sys.argv[1:])
        print(markdown_table(read_results(Path(args.output)), COLUMNS))
        return
    if args.seed is not None:
        parser.error("give either --seeds or --seed, not both")
    for row in args.rows:  # a cell's seeds one after another: an interrupted sweep still has whole cells
        for seed in args.seeds:
            run_rows(__file__, [row], sys.argv[1:], drop=("--seeds",), extra=("--seed", str(seed)))
    print(seed_table(read_results(Path(args.output))))


if __name__ == "__main__":
    main()
