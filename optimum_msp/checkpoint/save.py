"""Saving pruned models: a plain dense checkpoint, or a compact one (:mod:`optimum_msp.checkpoint.codec`).
Either carries the marker that makes a reload verify the weights against the plan."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ..modeling.blocks import LINEAR_TYPES
from ..modeling.offload import read_stored
from ..plan import LayerTarget, SparsityPlan
from .codec import COMPACT_MODES, encode_layer
from .marker import MARKER_KEY, mark_pruned

logger = logging.getLogger(__name__)


def encode_module(module: nn.Module, target: Optional[LayerTarget] = None, name: str = "",
                  codec: Optional[str] = None) -> Optional[Dict[str, torch.Tensor]]:
    """:func:`~optimum_msp.checkpoint.codec.encode_layer` of a linear module's stored weight."""
    transposed = isinstance(module, LINEAR_TYPES[1:])  # GPT-2 Conv1D stores [in, out]
    # the codec works on host tensors (bit packing, zlib): a weight on an accelerator or offloaded comes to the host
    return encode_layer(read_stored(module).cpu(), target, name, codec=codec, transposed=transposed)


def _stored_state_dict(model: nn.Module, modules: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with offloaded parameters (``meta`` placeholders) read from where they are stored."""
    state_dict = model.state_dict()
    for key, tensor in state_dict.items():
        if tensor.device.type == "meta":
            owner, _, name = key.rpartition(".")
            state_dict[key] = read_stored(modules[owner], name)
    return state_dict


def compact_state_dict(model: nn.Module, plan: Optional[SparsityPlan] = None, codec: Optional[str] = None
                       ) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every planned layer's weight replaced by its compact tensors (``codec``:
    ``None`` or ``"deflate"``)."""
    plan = plan if plan is not None else SparsityPlan.from_config(model.config)
    if plan is None:
        raise ValueError(
            "save_compact needs a pruned model: model.config has no sparsity_plan. Prune it with MSPPruner (or "
            "load it with quantization_config=MSPConfig(...)) first."
        )
    modules = dict(model.named_modules())
    state_dict = _stored_state_dict(model, modules)
    compressed = 0
    for name, layer in plan.layers.items():
        module = modules.get(name)
        key = f"{name}.weight"
        if module is None or key not in state_dict:
            raise ValueError(f"The sparsity plan names layer {name!r}, which this model does not have.")
        encoded = encode_module(module, layer.target, name, codec=codec)
        if encoded is None:
            continue
        compressed += 1
        for suffix, tensor in encoded.items():
            state_dict[f"{name}.{suffix}"] = tensor
    logger.info("Compact checkpoint: %d of %d planned layers compressed", compressed, len(plan.layers))
    return state_dict


def save_compact(model: nn.Module, save_directory: Union[str, os.PathLike], codec: Optional[str] = None,
                 **save_kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **save_kwargs)`` with pruned layers stored compactly
    (``codec="deflate"``: their tensors also deflated, losslessly; smaller, slower to save).

    Everything ``save_pretrained`` does still applies (config, generation config, sharding with
    ``max_shard_size``, ``push_to_hub=True``); ``config.json`` is marked ``checkpoint_format: "compact"`` (the
    top-level marker and an msp ``quantization_config``) so that loading (with ``optimum_msp`` imported)
    decompresses and verifies. The model itself is not changed.
    """
    if "state_dict" in save_kwargs:
        raise ValueError("save_compact builds the state dict itself; do not pass state_dict=.")
    if codec not in (None, "deflate"):
        raise ValueError(f"Unknown compact codec {codec!r}; use None or 'deflate'.")
    state_dict = compact_state_dict(model, codec=codec)
    config = model.config
    missing = object()
    previous = {key: config.__dict__.get(key, missing) for key in ("quantization_config", MARKER_KEY)}
    mark_pruned(config, "compact")  # for this save only: the model in memory stays dense
    try:
        model.save_pretrained(save_directory, state_dict=state_dict, **save_kwargs)
    finally:
        for key, value in previous.items():
            if value is missing:
                config.__dict__.pop(key, None)
            else:
                setattr(config, key, value)
    return Path(save_directory)


def save_pruned(model: nn.Module, save_directory: Union[str, os.PathLike], compact: Union[bool, str] = False,
                **save_kwargs: Any) -> Path:
    """Save a pruned model so that loading it with ``optimum_msp`` imported verifies it against its plan.

    ``compact=False`` writes a plain dense checkpoint (loads everywhere: stock transformers, lm-eval, vLLM);
    ``compact=True`` (or ``"sparse"``) writes a :func:`save_compact` checkpoint; ``compact="deflate"`` one whose
    sparse tensors are also deflated.
    """
    if compact is not False:
        if compact not in COMPACT_MODES:
            raise ValueError(f"compact must be False, True, 'sparse' or 'deflate', got {compact!r}.")
        return save_compact(model, save_directory, codec=COMPACT_MODES[compact], **save_kwargs)
    if SparsityPlan.from_config(model.config) is not None:
        mark_pruned(model)
    model.save_pretrained(save_directory, **save_kwargs)
    return Path(save_directory)
