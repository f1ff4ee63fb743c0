"""Named settings: a few option values that belong together, under one name.

``MSPConfig.from_preset("quality", method="sparsegpt", sparsity=0.75, allocation="msp")`` or
``optimum-msp prune --preset quality ...``. A preset only fills in values: a keyword or a flag given explicitly
wins over it (on the command line it goes on top of a ``--config`` file, under the flags), and a saved
``msp_config.json`` holds the values themselves, so a checkpoint never depends on what a preset meant when it was
written.

What each preset buys was measured on SmolLM2-135M (``docs/msp.md``, "Giving the search more time";
``docs/benchmarks.md``); the defaults are sized for a 10-minute prune of a 135M model on 2 CPU cores.
"""

from __future__ import annotations

from typing import Any, Dict

#: name -> option values; "default" is the library's defaults (an empty preset)
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    # twice the search's fitness tokens (4 windows of 512 instead of 2): about twice the search's time; measured
    # -12 to -14 % test PPL with Wanda at mixed 3:8, nothing beyond +-3 % with SparseGPT (docs/msp.md)
    "quality": {"fitness_samples": 4},
}


def preset_values(name: str) -> Dict[str, Any]:
    """The option values of preset ``name`` (a copy); ``ValueError`` naming the known presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dict(PRESETS[name])
