"""Named bundles of search settings: ``MSPConfig.from_preset("quality", method="sparsegpt", sparsity=0.75)`` or
``optimum-msp prune --preset quality ...``.

A preset only chooses defaults: every option given explicitly (keyword, ``--flag``, ``--config`` file) wins. What
each one buys, and what it costs, is measured in ``docs/benchmarks.md`` ("What more search time buys").
"""

from __future__ import annotations

from typing import Any, Dict

#: name -> (what it is for, the option values it sets)
PRESETS: Dict[str, tuple] = {
    "default": ("the defaults of every option", {}),
    "quality": (
        "an MSP search on twice the fitness windows, many children screened on a quarter of them: about 2.4x the "
        "default search's cost",
        dict(fitness_samples=8, generations=12, offspring=16, selection_steps="2:6,4:3"),
    ),
}


def preset_values(name: str) -> Dict[str, Any]:
    """The option values preset ``name`` sets (a copy); a clear error for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dict(PRESETS[name][1])
