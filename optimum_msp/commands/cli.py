"""``optimum-msp`` command line (also ``optimum-cli msp``): ``prune``, ``eval``, ``sensitivity``, ``inspect``,
``push``, ``compare``, ``estimate`` and ``perplexity``.

Each verb lives in its own module with an ``add_parser(sub)``; this one holds ``prune``, ``estimate`` and
``perplexity`` and the entry point, which turns every error a user can fix into one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from typing import Callable, List, Optional

from transformers.utils import logging as hf_logging


from . import compare, evaluate, inspect, push, sensitivity
from .arguments import add_config_arguments, config_from_args
from .common import PROG, add_device_arguments, add_verb, loading_kwargs, one_line


def _prune(args: argparse.Namespace) -> int:
    import torch

    from .. import distributed
    from ..allocation import ALLOCATORS
    from ..checkpoint.marker import is_pruned_checkpoint
    from ..data import resolve_bos
    from ..evaluation import perplexity
    from ..integrations.model_card import perplexity_result
    from ..pruner import MSPPruner
    from ..report import default_comparisons
    from ..utils.io import check_output_directory

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    compare_with = default_comparisons(config.allocation, config.method) if args.compare_with is None else args.compare_with
    for name in compare_with:  # a typo fails now, not after the prune
        ALLOCATORS.entry(name)
    if args.output:
        # before any work: a refused output folder must not cost a whole prune
        check_output_directory(args.output, overwrite=args.overwrite, replaceable=is_pruned_checkpoint)
    else:
        logging.getLogger("optimum_msp").warning(
            "No --output given: the pruned model is evaluated and then discarded. Pass --output DIR to keep it.")
    pruner = MSPPruner.from_pretrained(args.model, **loading_kwargs(args))
    started = time.perf_counter()
    pruner.prune(config, compare_with=compare_with)
    result = {
        "model": args.model, "config": config.to_dict(), "prune_seconds": round(time.perf_counter() - started, 1),
        "target_sparsity": config.sparsity, "achieved_sparsity": pruner.plan.achieved_sparsity,
    }
    card_results = []
    if args.eval_windows != 0:
        windows = None if args.eval_windows < 0 else args.eval_windows
        # the windows start the way the calibration ones did (config.bos; "never" is the literature protocol)
        result["wikitext2_test_ppl"] = perplexity(pruner.model, pruner.tokenizer, "wikitext2", "test",
                                                  seqlen=config.seqlen, max_windows=windows, bos=config.bos)
        result["eval_windows"] = "all" if windows is None else windows
        result["bos"] = resolve_bos(config.bos, pruner.tokenizer) is not None
        # every measured number goes to the folder's report.json; only a whole-split one into the card's model-index
        pruner.report["evaluation"] = {"wikitext2_test_ppl": result["wikitext2_test_ppl"],
                                       "windows": result["eval_windows"], "seqlen": config.seqlen, "bos": result["bos"]}
        if windows is None:
            card_results.append(perplexity_result(result["wikitext2_test_ppl"], seqlen=config.seqlen,
                                                  bos=result["bos"]))
    if args.output:
        compact = False if args.compact == "none" else args.compact  # "sparse" / "deflate": save_pruned's modes
        pruner.save_pretrained(args.output, compact=compact, results=card_results, overwrite=args.overwrite)
        result["output"] = args.output
    if distributed.is_main_process():  # one result per run, not one per process
        print(json.dumps(result, indent=2))
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from ..estimate import PLACEMENTS, estimate_memory
    from ..modeling import resolve_model_path

    config = config_from_args(args)
    model_config = AutoConfig.from_pretrained(resolve_model_path(args.model)).to_dict()
    estimate = estimate_memory(model_config, config, device=args.device, weights=args.weights, dtype=args.dtype,
                               max_memory=args.max_memory, evaluate=args.eval_windows != 0,
                               save={"none": "dense", "skip": None}.get(args.compact, args.compact))
    print(f"Expected peaks of `optimum-msp prune {args.model}` ({config.method}/{config.allocation}, "
          f"{estimate.dtype}, computed on {estimate.device}; weights: {PLACEMENTS[args.weights]}):\n")
    print(estimate.summary())
    print("\nWhat the largest stages hold:\n")
    print(estimate.components())
    for note in estimate.notes:
        print(f"\nNote: {note}")
    if args.max_memory is not None:
        print(f"\n{'fits' if estimate.fits else 'does NOT fit'} in --max-memory {args.max_memory}")
        return 0 if estimate.fits else 1
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation import perplexity
    from ..modeling import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    loading = loading_kwargs(args)
    device = loading.pop("device")
    model, tokenizer = load_model(args.model, **loading), load_tokenizer(args.model)
    if device is not None and "device_map" not in loading:
        model = model.to(device)  # evaluation runs the whole model: it must fit there (else use --device-map)
    windows = None if args.windows < 0 else args.windows
    logging.getLogger("optimum_msp").info(
        "Perplexity of %s on %s/%s: %s windows of %d tokens (a progress bar shows the time left; --windows N "
        "evaluates the first N only)", args.model, args.dataset, args.split, "all" if windows is None else windows,
        args.seqlen)
    value = perplexity(model, tokenizer, args.dataset, args.split, seqlen=args.seqlen, max_windows=windows,
                       bos=args.bos)
    print(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split, "bos": args.bos,
                      "perplexity": value}))
    return 0


def _usage(parser: argparse.ArgumentParser) -> int:
    """A bare ``optimum-msp`` shows what it can do instead of an argparse error."""
    parser.print_help(sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Mixed Sparsity Pruning for LLMs: prune with a per-layer sparsity plan, evaluate, "
        "inspect, compare and publish the result. `optimum-msp VERB --help` says more about each verb.")
    parser.add_argument("--version", action="version", version=f"optimum-msp {__version__}")
    add_subcommands(parser)
    return parser


def add_subcommands(parser: argparse.ArgumentParser, for_optimum_cli: bool = False) -> None:
    """Every verb; shared by ``optimum-msp`` and ``optimum-cli msp``.

    ``for_optimum_cli``: Optimum's CLI runs ``args.func(args).run()`` and ignores what it returns, so each verb's
    ``func`` becomes a factory of an object whose ``run`` runs the verb as :func:`main` does and exits with its
    status."""
    from ..estimate import PLACEMENTS

    sub = parser.add_subparsers(dest="msp_command", title="verbs",
                                metavar="{prune,eval,sensitivity,inspect,compare,push,estimate,perplexity}")
    parser.set_defaults(func=lambda args: _usage(parser))
    prune = add_verb(
        sub, "prune", "prune a model and save it (plan in config.json, report.md beside)",
        "Prune a model with a pruning method and a sparsity allocation, evaluate it on WikiText-2 test windows, and "
        "save it: weights, config.json carrying the plan, model card, report.json (timings, memory) and report.md "
        "(settings, plan, figure, results).",
        ["optimum-msp prune smollm2-135m --method wanda --sparsity 0.75 --allocation msp -o out/wanda-msp-75",
         "optimum-msp prune smollm2-135m --method sparsegpt --pattern 2:4 -o out/sparsegpt-2of4 --compact deflate",
         "optimum-msp prune --config out/wanda-msp-75 --sparsity 0.8 -o out/wanda-msp-80"])
    prune.add_argument("model", nargs="?", default="smollm2-135m",
                       help="Hub id, local folder or alias (default: smollm2-135m, the bundled SmolLM2-135M-Instruct)")
    prune.add_argument("--output", "-o", default=None,
                       help="folder to save the pruned model to (new or empty; without it the result is discarded)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace --output when it holds a checkpoint saved by optimum-msp (never other files)")
    prune.add_argument("--compact", choices=["none", "sparse", "deflate"], default="none",
                       help="checkpoint format: dense weights (loads anywhere), sparse values + bitmask/N:M indices, "
                            "or those deflated as well (smallest; loading needs optimum_msp)")
    prune.add_argument("--eval-windows", type=int, default=16,
                       help="WikiText-2 test windows to evaluate after pruning (-1: all, 0: skip)")
    prune.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: torch's own choice); pin it for benchmarks")
    prune.add_argument("--compare-with", nargs="*", default=None, metavar="ALLOCATION",
                       help="allocations whose per-layer sparsity for the same layers report.md and its figure show "
                            "beside the plan, e.g. uniform owl (OWL costs one statistics pass over the calibration "
                            "windows unless an MSP-Wanda run just cached it; give none to skip) (default: uniform, "
                            "and owl for --method wanda --allocation msp)")
    add_device_arguments(prune)
    add_config_arguments(prune)
    prune.set_defaults(func=_prune)
    for verb in (evaluate, sensitivity, inspect, compare, push):
        verb.add_parser(sub)
    estimate = add_verb(
        sub, "estimate", "expected peak device memory, host memory and disk of a prune, from the model's config",
        "Expected peak device memory, host memory and disk of every stage of `optimum-msp prune` with the same "
        "flags, from the model's config.json alone (no weights are loaded). Exit status: 0 when every stage fits "
        "--max-memory (or none is given), 1 when a stage does not fit, 2 on bad input. Formulas: docs/scaling.md.",
        ["optimum-msp estimate meta-llama/Llama-2-7b-hf --method sparsegpt --allocation msp --device cuda "
         "--weights disk --max-memory cuda:0=80GiB,cpu=200GiB,disk=1TB"])
    estimate.add_argument("model", nargs="?", default="smollm2-135m", help="Hub id, local folder or alias")
    estimate.add_argument("--device", default="cpu", help="where blocks are computed: cpu, cuda or cuda:N")
    estimate.add_argument("--weights", default="device", choices=list(PLACEMENTS),
                          help="where the weights are held: in memory on --device, in host memory (blocks moved to "
                               "the GPU for their turn), offloaded by accelerate to host memory, or to disk "
                               "(default: device)")
    estimate.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                          help="dtype the weights would be loaded in (default: auto, the checkpoint's own)")
    estimate.add_argument("--max-memory", default=None, metavar="SPEC",
                          help="what the machine offers, like accelerate's max_memory: e.g. "
                               "cuda:0=80GiB,cpu=200GiB,disk=1TB (GiB: 2^30, GB: 10^9); exit 1 when a stage does "
                               "not fit")
    estimate.add_argument("--compact", choices=["none", "sparse", "deflate", "skip"], default="none",
                          help="the save: dense (none), compact (sparse, deflate), or skip (no --output)")
    estimate.add_argument("--eval-windows", type=int, default=16, help="0: the prune skips its evaluation")
    add_config_arguments(estimate)
    estimate.set_defaults(func=_estimate)
    ppl = add_verb(sub, "perplexity", "perplexity of a (pruned) model on one text",
                   "Perplexity of a model on WikiText-2, C4 or a local text file, in non-overlapping windows (see "
                   "`eval` for several tasks at once and for recording the results).",
                   ["optimum-msp perplexity out/wanda-msp-75 --windows 16",
                    "optimum-msp perplexity smollm2-135m --dataset notes.txt --seqlen 512"])
    ppl.add_argument("model", nargs="?", default="smollm2-135m", help="Hub id, local folder or alias")
    ppl.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | a local .txt/.raw/.jsonl file")
    ppl.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ppl.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    ppl.add_argument("--windows", type=int, default=-1,
                     help="first N windows only (default -1: the whole split, 148 windows of WikiText-2 test)")
    ppl.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ppl.add_argument("--bos", default="auto", choices=["auto", "always", "never"],
                     help="start every window with the BOS token: auto (when the tokenizer adds one), always, or "
                          "never (the literature protocol of published LLaMA tables) (default: auto)")
    add_device_arguments(ppl)
    ppl.set_defaults(func=_perplexity)
    if for_optimum_cli:
        for verb in sub.choices.values():
            verb.set_defaults(func=functools.partial(_OptimumService, verb.get_default("func")))


class _OptimumService:
    """What ``optimum-cli`` expects ``args.func(args)`` to return: an object with a ``run()``."""

    def __init__(self, func: Callable[[argparse.Namespace], int], args: argparse.Namespace):
        self.func, self.args = func, args

    def run(self) -> None:
        sys.exit(run_verb(self.func, self.args))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_verb(args.func, args)


def run_verb(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one verb: logging and progress bars on, and every error one line on stderr (exit 2 for the errors a
    user can fix, 1 for the unexpected ones), never a traceback unless OPTIMUM_MSP_TRACEBACK is set."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.enable_progress_bar()
    try:
        return func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for the user, never a traceback
        if not _is_user_error(error) and os.environ.get("OPTIMUM_MSP_TRACEBACK"):
            raise
        hint = "" if _is_user_error(error) else " (an unexpected error: set OPTIMUM_MSP_TRACEBACK=1 to see where)"
        print(f"{PROG}: error: {one_line(error)}{hint}", file=sys.stderr)
        return 2 if _is_user_error(error) else 1


def _is_user_error(error: BaseException) -> bool:
    """Errors that say what to change: bad values and plans (ValueError), files and folders (OSError), missing
    packages (ImportError) and the Hub's answers (HubError)."""
    from ..integrations.hub import HubError

    return isinstance(error, (ValueError, OSError, ImportError, HubError))


if __name__ == "__main__":
    sys.exit(main())
