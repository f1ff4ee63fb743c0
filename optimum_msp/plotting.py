"""Figures of a sparsity plan: where the sparsity went (per layer, with the blocks' Fisher sensitivity) and, for
an ``msp`` plan, how the search's best fitness fell generation by generation.

``matplotlib`` is optional (``pip install "optimum-msp[plot]"``); :func:`plot_available` tells whether it can
be imported. :meth:`optimum_msp.MSPPruner.save_pretrained` writes the figure beside the model card when it can.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .plan import SparsityPlan

#: file name of the figure inside a saved model folder (linked from its model card)
PLOT_FILENAME = "sparsity_plan.png"


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _block_of(name: str) -> str:
    """The decoder block a layer belongs to: its name up to the last numeric part (display only: the plan
    itself never depends on names)."""
    match = re.match(r"(.*\.\d+)\.", name)
    return match.group(1) if match else name


def layer_series(plan: SparsityPlan) -> Tuple[List[str], List[str], List[float]]:
    """Per layer, in plan order: its block, its kind within the block (``self_attn.q_proj``) and its sparsity."""
    owners = [_block_of(name) for name in plan.layers]
    kinds = [name[len(block) + 1 :] if name != block else name for name, block in zip(plan.layers, owners)]
    return owners, kinds, [layer.target.sparsity for layer in plan.layers.values()]


def block_positions(owners: List[str], sensitivity: Dict[str, float]) -> Tuple[List[float], List[float]]:
    """x (centre of the block's layers) and value of every block sensitivity; keys are block indices."""
    spans: Dict[str, List[int]] = {}
    for index, block in enumerate(owners):
        spans.setdefault(block, []).append(index)
    ordered = list(spans.values())
    xs, ys = [], []
    for key, value in sensitivity.items():
        if str(key).isdigit() and int(key) < len(ordered):
            span = ordered[int(key)]
            xs.append(sum(span) / len(span))
            ys.append(value)
    return xs, ys


def fitness_label(fitness: Optional[str]) -> str:
    """What the search's fitness values are, with their unit (the ``ppl`` fitness is a mean NLL, not a PPL)."""
    return {"ppl": "best fitness: mean NLL (nats/token)",
            "kl": "best fitness: KL to dense (nats/token)"}.get(fitness, "best fitness")


def plot_plan(plan: SparsityPlan, path: Union[str, os.PathLike]) -> Path:
    """Write the plan's figure (PNG) to ``path`` and return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps working inside notebooks' own backends
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    owners, kinds, sparsities = layer_series(plan)
    history = list(plan.search.get("history", [])) if plan.search else []
    rows = 2 if history else 1
    figure, axes = plt.subplots(rows, 1, figsize=(10, 3.6 * rows), squeeze=False)
    ax = axes[0][0]
    palette: Dict[str, str] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for kind in kinds:
        palette.setdefault(kind, colors[len(palette) % len(colors)])
    for kind, color in palette.items():
        xs = [i for i, k in enumerate(kinds) if k == kind]
        ax.bar(xs, [sparsities[i] for i in xs], color=color, width=1.0, label=kind)
    ax.axhline(plan.target_sparsity, color="black", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("layer (decoder order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"{plan.method} / {plan.allocation}: global sparsity {plan.planned_sparsity:.4f}")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    xs, ys = block_positions(owners, plan.block_sensitivity or {})
    if xs:
        twin = ax.twinx()
        twin.plot(xs, ys, color="black", marker=".", linewidth=1)
        twin.set_yscale("log")
        twin.set_ylabel("block Fisher trace (log)")
    if history:
        curve = axes[1][0]
        curve.plot(range(1, len(history) + 1), history, marker="o")
        for key, label in (("uniform_fitness", "uniform plan"), ("fisher_fitness", "Fisher seed")):
            if plan.search.get(key) is not None:
                curve.axhline(plan.search[key], linestyle=":", linewidth=1, color="gray")
                # the label sits just above its line, not on it
                curve.annotate(label, (0, plan.search[key]), xycoords=("axes fraction", "data"),
                               xytext=(4, 2), textcoords="offset points", fontsize=7, color="gray", va="bottom")
        marks = ("uniform_fitness", "fisher_fitness")
        shown = history + [plan.search[k] for k in marks if plan.search.get(k) is not None]
        low, high = min(shown), max(shown)
        margin = 0.12 * (high - low) if high > low else 0.05 * abs(high) or 0.05
        curve.set_ylim(low - margin, high + margin)  # room for the labels above the highest line
        curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        curve.set_xlabel("generation")
        curve.set_ylabel(fitness_label(plan.search.get("fitness")))
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
