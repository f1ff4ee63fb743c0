"""Fine-tune a pruned model without losing its sparsity.

Masks (``True`` = kept, shaped like each weight *parameter*) are taken at the start of training from the
weights themselves (``weight != 0``) of the layers named in ``config.sparsity_plan`` (or, for a model without
a plan, of every linear layer of the decoder blocks that holds zeros). They are plain tensors in a dict stored
as a plain attribute of the model (never buffers), so they stay out of ``state_dict()`` and checkpoints.

While training, two things keep pruned weights at exactly zero:

* a gradient hook on every masked parameter (``param.register_hook``) zeroes the gradients of pruned
  weights before they are accumulated, so gradient clipping sees the true norm and AdamW's moments of pruned
  weights stay zero (with them, decoupled weight decay of a zero weight is zero too);
* after every optimizer step the masks are re-applied (``masked_fill_``), which also covers optimizers that
  would move a weight with a zero gradient (momentum carried over from earlier, or non-decoupled decay).

With :class:`~transformers.Trainer` add :class:`SparsityPreservingCallback` (it uses ``on_train_begin`` and
``on_optimizer_step``, which transformers calls right after ``optimizer.step()`` once per accumulated step,
after gradient clipping). In a custom loop call :func:`keep_sparsity` (``optimizer.register_step_post_hook``).
After a PEFT ``merge_and_unload()``, which makes the merged weights dense, :func:`reapply_masks` restores the
exact masks captured before.
"""

from __future__ import annotations

import functools
import logging
from typing import Dict, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from ..modeling.blocks import prunable_layers
from ..checkpoint.marker import verify_pruned
from ..plan import SparsityPlan

logger = logging.getLogger(__name__)

__all__ = ["MaskKeeper", "SparsityPreservingCallback", "capture_masks", "keep_sparsity", "reapply_masks"]

#: name of the plain attribute (not a buffer) holding the captured masks on the transformers model
MASKS_ATTRIBUTE = "_msp_sparsity_masks"


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (module names as in ``config.sparsity_plan``)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _weight(modules: Dict[str, nn.Module], name: str) -> nn.Parameter:
    module = modules.get(name)
    weight = getattr(module, "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Layer {name!r} has no weight in this model; the masks do not belong to it.")
    return weight


