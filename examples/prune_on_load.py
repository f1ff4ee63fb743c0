"""Prune a model while loading it: ``from_pretrained(..., quantization_config=MSPConfig(...))``.

``import optimum_msp`` registers the "msp" method with transformers; the weights are loaded, then pruned by
``MSPPruner`` with calibration windows drawn from the dataset named in the config (the tokenizer comes from the
same folder). The result is a plain dense model whose config carries the sparsity plan.

    python examples/prune_on_load.py                                   # SmolLM2-135M, Wanda 50 %
    python examples/prune_on_load.py --method sparsegpt --pattern 2:4 --output out/smollm2-2of4
    python examples/prune_on_load.py --num-calibration-samples 4 --seqlen 256 --eval-windows 2   # a quick run
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_msp import SparsityPlan
from optimum_msp.commands.arguments import add_config_arguments, config_from_args
from optimum_msp.evaluation import perplexity
from optimum_msp.modeling import resolve_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="Hub id, local folder, or the bundled alias")
    parser.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows for perplexity (0: skip)")
    parser.add_argument("--output", help="save the pruned model (and tokenizer) here")
    parser.add_argument("--threads", type=int, default=None)
    add_config_arguments(parser)  # every MSPConfig field; --seqlen is also the evaluation window
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model)
    # this example's own defaults: fewer, shorter calibration windows than MSPConfig's
    config = config_from_args(args, defaults=dict(num_calibration_samples=16, seqlen=1024))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    print(f"loaded and pruned {args.model} in {time.perf_counter() - started:.1f}s")

    plan = SparsityPlan.from_config(model.config)
    report = plan.verify(model)
    print(f"{len(plan.layers)} layers pruned with {plan.method}/{plan.allocation} ({config.pattern}): "
          f"global sparsity {report.global_sparsity:.4f}, N:M compliant: {report.nm_compliant}")

    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.eval_windows:
        ppl = perplexity(model, tokenizer, seqlen=config.seqlen, max_windows=args.eval_windows)
        print(f"WikiText-2 test perplexity (first {args.eval_windows} windows of {config.seqlen}): {ppl:.2f}")
    if args.output:
        model.save_pretrained(args.output)  # config.json: sparsity_plan + the marker that verifies on reload
        tokenizer.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
