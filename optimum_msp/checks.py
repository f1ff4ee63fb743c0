"""Checks that turn silent failures of a prune into errors that name the block, the layer and what to do.

A pruner fed non-finite numbers does not crash: NaN scores rank arbitrarily (Wanda then keeps a layer dense),
an overflowing Hessian zeroes whole layers (SparseGPT), and the plan still records whatever came out. So
every place that consumes numbers measured on the model checks them first:

* :func:`check_model`: before anything is changed, the model must be one a plan can be stored in (a
  ``config``), with finite floating-point parameters;
* :func:`check_statistics`: the input statistics a layer is pruned with (or an allocator reads) hold no
  NaN/inf (an earlier layer or the embeddings overflowed on the calibration data);
* :func:`check_finite_values`: e.g. Fisher traces, pruning scores;
* :func:`check_pruned_layer`: the weight a pruner returned is finite, holds its target (the same rounding
  rule :meth:`optimum_msp.plan.SparsityPlan.verify` applies on load) and is not all zeros while its target
  keeps weights.

Every error is a :class:`NonFiniteError` or a plain ``ValueError``; both are ``ValueError``.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .masks import measure_layer
from .plan import LayerTarget, required_zeros

__all__ = ["NonFiniteError", "check_finite_values", "check_model", "check_pruned_layer", "check_statistics",
           "describe_layer"]

# Statistics are shared between layers that read one input (q/k/v): check each accumulator once per state.
_CHECKED: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()

_ADVICE = ("Check the model's weights for NaN/inf (torch.isfinite on each parameter), load it in float32 rather "
           "than float16, and make sure the calibration token ids are inside the vocabulary.")


class NonFiniteError(ValueError):
    """NaN or inf where a prune needs finite numbers (weights, activations, statistics, scores)."""


def describe_layer(name: str) -> str:
    """``layer 'model.layers.3.mlp.up_proj' (decoder block 3)``: what every error of a layer starts with."""
    found = re.search(r"\.(\d+)\.", f".{name}.") if name else None
    block = f" (decoder block {found.group(1)})" if found else ""
    return f"layer {name!r}{block}" if name else "a layer"


def _bad_counts(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return ", ".join(part for part in (f"{nan:,} NaN" if nan else "", f"{inf:,} inf" if inf else "") if part)


def _all_finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def check_model(model: Any, check_finite: bool = True) -> None:
    """Refuse, before any weight is touched, a model that cannot be pruned to a stored plan.

    * a plan lives in ``model.config`` (``config.sparsity_plan``), so a model without a transformers-style
      config (a plain ``nn.Module``) would be pruned in place and then fail with nothing recorded;
    * a floating-point parameter holding NaN or inf makes every statistic downstream of it meaningless.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"MSPPruner needs a torch.nn.Module (a transformers causal LM), got {type(model).__name__}.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"{type(model).__name__} has no transformers config (model.config), where the sparsity plan is stored: "
            "nothing was pruned. Load the model with transformers (AutoModelForCausalLM.from_pretrained) or give it "
            "a PretrainedConfig as `model.config`."
        )
    if not check_finite:
        return
    bad = []
    for name, parameter in model.named_parameters():
        if parameter.device.type != "meta" and not _all_finite(parameter.detach()):
            bad.append(f"{name} ({_bad_counts(parameter.detach())})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(
            f"The model has non-finite parameters: {', '.join(bad[:3])}{more}. Nothing was pruned: statistics, "
            "scores and the search would all be meaningless. Re-load or repair the checkpoint."
        )


def check_statistics(name: str, stats: Any) -> None:
    """Raise :class:`NonFiniteError` naming the layer when its input statistics hold NaN or inf.

    ``stats`` follows :mod:`optimum_msp.statistics` (its ``STATE`` tensors are the whole accumulated state);
    ``None`` (data-free pruners) and objects without ``STATE`` pass.
    """
    state = getattr(stats, "STATE", None)
    if stats is None or not state:
        return
    tokens = getattr(stats, "tokens", None)
    try:
        if _CHECKED.get(stats) == tokens:
            return
    except TypeError:  # not weak-referenceable: check every time
        pass
    for field in state:
        value = getattr(stats, field)
        if isinstance(value, torch.Tensor) and not _all_finite(value):
            raise NonFiniteError(
                f"The calibration inputs of {describe_layer(name)} overflowed: its input statistics "
                f"({type(stats).__name__}.{field}) hold {_bad_counts(value)} values, so it cannot be pruned "
                f"meaningfully. An earlier layer or the embeddings produce NaN/inf (or values too large to square "
                f"in float32) on the calibration data. {_ADVICE}"
            )
    tensors = [getattr(stats, field) for field in state if isinstance(getattr(stats, field), torch.Tensor)]
    if tokens and tensors and not any(bool(t.any()) for t in tensors):
        # every input exactly zero on real tokens: the scores cannot rank anything (Wanda keeps an arbitrary half,
        # SparseGPT zeroes the layer). Seen when an earlier layer overflows and a norm turns inf into 0.
        raise ValueError(
            f"The calibration inputs of {describe_layer(name)} are all exactly zero on {tokens:,} tokens, so its "
            f"weights cannot be ranked. An earlier layer probably produces values too large for float32 (a norm then "
            f"divides them to zero), or the layer is never reached. {_ADVICE}"
        )
    try:
        _CHECKED[stats] = tokens
    except TypeError:
        pass


