"""``optimum-msp compare``: the plans and recorded results of pruned folders side by side (no weights loaded)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

from .common import add_verb, table

#: two targets closer than this are the same
TOLERANCE = 1e-9


def add_parser(sub) -> None:
    parser = add_verb(
        sub, "compare", "plans and recorded results of pruned folders side by side",
        "Compare folders saved by optimum-msp from their config.json plans, report.json and model cards (no weights "
        "are loaded): the settings and every recorded evaluation side by side, the sparsity of each decoder block, "
        "and the layers whose targets differ, largest difference first.",
        ["optimum-msp compare out/smollm2-wanda-uniform-75 out/smollm2-wanda-msp-75",
         "optimum-msp compare out/a out/b out/c --all"])
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="two or more folders saved by optimum-msp")
    parser.add_argument("--all", action="store_true", help="list every differing layer (default: the 20 largest)")
    parser.set_defaults(func=run)


def _labels(folders: List[Path]) -> List[str]:
    names = [folder.name or str(folder) for folder in folders]
    return names if len(set(names)) == len(names) else [str(folder) for folder in folders]


def run(args: argparse.Namespace) -> int:
    from ..plotting import _block_of
    from ..report import read_plan, recorded_results

    folders = [Path(folder) for folder in args.folders]
    if len(folders) < 2:
        raise ValueError("compare needs at least two folders, e.g. optimum-msp compare out/uniform out/msp.")
    plans = [read_plan(folder) for folder in folders]
    labels = _labels(folders)

    def per_plan(value):
        return [value(plan) for plan in plans]

    def fmt(value):
        return "-" if value is None else f"{value:.4f}"

    rows = [
        ["method", *per_plan(lambda p: p.method)],
        ["allocation", *per_plan(lambda p: p.allocation)],
        ["pattern", *per_plan(lambda p: p.pattern + (f" (M={p.m})" if p.m else ""))],
        ["target sparsity", *per_plan(lambda p: fmt(p.target_sparsity))],
        ["achieved sparsity", *per_plan(lambda p: fmt(p.achieved_sparsity))],
        ["pruned layers", *per_plan(lambda p: len(p.layers))],
        ["calibration", *per_plan(lambda p: "{dataset} {num_samples}x{seqlen} seed {seed}".format_map(
            {key: p.calibration.get(key, "?") for key in ("dataset", "num_samples", "seqlen", "seed")}))],
        ["search best fitness", *per_plan(lambda p: fmt(p.search.get("best_fitness")) if p.search else "-")],
    ]
    results: Dict[tuple, List[str]] = {}
    for index, folder in enumerate(folders):
        for result in recorded_results(folder):
            key = (result["dataset"], result["split"], result["metric"], result["note"])
            results.setdefault(key, ["-"] * len(folders))[index] = f"{result['value']:.4g}"
    for (dataset, split, metric, note), values in results.items():
        rows.append([f"{dataset} {split} {metric}" + (f" ({note})" if note else ""), *values])
    print(table(["", *labels], rows))
    if not results:
        print("\n(no evaluation recorded: `optimum-msp eval FOLDER --tasks wikitext2 --update-card` adds some)")

    # per decoder block: parameter-weighted sparsity of each plan
    block_rows: Dict[str, List[str]] = {}
    for index, plan in enumerate(plans):
        groups: Dict[str, List[str]] = {}
        for name in plan.layers:
            groups.setdefault(_block_of(name), []).append(name)
        for block, names in groups.items():
            numel = sum(plan.layers[n].numel for n in names)
            sparsity = sum(plan.layers[n].numel * plan.layers[n].target.sparsity for n in names) / numel
            block_rows.setdefault(block, ["-"] * len(plans))[index] = f"{sparsity:.4f}"
    print("\nsparsity per decoder block:\n")
    print(table(["block", *labels], [[block, *values] for block, values in block_rows.items()],
                right=range(1, len(labels) + 1)))

    # per layer: the targets that differ, largest spread first
    names = list(dict.fromkeys(name for plan in plans for name in plan.layers))
    differing = []
    for name in names:
        targets = [plan.layers[name].target if name in plan.layers else None for plan in plans]
        values = [t.sparsity for t in targets if t is not None]
        spread = max(values) - min(values)
        if None in targets or spread > TOLERANCE:
            differing.append((spread if None not in targets else float("inf"), name, targets))
    if not differing:
        print(f"\nthe plans give all {len(names)} layers the same targets")
        return 0
    differing.sort(key=lambda item: -item[0])
    shown = differing if args.all else differing[:20]
    print(f"\n{len(differing)} of {len(names)} layers differ"
          + ("" if len(shown) == len(differing) else f"; the {len(shown)} largest differences (--all for every one)")
          + ":\n")
    rows = [[name, *("absent" if t is None else (f"{t.n}:{t.m}" if t.is_nm else f"{t.sparsity:.4f}")
                     for t in targets), "-" if spread == float("inf") else f"{spread:.4f}"]
            for spread, name, targets in shown]
    print(table(["layer", *labels, "max - min"], rows, right=range(1, len(labels) + 2)))
    return 0
