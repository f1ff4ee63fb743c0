"""``optimum-msp sensitivity``: the empirical Fisher trace of every targeted layer and decoder block, without pruning.

The same traces the ``fisher`` and ``msp`` allocations start from (:func:`optimum_msp.allocation.fisher
.fisher_sensitivity`, same calibration windows and cache), written as ``sensitivity.json`` with a figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict

from .arguments import add_config_arguments, config_from_args, config_overrides
from .common import add_device_arguments, add_verb, loading_kwargs, set_threads, table

JSON_NAME = "sensitivity.json"
FIGURE_NAME = "sensitivity.png"
#: the config fields that change the traces: the layers, the calibration windows, the Fisher pass
FLAGS = ("calibration_dataset", "calibration_split", "num_calibration_samples", "seqlen", "bos", "seed", "targets",
         "ignore", "block_name", "batch_size", "fisher_samples", "fisher_seqlen")


def add_parser(sub) -> None:
    from ..configuration import config_fields

    parser = add_verb(
        sub, "sensitivity", "Fisher traces per layer and per block (what MSP allocates by), without pruning",
        "Measure how sensitive every targeted layer is: the trace of the empirical Fisher information (per-sequence "
        "squared gradients of the LM loss on calibration windows), summed per decoder block. Writes "
        f"{JSON_NAME} and {FIGURE_NAME} to --output. The calibration flags are prune's: the same flags give the "
        "traces a fisher or msp prune starts from (and share its cache).",
        ["optimum-msp sensitivity smollm2-135m --output out/smollm2-sensitivity",
         "optimum-msp sensitivity smollm2-135m -o out/sens --fisher-samples 32 --calibration-dataset c4"])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="Hub id, local folder or alias")
    parser.add_argument("--output", "-o", required=True, help=f"folder to write {JSON_NAME} and {FIGURE_NAME} to "
                                                              "(new or empty)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace --output when it holds an earlier {JSON_NAME} (never other folders)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    add_device_arguments(parser)
    add_config_arguments(parser, exclude=[name for name in config_fields() if name not in FLAGS])
    parser.set_defaults(func=run)


def _is_sensitivity_folder(folder: Path) -> bool:
    return (folder / JSON_NAME).is_file()


def fisher_report(pruner: Any, config: Any) -> Dict[str, Any]:
    """Fisher traces of the layers ``config`` targets in ``pruner.model``, on the calibration windows it names."""
    from ..allocation import AllocationContext
    from ..allocation.fisher import fisher_sensitivity
    from ..checks import check_model
    from ..modeling.blocks import select_linears
    from ..modeling.sequential import BlockRunner

    config = config.resolved()
    check_model(pruner.model)
    runner = BlockRunner(pruner.model, config.block_name, device=pruner.device)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}", config.targets, config.ignore)
              for i, block in enumerate(runner.blocks)]
    if not any(layers):
        raise ValueError(f"--targets {' '.join(config.targets)} / --ignore {' '.join(config.ignore)} select no "
                         "linear layer inside the decoder blocks.")
    data = pruner.calibration(config)
    context = AllocationContext(pruner.model, layers, config.budget(), config.allocation_options(), None, data,
                                runner, config.seed, config.batch_size)
    started = time.perf_counter()
    traces, blocks = fisher_sensitivity(context)
    numels = context.numels
    return {
        "layers": traces, "blocks": blocks, "per_weight": {name: traces[name] / numels[name] for name in traces},
        "numels": numels, "block_prefix": runner.block_prefix, "calibration": data.recipe,
        # what the pass used: the settings cut to the calibration windows there are
        "fisher_samples": min(config.fisher_samples, data.ids.shape[0]),
        "fisher_seqlen": min(config.fisher_seqlen, data.ids.shape[1]),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run(args: argparse.Namespace) -> int:
    from ..configuration import MSPConfig
    from ..plotting import plot_available, plot_sensitivity
    from ..pruner import MSPPruner
    from ..utils.io import atomic_directory, check_output_directory

    config = config_from_args(args, defaults={"allocation": "fisher"})
    if config.allocation != "fisher":  # a --config file of another allocation: the Fisher pass's options all the same
        config = MSPConfig.from_dict({**config.to_dict(), **config_overrides(args), "allocation": "fisher"})
    check_output_directory(args.output, overwrite=args.overwrite, replaceable=_is_sensitivity_folder)
    set_threads(args.threads)
    pruner = MSPPruner.from_pretrained(args.model, **loading_kwargs(args))
    report = {"model": args.model, **fisher_report(pruner, config)}
    with atomic_directory(args.output, overwrite=args.overwrite, replaceable=_is_sensitivity_folder) as staging:
        (staging / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if plot_available():
            plot_sensitivity(report["layers"], report["blocks"], staging / FIGURE_NAME,
                             title=f"{args.model}: empirical Fisher trace per layer "
                                   f"({report['fisher_samples']} windows x {report['fisher_seqlen']} tokens)")
    total = sum(report["blocks"].values())
    rows = [(block, f"{value:.4g}", f"{100 * value / total:.1f}") for block, value in report["blocks"].items()]
    print(table(["block", "Fisher trace", "% of total"], rows, right=[0, 1, 2]))
    figure = "" if plot_available() else f" (no {FIGURE_NAME}: pip install matplotlib)"
    print(f"\n{len(report['layers'])} layers, {len(report['blocks'])} blocks: {Path(args.output) / JSON_NAME}{figure}")
    return 0