def check_all_statistics(stats: Mapping[str, Any]) -> None:
    """:func:`check_statistics` for every layer of ``stats`` (layer name -> accumulator)."""
    for name, stat in stats.items():
        check_statistics(name, stat)


def check_finite_values(what: str, values: Mapping[str, float]) -> None:
    """Raise :class:`NonFiniteError` naming the first layer whose value (e.g. Fisher trace) is NaN or inf."""
    bad = [name for name, value in values.items() if not torch.isfinite(torch.tensor(float(value)))]
    if bad:
        more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
        raise NonFiniteError(f"The {what} of {describe_layer(bad[0])} is {values[bad[0]]}{more}. {_ADVICE}")


def check_weight(name: str, weight: torch.Tensor) -> None:
    """A layer about to be pruned must hold finite weights (its scores and updates are computed from them)."""
    if not _all_finite(weight):
        raise NonFiniteError(f"The weight of {describe_layer(name)} holds {_bad_counts(weight)} values; it cannot be "
                             f"pruned. {_ADVICE}")


def checked_prune(name: str, weight: torch.Tensor, pruner: Any, stats: Any, target: LayerTarget) -> torch.Tensor:
    """``pruner.prune`` of one layer's ``[out, in]`` weight, between the checks above: finite weight and
    statistics in, a finite result that holds its target out. Errors name the layer and its block."""
    check_weight(name, weight)
    check_statistics(name, stats)
    dense = weight.float()
    try:
        pruned = pruner.prune(dense, stats, target)
    except NonFiniteError as error:  # raised by the pruner (e.g. its scores), which does not know the layer
        raise NonFiniteError(f"Pruning {describe_layer(name)}: {error}") from None
    check_pruned_layer(name, dense, pruned, target, pruner.masks_per_row)
    return pruned


def check_pruned_layer(name: str, dense: torch.Tensor, pruned: torch.Tensor, target: LayerTarget,
                       per_row: Optional[bool] = None) -> None:
    """Raise when the pruned weight of a layer is not what its target asks.

    ``dense``/``pruned`` are ``[out, in]``; ``per_row`` (the pruner chooses its mask per output row) picks the
    rounding rule of :func:`optimum_msp.plan.required_zeros`, the one verification applies on load, so a prune
    that passes here also passes verification.
    """
    where = describe_layer(name)
    if not _all_finite(pruned):
        raise NonFiniteError(f"Pruning {where} to {target.describe()} produced {_bad_counts(pruned)} weights. "
                             f"{_ADVICE}")
    measured = measure_layer(pruned, (target.n, target.m) if target.is_nm else None)
    if measured.nm_violations:
        raise ValueError(f"Pruning {where} to {target.describe()} left {measured.nm_violations:,} group(s) with more "
                         f"than {target.n} non-zeros: the pruner did not apply its target.")
    rows, cols = pruned.shape
    needed = required_zeros(rows, cols, target, per_row)
    if measured.zeros < needed:
        raise ValueError(
            f"Pruning {where} to {target.describe()} left it with {measured.zeros:,} zero weights of {measured.numel:,} "
            f"(at least {needed:,} required): its scores could not rank the weights (NaN or inf activations?). "
            f"{_ADVICE}"
        )
    keeps = target.n > 0 if target.is_nm else target.sparsity < 1.0
    if keeps and measured.zeros == measured.numel and bool((dense != 0).any()):
        raise ValueError(
            f"Pruning {where} to {target.describe()} zeroed every weight although its target keeps "
            f"{1 - target.sparsity:.4g} of them: its calibration inputs were all zero or overflowed (e.g. an earlier "
            f"layer produces values too large for float32). {_ADVICE}"
        )

