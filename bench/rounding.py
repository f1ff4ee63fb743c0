"""How much rounding alone moves a sequential SparseGPT prune.

Prunes SmolLM2-135M several times with the same calibration windows, changing only ``batch_size`` (which changes
the order in which the Hessian sums are accumulated, nothing else), and prints the test perplexity and a weight
checksum per run. Run it against another commit to compare two implementations of the same algorithm:

    python bench/rounding.py --rows sparsegpt:0.75 sparsegpt:2:4 --batch-sizes 1 2 4
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python bench/rounding.py --rows sparsegpt:0.75

Defaults are small (4 calibration windows, 2 test windows) so a run takes a minute or two per prune.
"""

from __future__ import annotations

import argparse

from common import set_threads


def run(row: str, batch_size: int, args) -> dict:
    import optimum_msp
    from optimum_msp import MSPConfig, MSPPruner
    from optimum_msp.data import calibration_windows
    from optimum_msp.evaluation import perplexity

    method, _, target = row.partition(":")
    shape = {"pattern": target} if ":" in target else {"sparsity": float(target)}
    pruner = MSPPruner.from_pretrained(args.model)
    calibration = calibration_windows(pruner.tokenizer, "wikitext2", args.calibration_samples, 2048, seed=0)
    pruner.prune(MSPConfig(method=method, batch_size=batch_size, **shape), calibration=calibration)
    last = list(pruner.plan.layers)[-1]
    weight = pruner.model.get_submodule(last.rsplit(".weight", 1)[0]).weight
    return {"row": row, "batch_size": batch_size, "code": optimum_msp.__file__,
            "ppl": perplexity(pruner.model, pruner.tokenizer, seqlen=2048, max_windows=args.eval_windows),
            "checksum": float(weight.double().abs().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", nargs="+", default=["sparsegpt:0.75"], help="method:sparsity or method:N:M")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    print("| row | batch_size | PPL | |W| of the last pruned layer | code |\n|---|---|---|---|---|")
    for row in args.rows:
        for batch_size in args.batch_sizes:
            result = run(row, batch_size, args)
            print(f"| {row} | {batch_size} | {result['ppl']:.4g} | {result['checksum']:.6g} | {result['code']} |",
                  flush=True)


if __name__ == "__main__":
    main()
