"""Mixed sparsity with the MSP search, next to the uniform plan it replaces.

SmolLM2-135M is pruned twice with the same pruner, calibration windows and global sparsity: once uniformly,
once with ``allocation="msp"`` (Fisher-trace sensitivity seeding an evolutionary search over per-block
levels). The example prints where the search put the sparsity, its best fitness generation by generation,
and both models' WikiText-2 test perplexity; the MSP model is saved with its plan (and a figure of it when
matplotlib is installed).

    python examples/mixed_sparsity_search.py                       # Wanda, 75 % unstructured, default search
    python examples/mixed_sparsity_search.py --method sparsegpt --pattern mixed-n:m --m 8 --sparsity 0.75 \
        --search-checkpoint out/search.json --output out/smollm2-sparsegpt-msp-2of8
    python examples/mixed_sparsity_search.py --num-calibration-samples 4 --seqlen 256 --population-size 4 \
        --generations 2 --eval-windows 2 --threads 2               # a quick check (a few minutes)

An interrupted search resumes from ``--search-checkpoint`` and ends with the plan it would have found.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from optimum_msp import MSPPruner
from optimum_msp.commands.arguments import add_config_arguments, config_from_args
from optimum_msp.evaluation import perplexity
from optimum_msp.plotting import layer_series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="Hub id, local folder, or the bundled alias")
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 test windows (0: skip)")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform comparison")
    parser.add_argument("--output", help="save the MSP-pruned model (plan, model card, figure) here")
    parser.add_argument("--threads", type=int, default=None)
    add_config_arguments(parser, exclude=("allocation",))  # every MSPConfig field; --seqlen also evaluates
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {}
    for allocation in ("uniform", "msp")[1 if args.no_uniform else 0 :]:
        config = config_from_args(args, defaults=dict(sparsity=0.75, allocation=allocation))
        pruner = MSPPruner.from_pretrained(args.model)
        started = time.perf_counter()
        pruner.prune(config)
        seconds = time.perf_counter() - started
        ppl = None
        if args.eval_windows:
            ppl = perplexity(pruner.model, pruner.tokenizer, seqlen=config.seqlen, max_windows=args.eval_windows)
        results[allocation] = (ppl, pruner.plan.achieved_sparsity, seconds)
    plan = pruner.plan  # the MSP one

    print("\nblock  level   Fisher trace of the block")
    levels = {}  # block -> its level (the search's unit is a whole block by default)
    for block, layer in zip(layer_series(plan)[0], plan.layers.values()):
        levels.setdefault(block, layer.target.describe())
    for index, (block, level) in enumerate(levels.items()):
        trace = plan.block_sensitivity.get(str(index))
        print(f"{index:5d}  {level:>6}  {'-' if trace is None else f'{trace:.3g}'}")
    search = plan.search
    print(f"\nsearch ({search['fitness']} on held-out calibration windows): "
          f"uniform plan {search['uniform_fitness']:.4f}, "
          f"Fisher seed {search['fisher_fitness']:.4f}, best {search['best_fitness']:.4f}")
    print("best per generation: " + ", ".join(f"{value:.4f}" for value in search["history"]))
    cost = pruner.report["allocation"]  # what the run cost is in the run report, not in the plan
    print(f"{cost['evaluations']} plans evaluated in {cost['search_seconds']:.0f}s "
          f"(Fisher {cost['fisher_seconds']:.0f}s, statistics {cost['statistics_seconds']:.0f}s)\n")
    for allocation, (ppl, achieved, seconds) in results.items():
        shown = "-" if ppl is None else f"{ppl:.2f}"
        print(f"{allocation:8s} achieved sparsity {achieved:.4f}  WikiText-2 test PPL ({args.eval_windows} windows) "
              f"{shown}  prune {seconds:.0f}s")
    if args.output:
        pruner.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
