"""Finding decoder blocks and their prunable linear layers from the module tree.

No model names are sniffed and no attribute path is hard-coded: the decoder blocks are the
``nn.ModuleList`` of identical modules that holds most of the model's linear weights (as Optimum's GPTQ
finds its block list), and prunable layers are the ``nn.Linear`` / GPT-2 ``Conv1D`` modules inside those
blocks. ``block_name`` overrides the search for exotic models.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

try:  # GPT-2 style models store linear layers as Conv1D with a transposed [in, out] weight.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


class NoDecoderBlocksError(ValueError):
    pass


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]``; a view, so in-place writes reach the module."""
    weight = module.weight.data
    return weight.t() if isinstance(module, LINEAR_TYPES[1:]) else weight


def _linear_numel(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if is_linear(m))


def find_decoder_blocks(model: nn.Module, block_name: Optional[str] = None) -> Tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the model's decoder blocks."""
    modules = dict(model.named_modules())
    if block_name is not None:
        blocks = modules.get(block_name)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise NoDecoderBlocksError(f"block_name={block_name!r} is not a non-empty nn.ModuleList in this model.")
        return block_name, blocks
    best: Optional[Tuple[str, nn.ModuleList]] = None
    best_numel = 0
    for name, module in modules.items():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        numel = _linear_numel(module)
        if numel > best_numel:
            best, best_numel = (name, module), numel
    if best is None:
        raise NoDecoderBlocksError(
            f"Could not find decoder blocks in {type(model).__name__}: no nn.ModuleList of identical modules "
            "holding linear layers. Pass `block_name=` (the dotted name of the block list, e.g. "
            "'model.layers') in the config, or use a causal LM built from transformer blocks."
        )
    return best


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


def select_linears(
    block: nn.Module,
    prefix: str,
    targets: Sequence[str] = ("Linear",),
    ignore: Sequence[str] = (),
) -> Dict[str, nn.Module]:
    """Linear layers of ``block`` (full names) matched by ``targets`` and not by ``ignore``.

    Patterns follow compressed-tensors: ``re:<regex>`` is matched against the full module name; a plain
    string matches a full name, a name suffix (``mlp.down_proj``) or a class name. ``"Linear"`` also
    covers GPT-2's ``Conv1D`` since both are the same operation.
    """
    selected = {}
    for local, module in block.named_modules():
        if not is_linear(module):
            continue
        name = f"{prefix}.{local}" if local else prefix
        hit = any(_matches(p, name, module) or (p == "Linear" and is_linear(module)) for p in targets)
        if hit and not any(_matches(p, name, module) for p in ignore):
            selected[name] = module
    return selected


def prunable_layers(
    model: nn.Module,
    targets: Sequence[str] = ("Linear",),
    ignore: Sequence[str] = (),
    block_name: Optional[str] = None,
) -> List[Dict[str, nn.Module]]:
    """Per decoder block, the selected linear layers (full name -> module)."""
    prefix, blocks = find_decoder_blocks(model, block_name)
    return [select_linears(block, f"{prefix}.{i}", targets, ignore) for i, block in enumerate(blocks)]
