"""``optimum-msp inspect``: a pruned folder's plan as a per-layer table, verified against its weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_device_arguments, add_verb, one_line, table

#: exit status when the weights do not match the plan (user errors, such as a folder without a plan, exit 2)
MISMATCH = 1


def add_parser(sub) -> None:
    parser = add_verb(
        sub, "inspect", "a pruned folder's plan per layer, verified against its weights",
        "Print the sparsity plan of a folder saved by optimum-msp, one row per pruned layer (target, N:M, achieved "
        "as recorded, measured in the weights, Fisher sensitivity), after loading the weights and checking every "
        "layer against its plan. Exit status 0 when they agree; 1, with the reason on one line, when they do not "
        "(a layer with too few zeros, a broken N:M group, weights missing or unreadable).",
        ["optimum-msp inspect out/smollm2-wanda-msp-75",
         "optimum-msp inspect out/big-model --device-map '{\"model.layers.20\": \"disk\"}' --offload-folder off"])
    parser.add_argument("folder", help="a folder saved by optimum-msp (dense or compact)")
    add_device_arguments(parser, compute_device=False)
    parser.set_defaults(func=run)


def _fail(folder: Path, reason: object) -> int:
    print(f"optimum-msp inspect: {folder} does NOT match its plan: {one_line(reason)}", file=sys.stderr)
    return MISMATCH


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from ..checkpoint.marker import verify_pruned
    from ..modeling.loading import parse_dtype
    from ..plan import PlanError
    from ..report import read_plan
    from .common import loading_kwargs

    folder = Path(args.folder)
    plan = read_plan(folder)  # no folder, no config, no plan, a malformed plan: user errors (exit 2)
    kwargs = loading_kwargs(args)
    kwargs.pop("device", None)
    kwargs["dtype"] = parse_dtype(kwargs["dtype"])
    try:
        # with optimum_msp imported a marked checkpoint is decoded and verified while it loads
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    except PlanError as error:
        return _fail(folder, error)
    except Exception as error:  # noqa: BLE001 - a damaged weight file shows up as whatever its reader raises
        return _fail(folder, f"its weights cannot be loaded ({type(error).__name__}: {error})")
    missing = [key for key in (info.get("missing_keys") or []) if key.endswith(".weight") or key.endswith(".bias")]
    if missing:
        return _fail(folder, f"{len(missing)} tensor(s) are missing from its weight files, e.g. {missing[0]!r}")
    if info.get("mismatched_keys"):
        return _fail(folder, f"tensor(s) of the wrong shape: {info['mismatched_keys'][0]}")
    try:
        measured = verify_pruned(model)
    except PlanError as error:
        return _fail(folder, error)
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}  # decoder order
    rows = []
    for name, layer in sorted(plan.layers.items(), key=lambda item: order.get(item[0], len(order))):
        target = layer.target
        rows.append((name, f"{target.sparsity:.4f}", f"{target.n}:{target.m}" if target.is_nm else "-",
                     "-" if layer.achieved is None else f"{layer.achieved:.4f}",
                     f"{measured.layers[name].sparsity:.4f}",
                     "-" if layer.sensitivity is None else f"{layer.sensitivity:.4g}"))
    print(table(["layer", "target", "N:M", "achieved", "measured", "sensitivity"], rows, right=[1, 3, 4, 5]))
    achieved = plan.achieved_sparsity
    print(f"\nOK: {len(plan.layers)} layers match the plan ({plan.method} / {plan.allocation}, {plan.pattern}): "
          f"measured global sparsity {measured.global_sparsity:.4f}, target {plan.target_sparsity:.4f}"
          + ("" if achieved is None else f", recorded {achieved:.4f}"))
    return 0
