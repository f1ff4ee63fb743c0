"""The headline: uniform vs OWL vs MSP at 70 / 75 / 80 % for Wanda and SparseGPT on the bundled SmolLM2-135M.

Reads the committed results (``bench/results/allocation.jsonl`` and ``baselines.jsonl``, the rows of
``docs/benchmarks.md``; nothing is run), picks each cell as ``bench/allocation.py --matrix`` does (rows with the
defaults of their day, the latest full-split row else the latest 16-window one), prints the README's table and
draws the README's figure. A cell without a row says "not run"; nothing is filled in.

    python bench/headline.py                                  # table + docs/figures/headline_ppl.png
    python bench/headline.py --figure /tmp/headline.png       # elsewhere
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))
from allocation import _cell_key, _default_settings  # noqa: E402  (the matrix's own cell rules)
from common import RESULTS, read_results  # noqa: E402

PRUNERS = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}
TARGETS = ("0.7", "0.75", "0.8")
ALLOCATIONS = {"uniform": "uniform", "owl": "OWL", "msp": "MSP"}
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "headline_ppl.png"

Cell = Tuple[float, Optional[float]]  # (16-window PPL, full-split PPL or None)


def cells(paths) -> Dict[tuple, Cell]:
    """(pruner, target, allocation) -> (16-window PPL, full-split PPL), one row per cell."""
    chosen: Dict[tuple, dict] = {}
    for path in paths:
        for row in read_results(Path(path)):
            key = _cell_key(row)
            if key is None or not _default_settings(row):
                continue
            previous = chosen.get(key)
            if previous is None or "ppl_16" in row or "ppl_16" not in previous:
                chosen[key] = row
    return {key: (row["ppl_16"], row["ppl"]) if "ppl_16" in row else (row["ppl"], None) for key, row in chosen.items()}


def dense(paths) -> Optional[Cell]:
    for path in paths:
        for row in read_results(Path(path)):
            if row.get("method") == "dense":
                return row.get("ppl_16", row["ppl"]), row["ppl"] if "ppl_16" in row else None
    return None


def _short(value: float) -> str:
    return f"{value:.4g}" if value < 1e4 else f"{value:,.0f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}×" if value >= 0.1 else f"{value:.3f}×"


def table(found: Dict[tuple, Cell]) -> str:
    lines = ["| pruner | target | " + " | ".join(ALLOCATIONS.values()) + " | MSP / uniform | MSP / OWL |",
             "|---|---|" + "---:|" * (len(ALLOCATIONS) + 2)]
    for method, pruner in PRUNERS.items():
        for target in TARGETS:
            values = {a: found.get((method, target, a)) for a in ALLOCATIONS}
            shown = []
            for allocation, value in values.items():
                if value is None:
                    shown.append("not run")
                    continue
                text = _short(value[0]) + ("" if value[1] is None else f" ({_short(value[1])})")
                shown.append(f"**{text}**" if allocation == "msp" else text)

            def ratio(other):
                msp, base = values["msp"], values[other]
                if msp is None or base is None:
                    return "-"
                if msp[1] is not None and base[1] is not None:  # full split when both have it
                    return _ratio(msp[1] / base[1]) + " (full)"
                return _ratio(msp[0] / base[0])

            lines.append(f"| {pruner} | {float(target):.0%} | " + " | ".join(shown)
                         + f" | {ratio('uniform')} | {ratio('owl')} |")
    return "\n".join(lines)


def figure(found: Dict[tuple, Cell], reference: Optional[Cell], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"uniform": dict(linestyle="--", marker="s"), "owl": dict(linestyle="-.", marker="^"),
              "msp": dict(linestyle="-", marker="o", linewidth=2.2)}
    fig, axes = plt.subplots(1, len(PRUNERS), figsize=(10, 4.2), sharey=True)
    for ax, (method, pruner) in zip(axes, PRUNERS.items()):
        for allocation, label in ALLOCATIONS.items():
            points = [(100 * float(t), found[(method, t, allocation)][0]) for t in TARGETS
                      if (method, t, allocation) in found]
            if points:
                ax.plot(*zip(*points), label=label, **styles[allocation])
        if reference is not None:
            ax.axhline(reference[0], color="gray", linestyle=":", linewidth=1)
            ax.annotate(f"dense {reference[0]:.4g}", (0.02, reference[0]), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=8, color="gray")
        ax.set_yscale("log")
        ax.set_xticks([100 * float(t) for t in TARGETS])
        ax.set_xlabel("target sparsity (%)")
        ax.set_title(pruner)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("WikiText-2 test PPL, first 16 windows (log)")
    axes[-1].legend(frameon=False)
    fig.suptitle("SmolLM2-135M: perplexity against sparsity, uniform vs OWL vs MSP (lower is better)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="*", default=[RESULTS / "allocation.jsonl", RESULTS / "baselines.jsonl"])
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args()
    found = cells(args.results)
    print(table(found))
    missing = [f"{m}:{t}:{a}" for m in PRUNERS for t in TARGETS for a in ALLOCATIONS if (m, t, a) not in found]
    if missing:
        print(f"\nnot run: {', '.join(missing)}")
    print(f"\nfigure: {figure(found, dense(args.results), args.figure)}")


if __name__ == "__main__":
    main()
