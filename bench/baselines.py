"""Uniform-allocation baselines on the bundled SmolLM2-135M (issue: foundation).

Protocol (shared/DESIGN.md): WikiText-2 raw test, seqlen 2048; calibration 32 random 2048-token windows
of WikiText-2 raw validation, seed 0. Sweeps report PPL on the first 16 test windows; rows given with
--full use the whole test split (148 windows). Each row runs in its own process (its own peak RSS) and
is appended to bench/results/baselines.jsonl; the table is printed from that file.

    python bench/baselines.py --threads 1                      # every row, 16-window PPL
    python bench/baselines.py --threads 1 --rows wanda:0.5 --full   # one row on the full split
    python bench/baselines.py --table                           # print the table of what has run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS, Timer, append_result, markdown_table, peak_rss_mb, read_results, run_rows, set_threads,
    timed_block_forward, wikitext_perplexity,
)

PATTERNS = ["0.5", "0.6", "0.7", "2:4", "4:8"]
METHODS = ["wanda", "sparsegpt", "magnitude"]
DEFAULT_ROWS = ["dense"] + [f"{m}:{p}" for p in ("0.5", "2:4") for m in METHODS] + [
    f"{m}:{p}" for p in ("0.7", "0.6", "4:8") for m in METHODS
]
OUT = RESULTS / "baselines.jsonl"
COLUMNS = ["method", "pattern", "eval_windows", "ppl", "ppl_16", "achieved_sparsity", "prune_s", "prune_cpu_s",
           "block_forward_cpu_s", "prune/forward (cpu)", "prune/forward", "peak_rss_mb", "threads"]


def run_row(row: str, args) -> None:
    from optimum_msp import MSPConfig, MSPPruner
    from optimum_msp.data import calibration_windows

    set_threads(args.threads)
    pruner = MSPPruner.from_pretrained(args.model)
    windows = None if args.full else args.eval_windows
    result = {"row": row, "model": args.model, "threads": args.threads, "calibration_samples": args.calibration_samples}
    if row != "dense":
        method, pattern = row.split(":", 1)
        config = MSPConfig(method=method, **({"pattern": pattern} if ":" in pattern else {"sparsity": float(pattern)}))
        calibration = calibration_windows(pruner.tokenizer, "wikitext2", args.calibration_samples, 2048, seed=0)
        if method != "magnitude" and not args.skip_forward:
            forward = timed_block_forward(pruner.model, calibration)
            result.update(block_forward_s=forward.wall, block_forward_cpu_s=forward.cpu)
        with Timer() as prune:
            pruner.prune(config, calibration=calibration if method != "magnitude" else None)
        result.update(prune_s=prune.wall, prune_cpu_s=prune.cpu)
        if "block_forward_s" in result:
            result["prune/forward"] = result["prune_s"] / result["block_forward_s"]
            result["prune/forward (cpu)"] = result["prune_cpu_s"] / result["block_forward_cpu_s"]
        result.update(method=method, pattern=pattern, achieved_sparsity=pruner.plan.achieved_sparsity)
        if args.save_dir:
            result["saved_to"] = str(Path(args.save_dir) / row.replace(":", "-"))
            pruner.save_pretrained(result["saved_to"])
    else:
        result.update(method="dense", pattern="-", achieved_sparsity=0.0)
    result.update(wikitext_perplexity(pruner.model, pruner.tokenizer, windows))
    result["peak_rss_mb"] = peak_rss_mb()
    append_result(Path(args.output), result)


def print_table(path: Path) -> None:
    rows = read_results(path)
    print(markdown_table(rows, COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, help="dense, or method:sparsity / method:N:M")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=32,
                        help="2048-token calibration windows (the protocol's 32; fewer for quick cost ratios)")
    parser.add_argument("--full", action="store_true", help="evaluate on the whole test split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dir",
                        help="also save each pruned model to <save-dir>/<row> (e.g. for bench/zeroshot.py)")
    parser.add_argument("--skip-forward", action="store_true", help="do not time the reference forward pass")
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--table", action="store_true", help="only print the table of recorded rows")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        return print_table(Path(args.output))
    if args.single:
        return run_row(args.single, args)
    run_rows(__file__, args.rows, sys.argv[1:])
    print_table(Path(args.output))


if __name__ == "__main__":
    main()