def capture_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Masks (``weight != 0``) of the pruned layers of ``model``, keyed by layer name; also stored on the model.

    Pruned layers are those of ``config.sparsity_plan``; without a plan, the decoder blocks' linear layers that
    hold at least one zero.
    """
    base = _base_model(model)
    modules = dict(base.named_modules())
    plan = SparsityPlan.from_config(base.config) if hasattr(base, "config") else None
    if plan is not None:
        names = list(plan.layers)
    else:
        names = [name for block in prunable_layers(base) for name, module in block.items()
                 if bool((module.weight == 0).any())]
        if not names:
            raise ValueError(
                "Nothing to keep sparse: the model has no sparsity_plan in its config and no zero weight in its "
                "decoder blocks' linear layers. Prune it first (MSPPruner) or pass masks= explicitly."
            )
    masks = {name: (_weight(modules, name).detach() != 0) for name in names}
    setattr(base, MASKS_ATTRIBUTE, masks)  # a dict attribute: not a buffer, not in state_dict()
    return masks


def stored_masks(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    return getattr(_base_model(model), MASKS_ATTRIBUTE, None)


@torch.no_grad()
def reapply_masks(model: nn.Module, masks: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """Zero every pruned weight again, e.g. after ``peft_model.merge_and_unload()``; returns ``model``.

    ``masks`` defaults to those captured earlier on this model (by :class:`MaskKeeper`, the callback or
    :func:`capture_masks`, which must therefore run *before* LoRA adapters are merged).
    """
    masks = masks if masks is not None else stored_masks(model)
    if masks is None:
        raise ValueError(
            "No masks to re-apply: call optimum_msp.integrations.trainer.capture_masks(model) (or train with "
            "SparsityPreservingCallback / keep_sparsity) before merging adapters, or pass masks=."
        )
    modules = dict(_base_model(model).named_modules())
    for name, mask in masks.items():
        weight = _weight(modules, name)
        if weight.shape != mask.shape:
            raise ValueError(f"Layer {name!r}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}.")
        weight.masked_fill_(~mask.to(weight.device), 0)
    setattr(_base_model(model), MASKS_ATTRIBUTE, masks)
    return model


def _mask_gradient(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if mask.device != grad.device:
        mask = mask.to(grad.device)
    return grad.masked_fill(~mask, 0)


class MaskKeeper:
    """Keeps the pruned weights of ``model`` at zero while it trains.

    >>> keeper = MaskKeeper(model).attach(optimizer)   # gradient hooks + optimizer post-step hook
    >>> ...train...
    >>> keeper.detach()

    ``masks`` defaults to :func:`capture_masks` (the plan's layers, ``weight != 0`` now).
    """

    def __init__(self, model: nn.Module, masks: Optional[Dict[str, torch.Tensor]] = None):
        self.model = model
        if masks is None:
            masks = capture_masks(model)
        else:
            setattr(_base_model(model), MASKS_ATTRIBUTE, masks)
        self.masks = masks
        modules = dict(_base_model(model).named_modules())
        self._weights = {name: _weight(modules, name) for name in masks}
        for name, weight in self._weights.items():
            if weight.shape != masks[name].shape:
                raise ValueError(f"Layer {name!r}: mask shape {tuple(masks[name].shape)} != {tuple(weight.shape)}.")
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, optimizer: Optional[torch.optim.Optimizer] = None) -> "MaskKeeper":
        """Register the gradient hooks (and, with ``optimizer``, a post-step hook applying the masks)."""
        if self._handles:
            return self
        for name, weight in self._weights.items():
            if weight.requires_grad:  # frozen weights (e.g. under LoRA) get no gradient to mask
                self._handles.append(weight.register_hook(functools.partial(_mask_gradient, self.masks[name])))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))
        self.apply()
        logger.info("Keeping %d pruned layers sparse while training", len(self._weights))
        return self

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight (in place)."""
        for name, weight in self._weights.items():
            mask = self.masks[name]
            if mask.device != weight.device:
                mask = self.masks[name] = mask.to(weight.device)
            weight.masked_fill_(~mask, 0)

    def detach(self) -> None:
        """Remove the hooks (the masks stay stored on the model for :func:`reapply_masks`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "MaskKeeper":
        return self.attach() if not self.attached else self

    def __exit__(self, *exc) -> None:
        self.detach()


def keep_sparsity(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                  masks: Optional[Dict[str, torch.Tensor]] = None) -> MaskKeeper:
    """For custom training loops: an attached :class:`MaskKeeper` (gradient hooks + ``optimizer`` post-step hook).

    >>> keeper = keep_sparsity(model, optimizer)
    >>> for batch in data:
    ...     model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    >>> keeper.detach()
    """
    return MaskKeeper(model, masks).attach(optimizer)


class SparsityPreservingCallback(TrainerCallback):
    """``Trainer`` callback: pruned weights stay exactly zero through fine-tuning.

    Masks are captured at ``on_train_begin`` (or given as ``masks``), gradients of pruned weights are zeroed by
    hooks, and the masks are re-applied at every ``on_optimizer_step``. With ``verify=True`` the weights are
    checked against ``config.sparsity_plan`` when training ends.

    >>> trainer = Trainer(model, args, train_dataset=..., callbacks=[SparsityPreservingCallback()])
    """

    def __init__(self, masks: Optional[Dict[str, torch.Tensor]] = None, verify: bool = True):
        self.masks = masks
        self.verify = verify
        self.keeper: Optional[MaskKeeper] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SparsityPreservingCallback needs the model (it is passed by Trainer).")
        if self.keeper is not None:
            self.keeper.detach()
        self.keeper = MaskKeeper(model, self.masks).attach()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.keeper is not None:
            self.keeper.apply()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.keeper is None:
            return
        self.keeper.apply()
        self.keeper.detach()
        base = _base_model(model if model is not None else self.keeper.model)
        if self.verify and SparsityPlan.from_config(getattr(base, "config", None)) is not None:
            verify_pruned(base)
