"""The marker that makes a pruned checkpoint verify itself on load, and the verification.

A pruned model's ``config.json`` carries its plan in ``sparsity_plan`` and, beside it, a marker

``"msp_checkpoint": {"checkpoint_format": "dense" | "compact", "format_version": 1}``

a plain top-level entry that every other tool ignores: stock transformers, lm-eval's hf backend and vLLM's config
parsing load a dense checkpoint as an ordinary model. (Up to optimum-msp 0.1 the marker sat in
``quantization_config = {"quant_method": "msp", ...}``, which lm-eval and vLLM resolve and refuse as an unknown
quantization method; such checkpoints still load and verify with ``optimum_msp`` imported, see
:func:`marker_format`, and are written in the new form when saved again.)

A compact checkpoint needs ``optimum_msp`` to decode its weights in any case, so it also keeps
``quantization_config = {"quant_method": "msp", "checkpoint_format": "compact", "format_version": 1}``: that entry
is what routes its loading through our quantizer (:mod:`optimum_msp.integrations.transformers`). Dense
checkpoints are verified through the same quantizer, which :mod:`optimum_msp.integrations.transformers` attaches
while loading when it sees the top-level marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..plan import CONFIG_KEY, PlanError, SparsityPlan
from ..pruners.base import prunes_per_row

QUANT_METHOD = "msp"
CHECKPOINT_FORMATS = ("dense", "compact")
MARKER_VERSION = 1
#: the top-level ``config.json`` entry that marks a checkpoint written by optimum-msp
MARKER_KEY = "msp_checkpoint"


def checkpoint_marker(checkpoint_format: str = "dense") -> Dict[str, Any]:
    """The ``msp_checkpoint`` entry of a pruned checkpoint's ``config.json``."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}.")
    return {"checkpoint_format": checkpoint_format, "format_version": MARKER_VERSION}


def compact_quantization_config() -> Dict[str, Any]:
    """The ``quantization_config`` of a compact checkpoint: transformers' hook that decodes it while loading."""
    return {**checkpoint_marker("compact"), "quant_method": QUANT_METHOD}


def _msp_quantization_config(config: Any) -> Optional[Dict[str, Any]]:
    """``config.quantization_config`` as a dict when it is optimum-msp's, else ``None``."""
    entry = getattr(config, "quantization_config", None)
    if entry is not None and not isinstance(entry, dict):
        entry = entry.to_dict() if hasattr(entry, "to_dict") else None
    if isinstance(entry, dict) and entry.get("quant_method") == QUANT_METHOD and "checkpoint_format" in entry:
        return entry
    return None


def marker_format(model_or_config: Any) -> Optional[str]:
    """``"dense"`` / ``"compact"`` when the config is marked as a pruned checkpoint (the top-level marker, or the
    ``quantization_config`` marker of older checkpoints), else ``None``."""
    config = getattr(model_or_config, "config", model_or_config)
    marker = getattr(config, MARKER_KEY, None)
    if isinstance(marker, dict):
        return marker.get("checkpoint_format")
    legacy = _msp_quantization_config(config)
    return None if legacy is None else legacy.get("checkpoint_format")


def mark_pruned(model_or_config: Any, checkpoint_format: str = "dense") -> None:
    """Mark a pruned model (or its config) so that reloading its checkpoint verifies it against its plan.

    ``"dense"`` (what a model in memory is) writes the top-level marker and drops an older ``quantization_config``
    marker, so that a re-save loads everywhere; ``"compact"`` also sets the compact ``quantization_config``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, CONFIG_KEY, None) is None:
        raise ValueError("mark_pruned: the config has no sparsity_plan; prune the model first.")
    setattr(config, MARKER_KEY, checkpoint_marker(checkpoint_format))
    if checkpoint_format == "compact":
        config.quantization_config = compact_quantization_config()
    elif _msp_quantization_config(config) is not None:
        config.__dict__.pop("quantization_config", None)


def verify_pruned(model: torch.nn.Module):
    """Verify ``model``'s weights against ``model.config.sparsity_plan`` (:class:`PlanError` naming the layer).

    Returns the :class:`~optimum_msp.masks.SparsityReport`.
    """
    data = getattr(model.config, CONFIG_KEY, None)
    if data is None:
        raise PlanError(
            f"{type(model).__name__}'s config is marked as pruned ({MARKER_KEY!r} or an msp quantization_config) "
            f"but has no {CONFIG_KEY!r}: the checkpoint's config.json is incomplete."
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
