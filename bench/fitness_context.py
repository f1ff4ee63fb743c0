"""Does the search's fitness (short held-out windows) judge how a plan does at long context? (issue #20)

For one cell and seed: run the MSP search, build the Fisher model and the delivered MSP model from the statistics
the search scored them with (as ``bench/final_statistics.py``'s ``search`` rows), and report each model's test PPL
on the same first 32,768 WikiText-2 test tokens cut into windows of 256, 512 and 2048 tokens. If the MSP model wins
at 256 and loses at 2048, the fitness windows are too short; if it loses at every length, they are too few.

    python bench/fitness_context.py --threads 1 --cell sparsegpt:2:8 --seed 0
    python bench/fitness_context.py --table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, append_result, git_commit, markdown_table, read_results  # noqa: E402
from final_statistics import PRESETS, bank_statistics, cell_context  # noqa: E402

OUT = RESULTS / "fitness_context.jsonl"
TOKENS = 16 * 2048  # the benchmark's first 16 test windows
LENGTHS = (256, 512, 2048)


def run_cell(args) -> None:
    from optimum_msp.allocation import ALLOCATORS
    from optimum_msp.apply import prune_with_statistics
    from optimum_msp.evaluation.perplexity import perplexity
    from optimum_msp.modeling.weights import WeightSnapshot

    _config, pruner, _data, context = cell_context(args)
    method_pruner, runner, layers = context.pruner, context.runner, context.layers
    searched = ALLOCATORS.get("msp")(context)
    fisher = ALLOCATORS.get("fisher")(context)
    fisher_stats = bank_statistics(context, searched.search["statistics"], fisher.targets)
    for name, plan, stats in (("fisher", fisher.targets, fisher_stats), ("msp", searched.targets, searched.statistics)):
        with WeightSnapshot(context.modules):
            prune_with_statistics(runner, layers, plan, method_pruner, stats)
            row = {"cell": args.cell, "seed": args.seed, "preset": args.preset, "plan": name, "commit": git_commit(),
                   "threads": args.threads}
            for seqlen in LENGTHS:
                row[f"ppl_{seqlen}"] = perplexity(pruner.model, pruner.tokenizer, seqlen=seqlen,
                                                  max_windows=TOKENS // seqlen)
            if name == "msp":
                row["levels"] = [round(level, 4) for level in searched.search["levels"]]
        append_result(Path(args.output), row)
        print(row, flush=True)
    getattr(searched.statistics, "close", lambda: None)()


def table(path: Path) -> str:
    rows = read_results(path)
    for row in rows:
        for seqlen in LENGTHS:
            row[f"ppl_{seqlen}"] = round(row[f"ppl_{seqlen}"], 1)
    return markdown_table(rows, ["cell", "seed", "preset", "plan"] + [f"ppl_{s}" for s in LENGTHS] + ["commit"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cell", default="sparsegpt:2:8", help="METHOD:SPARSITY or METHOD:N:M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="named search settings of bench/final_statistics.py")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.output)))
    else:
        run_cell(args)


if __name__ == "__main__":
    main()
