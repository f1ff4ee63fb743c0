"""The marker that makes a pruned checkpoint verify itself on load, and the verification.

A pruned model's ``config.json`` carries, besides its plan in ``sparsity_plan``, a small marker
``quantization_config = {"quant_method": "msp", "checkpoint_format": "dense" | "compact", "format_version": 1}``.
With ``optimum_msp`` imported, transformers routes loading such a checkpoint through our quantizer
(:mod:`optimum_msp.integrations.transformers`), which decompresses compact weights and calls :func:`verify_pruned`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

from ..plan import CONFIG_KEY, PlanError, SparsityPlan
from ..pruners.base import prunes_per_row

QUANT_METHOD = "msp"
CHECKPOINT_FORMATS = ("dense", "compact")
MARKER_VERSION = 1


def checkpoint_marker(checkpoint_format: str = "dense") -> Dict[str, Any]:
    """The ``quantization_config`` dict written into a pruned checkpoint's ``config.json``."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
    return {"checkpoint_format": checkpoint_format, "format_version": MARKER_VERSION, "quant_method": QUANT_METHOD}


def mark_pruned(model_or_config: Any, checkpoint_format: str = "dense") -> None:
    """Mark a pruned model (or its config) so that reloading its checkpoint verifies it against its plan."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, CONFIG_KEY, None) is None:
        raise ValueError("mark_pruned: the config has no sparsity_plan; prune the model first.")
    config.quantization_config = checkpoint_marker(checkpoint_format)


def verify_pruned(model: torch.nn.Module):
    """Verify ``model``'s weights against ``model.config.sparsity_plan`` (:class:`PlanError` naming the layer).

    Returns the :class:`~optimum_msp.masks.SparsityReport`.
    """
    data = getattr(model.config, CONFIG_KEY, None)
    if data is None:
        raise PlanError(
            f"{type(model).__name__}'s config is marked as pruned (quantization_config.quant_method='msp') but has "
            f"no {CONFIG_KEY!r}: the checkpoint's config.json is incomplete."
        )
    plan = SparsityPlan.from_dict(data)
    return plan.verify(model, per_row=prunes_per_row(plan.method))


def is_pruned_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint this library wrote (the only kind of folder a save may replace)."""
    folder = Path(folder)
    if (folder / "msp_config.json").is_file():
        return True
    try:
        return CONFIG_KEY in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
