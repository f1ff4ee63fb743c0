"""Figures of a sparsity plan: where the sparsity went (per layer, beside what uniform and OWL give the same
layers), the blocks' Fisher sensitivity and, for an ``msp`` plan, how the search's fitness fell generation by
generation; and the figure of a ``sensitivity`` run (Fisher traces per layer and per block).

``matplotlib`` is optional (``pip install "optimum-msp[plot]"``); :func:`plot_available` tells whether it can
be imported. :meth:`optimum_msp.MSPPruner.save_pretrained` writes the figure beside the model card when it can.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

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


def fitness_label(fitness: Optional[str]) -> str:
    """What the search's fitness values are, with their unit (the ``ppl`` fitness is a mean NLL, not a PPL)."""
    return {"ppl": "best fitness: mean NLL (nats/token)",
            "kl": "best fitness: KL to dense (nats/token)"}.get(fitness, "best fitness")


def comparison_series(plan: SparsityPlan, comparison: Optional[Mapping[str, Mapping[str, float]]]
                      ) -> Dict[str, List[float]]:
    """Per other allocation (``uniform``, ``owl``, ...), its sparsity of every layer of ``plan``, in plan order.

    An allocation missing a layer is left out whole (a comparison recorded for other layers says nothing here).
    Without a recorded ``uniform`` the plan's target stands in for it: a uniform plan gives every layer the target.
    """
    series: Dict[str, List[float]] = {}
    for name, sparsities in (comparison or {}).items():
        if all(layer in sparsities for layer in plan.layers):
            series[name] = [float(sparsities[layer]) for layer in plan.layers]
    if "uniform" not in series and plan.allocation != "uniform":
        series = {"uniform": [plan.target_sparsity] * len(plan.layers), **series}
    series.pop(plan.allocation, None)  # the plan itself is the bars
    return series


#: how allocations are named in legends
_NAMES = {"uniform": "uniform", "owl": "OWL", "fisher": "Fisher", "msp": "MSP"}
#: how the other allocations are drawn over the plan's (coloured) bars: in black, told apart by the line
_COMPARISON_STYLES = {"uniform": dict(linestyle="--", linewidth=1.2), "owl": dict(linestyle="-", linewidth=1.8),
                      "fisher": dict(linestyle=":", linewidth=1.8)}


