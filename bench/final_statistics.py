"""Which input statistics should the final prune use after an MSP search? (issue #20, item 2)

For one cell (pruner x target) and one seed: run the MSP search once, then prune the Fisher seed plan and the
searched plan each way (and the uniform plan sequentially) from the same dense weights, and report for every
model its test PPL (WikiText-2, first 16 windows, or the whole split) and its fitness (mean NLL) on the search's
own windows:

- ``sequential``: the standard sequential prune with the plan itself (each block sees the pruned blocks before it);
- ``search``: the statistics the search's weight bank pruned with (``dense``: the dense model's inputs; ``seed``:
  the inputs a sequential prune with the Fisher seed plan sees), so the model is the one the search scored.

    python bench/final_statistics.py --threads 1 --cell wanda:0.75 --seed 0
    python bench/final_statistics.py --threads 1 --cell sparsegpt:0.75 --seed 0
    python bench/final_statistics.py --threads 1 --cell wanda:3:8 --seed 0      # mixed N:M, 3 of 8 on average
    python bench/final_statistics.py --table
    python bench/final_statistics.py --seeds-table   # mean (min-max) over seeds; MSP against Fisher beyond spread
    python bench/final_statistics.py --compare short long   # one row per cell: Fisher, and MSP under each preset
    python bench/final_statistics.py --compare long long-x2 --paired   # only the seeds both ran, long-x2 / long
    python bench/final_statistics.py --threads 1 --cell sparsegpt:0.75 --seed 0 --preset oracle --fitness-on-test \
        --output bench/results/final_statistics_oracle.jsonl --models uniform:sequential fisher:sequential msp:search
    python bench/final_statistics.py --table --output bench/results/final_statistics_oracle.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS, append_result, git_commit, markdown_table, read_results, set_threads, wikitext_perplexity,
    wikitext_test_windows,
)

from allocation import _final_fitness_nll, parse_target  # noqa: E402  (the NLL bench/allocation.py reports)

OUT = RESULTS / "final_statistics.jsonl"
#: named search settings (``--preset``), each spelled out in full so that its rows stay reproducible when a default
#: moves. "short" is the library's default before the fitness windows became 2 x 512 (rows recorded then as
#: "default" were renamed "short"); "long" is the setting that became the default, kept for the rows that measured
#: it. "screened" (recorded as "quality" before the library had a preset of that name) is the first candidate
#: measured for a longer search: it lost to the default on both seeds (docs/notes/2026-11-29-final-statistics.md).
#: "long-x2" is the library's ``quality`` preset (optimum_msp/presets.py), spelled out.
SHORT = dict(fitness_samples=4, fitness_seqlen=256)
PRESETS = {
    "default": {},
    "short": SHORT,
    # the same 1,024 fitness tokens in 2 windows of 512 instead of 4 of 256 (longer context, the same cost)
    "long": dict(fitness_samples=2, fitness_seqlen=512),
    # twice the fitness tokens at 512 (4 windows; 2x the search CPU): the library's quality preset
    "long-x2": dict(fitness_samples=4, fitness_seqlen=512),
    # the default's windows scored by KL divergence from the dense model's next-token distribution (EvoPress's
    # fitness) instead of NLL: measured for Wanda before (docs/notes/2026-11-24-fitness-kl-vs-ppl.md), not SparseGPT
    "long-kl": dict(fitness_samples=2, fitness_seqlen=512, fitness="kl"),
    # a wider level range (target +- 0.3, the Fisher seed spread over it too): at 75 % the search's plans hold blocks
    # at the +- 0.2 floor (docs/notes/2026-11-30-kl-fitness-and-oracle.md)
    "long-wide": dict(fitness_samples=2, fitness_seqlen=512, max_deviation=0.3),
    # one level per linear layer instead of per block (EvoPress's unit), the default's windows
    "long-layer": dict(fitness_samples=2, fitness_seqlen=512, granularity="layer"),
    # with --fitness-on-test: the fitness on the first 2 test windows themselves (an in-sample oracle, 4x the
    # default's tokens), which bounds what this search can find on windows it is scored on; never a real setting
    "oracle": dict(fitness_samples=2, fitness_seqlen=2048, search_cache_mb=4000),
    "screened": dict(SHORT, fitness_samples=8, generations=12, offspring=16, selection_steps="2:6,4:3"),
    # each generation on its own 4 of 16 held-out windows, the finalists on all 16 (fitness_pool)
    "pool": dict(SHORT, fitness_pool=16),
    # the same tokens per draw and pool in longer windows (the test windows are 2048 tokens long)
    "pool-long": dict(fitness_pool=8, fitness_samples=2, fitness_seqlen=512),
    # SparseGPT: the bank's statistics gathered again with the best plan after generations 4 and 8
    "refresh": dict(SHORT, statistics_refresh=4),
}


def parse_cell(cell: str):
    """``METHOD:SPARSITY`` (unstructured) or ``METHOD:N:M`` (mixed N:M, a per-layer N averaging N of every M)."""
    method, *fields = cell.split(":")
    try:
        return method, parse_target(fields)[0]  # bench/allocation.py's rows name their targets the same way
    except ValueError:
        raise ValueError(f"--cell: {cell!r} is neither METHOD:SPARSITY (e.g. wanda:0.75) nor METHOD:N:M "
                         "(e.g. wanda:3:8)") from None


def cell_context(args):
    """``(config, pruner, data, context)`` for ``args.cell``, ``--seed`` and ``--preset``: what the allocators need,
    built as the library's prune builds it (``context.pruner``: the method's pruner; ``context.runner``: the blocks)."""
    from optimum_msp import MSPConfig, MSPPruner
    from optimum_msp.allocation import AllocationContext
    from optimum_msp.modeling.blocks import select_linears
    from optimum_msp.modeling.sequential import BlockRunner
    from optimum_msp.pruners import build_pruner

    set_threads(args.threads)
    method, target = parse_cell(args.cell)
    config = MSPConfig(**PRESETS[args.preset], **target, method=method, allocation="msp", seed=args.seed).resolved()
    pruner = MSPPruner.from_pretrained(args.model)
    oracle = oracle_fitness_ids(config, pruner.tokenizer) if args.fitness_on_test else None
    data = pruner.calibration(config, held_out_ids=oracle)
    method_pruner = build_pruner(config.method, config.pruner_options())
    runner = BlockRunner(pruner.model, config.block_name)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}", config.targets, config.ignore)
              for i, block in enumerate(runner.blocks)]
    context = AllocationContext(pruner.model, layers, config.budget(), config.allocation_options(), method_pruner,
                                data, runner, config.seed, config.batch_size)
    return config, pruner, data, context


def oracle_fitness_ids(config, tokenizer):
    """The first ``fitness_samples`` WikiText-2 test windows, for ``--fitness-on-test``: the search then scores its
    plans on windows the evaluation reads too (an in-sample oracle, not a protocol), which bounds what it can find."""
    if config.fitness_seqlen != 2048:
        raise ValueError(f"--fitness-on-test needs the evaluation's 2048-token windows; the preset's fitness_seqlen "
                         f"is {config.fitness_seqlen} (use --preset oracle).")
    return wikitext_test_windows(tokenizer, config.fitness_samples)[0]


def bank_statistics(context, kind: str, fisher_targets):
    """The input statistics the search's bank pruned with when it was not refreshed, read back from the statistics
    cache (no forward pass): the dense model's (``kind="dense"``) or those the Fisher seed plan's sequential prune
    gathers (``"seed"``)."""
    from optimum_msp.allocation.statistics import dense_layer_statistics, seeded_layer_statistics

    if kind == "dense":
        return dense_layer_statistics(context, context.pruner.new_statistics)
    return seeded_layer_statistics(context, fisher_targets)


def run_cell(args) -> None:
    from optimum_msp.allocation import ALLOCATORS
    from optimum_msp.allocation.msp import search_statistics
    from optimum_msp.apply import apply_targets, prune_with_statistics
    from optimum_msp.modeling.weights import WeightSnapshot

    config, pruner, data, context = cell_context(args)
    method_pruner, runner, layers = context.pruner, context.runner, context.layers
    # the search only when a model needs it: the Fisher and uniform rows of a seed do not depend on it
    wanted = args.models or ["msp"]
    started = time.perf_counter()
    searched = ALLOCATORS.get("msp")(context) if any(m.startswith("msp") for m in wanted) else None
    search_s = time.perf_counter() - started
    fisher = ALLOCATORS.get("fisher")(context)
    kind = search_statistics(config.search_statistics, method_pruner)
    fitness_ids = data.held_out(config.fitness_pool or config.fitness_samples, config.fitness_seqlen, config.seed + 1)
    modules = context.modules
    base = {"cell": args.cell, "seed": args.seed, "bank_statistics": kind, "overrides": {}, "preset": args.preset,
            "commit": git_commit(), "threads": args.threads}
    if args.fitness_on_test:
        base["fitness_on_test"] = config.fitness_samples
    if searched is not None:
        base.update({"search_cpu_s": round(searched.report["search_cpu_seconds"], 1),
                     "evaluations": searched.report["evaluations"], "screened": searched.report["screened"],
                     "search_s": round(search_s, 1), "best_fitness": searched.search["best_fitness"],
                     "fisher_fitness": searched.search["fisher_fitness"]})
        if searched.search["refreshed_around"]:
            base.update({"refreshes": searched.search["refreshed_around"],
                         "refresh_s": searched.report["refresh_seconds"]})
    uniform = ALLOCATORS.get("uniform")(context)

    def search_prune(plan, stats=None):  # the bank's statistics, read back from the statistics cache: no forward pass
        if stats is None:
            stats = bank_statistics(context, kind, fisher.targets)
        prune_with_statistics(runner, layers, plan, method_pruner, stats)  # as the library's final prune does

    def sequential_prune(plan):
        apply_targets(runner, layers, plan, method_pruner, data.ids, config.batch_size)

    models = [("uniform", uniform.targets, "sequential"), ("fisher", fisher.targets, "sequential")]
    if searched is not None:
        models += [("msp", searched.targets, "sequential"), ("msp", searched.targets, "search")]
    if kind == "dense":  # with seeded statistics the Fisher plan fed by itself is its sequential prune
        models.append(("fisher", fisher.targets, "search"))
    if args.models:
        models = [m for m in models if f"{m[0]}:{m[2]}" in args.models]
    for plan_name, plan, final in models:
        # with seeded statistics the bank's are those a sequential prune with the Fisher plan gathers (tested in
        # tests/allocation/test_statistics.py), so that prune reads them back instead of running the blocks again
        shortcut = kind == "seed" and plan_name == "fisher"
        with WeightSnapshot(modules):
            if final == "search" and plan_name == "msp" and searched.statistics is not None:
                search_prune(plan, searched.statistics)  # the statistics the search handed over (the last refresh's)
            else:
                (search_prune if final == "search" or shortcut else sequential_prune)(plan)
            row = {**base, "plan": plan_name, "final_statistics": final,
                   "final_fitness_nll": _final_fitness_nll(pruner.model, fitness_ids)}
            if plan_name == "msp":  # per unit (block by default): what the search chose
                row["levels"] = [round(level, 4) for level in searched.search["levels"]]
            row.update(wikitext_perplexity(pruner.model, pruner.tokenizer, args.eval_windows or None,
                                           prefix=config.fitness_samples if args.fitness_on_test else None))
        append_result(Path(args.output), row)
        print(row, flush=True)
    if searched is not None and searched.statistics is not None:
        getattr(searched.statistics, "close", lambda: None)()


def split_at_fitness_windows(row: dict) -> dict:
    """For a ``--fitness-on-test`` row, its PPL on the windows the search was scored on (``ppl_fitness_windows``,
    recorded as ``ppl_first_N``) and on the other evaluation windows (``ppl_other_windows``, from the same per-window
    mean NLLs); other rows unchanged."""
    import math

    first = row.get("fitness_on_test")
    if not first or not isinstance(row.get("eval_windows"), int):
        return row
    windows, nll_first = row["eval_windows"], math.log(row[f"ppl_first_{first}"])
    nll_after = (windows * math.log(row["ppl"]) - first * nll_first) / (windows - first)
    return {**row, "ppl_fitness_windows": math.exp(nll_first), "ppl_other_windows": math.exp(nll_after)}


def table(path: Path) -> str:
    rows = [split_at_fitness_windows(row) for row in read_results(path)]
    columns = ["cell", "seed", "preset", "bank_statistics", "plan", "final_statistics", "ppl", "final_fitness_nll",
               "best_fitness", "fisher_fitness", "commit"]
    if any("ppl_fitness_windows" in row for row in rows):  # --fitness-on-test rows: the PPL on and off those windows
        columns[7:7] = ["ppl_fitness_windows", "ppl_other_windows"]
    for row in rows:
        for key in ("ppl", "final_fitness_nll", "best_fitness", "fisher_fitness", "ppl_fitness_windows",
                    "ppl_other_windows"):
            if isinstance(row.get(key), float):
                row[key] = round(row[key], 3)
    return markdown_table(rows, columns)


def _ppl_16(row: dict) -> float:
    """The row's PPL on the first 16 test windows (what the seeds and compare tables show): a whole-split row
    carries it as ``ppl_16``, from the same per-window losses."""
    return row.get("ppl_16", row["ppl"])


def _ratio(fisher: dict, msp: dict, per_seed: bool = False) -> str:
    """MSP's mean PPL over Fisher's on their common seeds, e.g. ``"0.95x"``; with ``per_seed`` (and 2 seeds or more)
    also the range of the per-seed ratios, ``"0.95x (0.93–0.97)"``: a seed's two models share its calibration
    windows, so their ratio moves less than either model does from seed to seed."""
    import statistics

    common = sorted(set(fisher) & set(msp))
    if not common:
        return "-"
    text = f"{statistics.mean(msp[s] for s in common) / statistics.mean(fisher[s] for s in common):.2f}x"
    if per_seed and len(common) > 1:
        ratios = [msp[s] / fisher[s] for s in common]
        text += f" ({min(ratios):.2f}–{max(ratios):.2f})"
    return text


MODELS = (("uniform", "sequential"), ("fisher", "sequential"), ("fisher", "search"), ("msp", "sequential"),
          ("msp", "search"))


def seeds_table(path: Path, presets=None) -> str:
    """Per cell and preset (only ``presets`` if given): mean test PPL over seeds (min–max) of each model, and the
    delivered MSP model (search statistics) against the delivered Fisher model (sequential), a gain only beyond the
    seed-to-seed spread (``bench/allocation.py``'s rule)."""
    import statistics

    from allocation import _mean_range, msp_verdict, seeds_won

    cells: dict = {}
    search_cpu: dict = {}  # (cell, preset) -> {seed: search CPU s} of the searches behind the MSP rows
    for row in read_results(path):
        key = (row["cell"], row.get("preset") or "default")
        cells.setdefault(key, {}).setdefault((row["plan"], row["final_statistics"]), {})[row["seed"]] = _ppl_16(row)
        if row["plan"] == "msp" and row.get("search_cpu_s"):
            search_cpu.setdefault(key, {})[row["seed"]] = row["search_cpu_s"]
    header = [f"{plan} ({final})" for plan, final in MODELS]
    lines = ["| cell | preset | seeds | " + " | ".join(header)
             + " | MSP / Fisher | verdict | MSP wins | search CPU s |",
             "|" + "---|" * (len(MODELS) + 7)]
    for (cell, preset), models in sorted(cells.items()):
        if presets and preset not in presets:
            continue
        seeds = sorted(set().union(*(set(v) for v in models.values())))
        # the Fisher rows do not depend on the search settings: a preset without its own takes another's
        fisher = models.get(("fisher", "sequential")) or next(
            (rows[("fisher", "sequential")] for (other, _), rows in sorted(cells.items())
             if other == cell and ("fisher", "sequential") in rows), {})
        msp = models.get(("msp", "search"), {})
        ratio = _ratio(fisher, msp)
        lines.append(f"| {cell} | {preset} | {','.join(map(str, seeds))} | "
                     + " | ".join(_mean_range(models.get(m, {}), len(seeds)) for m in MODELS)
                     + f" | {ratio} | {msp_verdict(fisher, msp)} | {seeds_won(fisher, msp)} | "
                     + (f"{statistics.mean(search_cpu[(cell, preset)].values()):.0f}" if (cell, preset) in search_cpu
                        else "-") + " |")
    return "\n".join(lines)


def compare_table(path: Path, presets, paired: bool = False) -> str:
    """One row per cell: the delivered Fisher model and, per preset in ``presets``, the delivered MSP model (mean
    test PPL over seeds, min–max), its ratio to Fisher on their common seeds (the ratio of the means, and the range
    of the per-seed ratios), the verdict (a gain only beyond the seed-to-seed spread, ``bench/allocation.py``'s
    rule), on how many seeds it won, and its mean search CPU.

    ``paired``: only the seeds every preset ran (cells with none are left out), and a last column per further
    preset, its MSP model against the first preset's, seed by seed: the same calibration and fitness windows, so
    the comparison of two search settings that the seed-to-seed spread does not blur."""
    import statistics

    from allocation import _mean_range, msp_verdict, seeds_won

    fisher: dict = {}  # cell -> {seed: PPL}; the Fisher rows do not depend on the search settings
    msp: dict = {}  # (cell, preset) -> {seed: PPL}
    cpu: dict = {}  # (cell, preset) -> {seed: search CPU s}
    for row in read_results(path):
        preset = row.get("preset") or "default"
        if (row["plan"], row["final_statistics"]) == ("fisher", "sequential"):
            fisher.setdefault(row["cell"], {})[row["seed"]] = _ppl_16(row)
        elif (row["plan"], row["final_statistics"]) == ("msp", "search") and preset in presets:
            msp.setdefault((row["cell"], preset), {})[row["seed"]] = _ppl_16(row)
            if row.get("search_cpu_s"):
                cpu.setdefault((row["cell"], preset), {})[row["seed"]] = row["search_cpu_s"]
    per_preset = ["MSP, {0}", "{0} / Fisher", "{0}: verdict", "{0}: wins", "{0}: search CPU s"]
    against_first = [f"{p} / {presets[0]}" for p in presets[1:]] if paired else []
    lines = ["| cell | seeds | Fisher | " + " | ".join(c.format(p) for p in presets for c in per_preset)
             + "".join(f" | {c}" for c in against_first) + " |",
             "|" + "---|" * (3 + len(per_preset) * len(presets) + len(against_first))]
    for cell in sorted({cell for cell, _ in msp}):
        # paired: the seeds every preset ran, and nothing else
        keep = set.intersection(*(set(msp.get((cell, p), {})) for p in presets)) if paired else None
        if keep == set():
            continue

        def only(rows: dict) -> dict:
            return {s: v for s, v in rows.items() if keep is None or s in keep}

        f = only(fisher.get(cell, {}))
        searched = {p: only(msp.get((cell, p), {})) for p in presets}
        seeds = sorted(set(f).union(*searched.values()))
        cells = [cell, ",".join(map(str, seeds)), _mean_range(f, len(seeds))]
        for preset in presets:
            spent = only(cpu.get((cell, preset), {}))
            cells += [_mean_range(searched[preset], len(seeds)), _ratio(f, searched[preset], per_seed=True),
                      msp_verdict(f, searched[preset]), seeds_won(f, searched[preset]),
                      f"{statistics.mean(spent.values()):.0f}" if spent else "-"]
        cells += [_ratio(searched[presets[0]], searched[p], per_seed=True) for p in presets[1:]] if paired else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cell", default="wanda:0.75",
                        help="METHOD:SPARSITY (unstructured) or METHOD:N:M (mixed N:M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=None, metavar="PLAN:FINAL",
                        help="only these models, e.g. fisher:sequential msp:search (default: all)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named search settings")
    parser.add_argument("--eval-windows", type=int, default=16, help="first test windows; 0: the whole split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fitness-on-test", action="store_true",
                        help="score the search on the first fitness_samples test windows (an in-sample oracle; "
                             "--preset oracle; rows record ppl_first_N, the PPL on those windows)")
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--seeds-table", action="store_true", help="mean (min-max) over seeds per cell and model")
    parser.add_argument("--presets", nargs="*", default=None, help="--seeds-table: only these presets (default: all)")
    parser.add_argument("--paired", action="store_true",
                        help="--compare: only the seeds every preset ran, and each preset against the first")
    parser.add_argument("--compare", nargs="+", default=None, metavar="PRESET",
                        help="one row per cell: the Fisher model and the MSP model of each of these presets")
    args = parser.parse_args()
    if args.compare:
        print(compare_table(Path(args.output), args.compare, paired=args.paired))
        return
    if args.table or args.seeds_table:
        print(seeds_table(Path(args.output), args.presets) if args.seeds_table else table(Path(args.output)))
        return
    run_cell(args)


if __name__ == "__main__":
    main()