def plot_plan(plan: SparsityPlan, path: Union[str, os.PathLike],
              comparison: Optional[Mapping[str, Mapping[str, float]]] = None) -> Path:
    """Write the plan's figure (PNG) to ``path`` and return it.

    Panels: the per-layer sparsity (bars, one colour per kind of layer) with the per-layer sparsity other
    allocations give the same model (``comparison``: allocation -> layer -> sparsity; a recorded ``uniform`` or
    else the target, ``owl`` when the run recorded it); the decoder blocks' Fisher trace when the plan has one;
    the search's best (and, when recorded, mean) fitness per generation for an ``msp`` plan.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; keeps working inside notebooks' own backends
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    owners, kinds, sparsities = layer_series(plan)
    history = list(plan.search.get("history", [])) if plan.search else []
    blocks = sorted((int(k), float(v)) for k, v in (plan.block_sensitivity or {}).items() if str(k).isdigit())
    panels = ["plan"] + (["blocks"] if blocks else []) + (["search"] if history else [])
    heights = {"plan": 4.2, "blocks": 2.6, "search": 3.0}
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights[p] for p in panels)), squeeze=False,
                                gridspec_kw={"height_ratios": [heights[p] for p in panels]})
    axis = dict(zip(panels, (row[0] for row in axes)))
    ax = axis["plan"]
    palette: Dict[str, str] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for kind in kinds:
        palette.setdefault(kind, colors[len(palette) % len(colors)])
    for kind, color in palette.items():
        xs = [i for i, k in enumerate(kinds) if k == kind]
        ax.bar(xs, [sparsities[i] for i in xs], color=color, width=1.0, label=f"{plan.allocation}: {kind}")
    for name, values in comparison_series(plan, comparison).items():
        style = _COMPARISON_STYLES.get(name, dict(linestyle="-.", linewidth=1.2))
        # one level per layer, spanning its bar exactly, so that it reads against the bars layer by layer
        ax.stairs(values, [i - 0.5 for i in range(len(values) + 1)], baseline=None, color="black",
                  label=_NAMES.get(name, name), **style)
    ax.set_xlim(-0.5, len(sparsities) - 0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer (decoder order)")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_title(f"{plan.method} / {plan.allocation}: per-layer sparsity (global {plan.planned_sparsity:.4f}, "
                 f"target {plan.target_sparsity:.4f})")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    if blocks:
        ax_blocks = axis["blocks"]
        ax_blocks.bar([b for b, _ in blocks], [v for _, v in blocks], color="tab:gray", width=0.8)
        ax_blocks.set_yscale("log")
        ax_blocks.set_xlim(-0.5, max(b for b, _ in blocks) + 0.5)
        ax_blocks.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax_blocks.set_xlabel("decoder block")
        ax_blocks.set_ylabel("Fisher trace (log)")
        ax_blocks.set_title("sensitivity: empirical Fisher trace of each block (higher keeps more weights)")
    if history:
        curve = axis["search"]
        generations = range(1, len(history) + 1)
        curve.plot(generations, history, marker="o", label="best of the population")
        means = list(plan.search.get("mean_history") or [])
        shown = list(history)
        if len(means) == len(history):
            curve.plot(generations, means, marker=".", linestyle="--", label="mean of the population")
            shown += means
        for key, label in (("uniform_fitness", "uniform plan"), ("fisher_fitness", "Fisher seed")):
            if plan.search.get(key) is not None:
                curve.axhline(plan.search[key], linestyle=":", linewidth=1, color="gray")
                # the label sits just above its line, not on it
                curve.annotate(label, (0, plan.search[key]), xycoords=("axes fraction", "data"),
                               xytext=(4, 2), textcoords="offset points", fontsize=7, color="gray", va="bottom")
                shown.append(plan.search[key])
        low, high = min(shown), max(shown)
        margin = 0.12 * (high - low) if high > low else 0.05 * abs(high) or 0.05
        curve.set_ylim(low - margin, high + margin)  # room for the labels above the highest line
        curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        curve.set_xlabel("generation")
        curve.set_ylabel(fitness_label(plan.search.get("fitness")).replace("best fitness", "fitness"))
        curve.set_title("MSP search: fitness per generation (lower is better)")
        curve.legend(fontsize=7, loc="upper right", frameon=False)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sensitivity(layers: Mapping[str, float], blocks: Mapping[str, float], path: Union[str, os.PathLike],
                     title: str = "") -> Path:
    """Fisher traces per layer (bars by kind of layer, log scale) and per decoder block, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(layers)
    owners = [_block_of(name) for name in names]
    kinds = [name[len(block) + 1 :] if name != block else name for name, block in zip(names, owners)]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.6), gridspec_kw={"height_ratios": [4, 2.6]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    palette: Dict[str, str] = {}
    for kind in kinds:
        palette.setdefault(kind, colors[len(palette) % len(colors)])
    for kind, color in palette.items():
        xs = [i for i, k in enumerate(kinds) if k == kind]
        top.bar(xs, [max(layers[names[i]], 1e-30) for i in xs], color=color, width=1.0, label=kind)
    top.set_yscale("log")
    top.set_xlim(-0.5, len(names) - 0.5)
    top.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    top.set_xlabel("layer (decoder order)")
    top.set_ylabel("Fisher trace (log)")
    top.set_title(title or "empirical Fisher trace per layer")
    top.legend(fontsize=7, ncol=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ordered = sorted((int(k), float(v)) for k, v in blocks.items())
    bottom.bar([b for b, _ in ordered], [max(v, 1e-30) for _, v in ordered], color="tab:gray", width=0.8)
    bottom.set_yscale("log")
    if ordered:
        bottom.set_xlim(-0.5, ordered[-1][0] + 0.5)
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.set_xlabel("decoder block")
    bottom.set_ylabel("Fisher trace (log)")
    bottom.set_title("per decoder block (sum of its layers)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
