"""Sparsity masks and the checker that verifies weights against them.

Conventions (stated once, used everywhere):

* A mask is a boolean tensor shaped like the ``[out_features, in_features]`` weight; ``True`` = **kept**.
* **N:M** follows NVIDIA's convention: at most ``N`` *non-zeros are kept* in every group of ``M``
  consecutive input weights of a row. 2:4 is 50 % sparse, 2:8 is 75 % sparse. (Some research code counts
  the *pruned* weights instead; we never do.)
* **Unstructured** masks are chosen per output row, as Wanda does: every row keeps the same number of
  weights, so the layer's sparsity is exact up to rounding one row's count.
* Ties are broken deterministically: among equal scores, the weight with the lower input index is pruned
  first (stable sort), so the same weights always give the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


def _validate_nm(n: int, m: int) -> None:
    if not isinstance(m, int) or m <= 0:
        raise ValueError(f"N:M needs a group size M >= 1, got M={m!r}.")
    if not isinstance(n, int) or not 0 <= n <= m:
        raise ValueError(f"N:M needs 0 <= N <= M (N = weights kept per group), got {n}:{m}.")


def _matrix_shape(tensor: torch.Tensor, what: str):
    """``(rows, cols)`` of an ``[out_features, in_features]`` tensor; anything else is a clear error (a 1-D norm
    weight would otherwise fail with "not enough values to unpack")."""
    if tensor.dim() != 2:
        raise ValueError(f"{what} needs an [out_features, in_features] matrix, got a {tensor.dim()}-D tensor of "
                         f"shape {tuple(tensor.shape)}; only linear layers are pruned.")
    return tensor.shape


def prune_count(in_features: int, sparsity: float) -> int:
    """How many weights an unstructured row of ``in_features`` loses at ``sparsity``."""
    return min(in_features, int(round(in_features * sparsity)))


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest-scoring ``1 - sparsity`` of every row.

    Selection instead of a sort (about 2x faster): every score below the row's k-th smallest is pruned,
    and the rest of the k come from the scores equal to it, lowest input index first, which is exactly
    what a stable sort would prune.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}.")
    _matrix_shape(scores, "An unstructured mask")
    pruned_count = prune_count(scores.shape[1], sparsity)
    if pruned_count == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(pruned_count, dim=1, keepdim=True).values
    below = scores < threshold
    tied = scores == threshold
    still_needed = pruned_count - below.sum(dim=1, keepdim=True)
    return ~(below | (tied & (tied.cumsum(dim=1) <= still_needed)))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights of every group of ``m`` consecutive inputs."""
    _validate_nm(n, m)
    rows, cols = _matrix_shape(scores, "An N:M mask")
    if cols % m:
        raise ValueError(
            f"An N:M pattern with M={m} needs in_features divisible by {m}, but a layer has {cols}. "
            "Exclude that layer with `ignore=[...]` or choose another M."
        )
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    if n < m:
        order = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
        mask.scatter_(2, order, False)
    return mask.reshape(rows, cols)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of ``m``-groups of ``weight`` ([out, in]) holding more than ``n`` non-zeros."""
    rows, cols = _matrix_shape(weight, "An N:M check")
    if cols % m:
        return rows * ((cols + m - 1) // m)  # cannot comply at all
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(dim=2)
    return int((nonzero > n).sum())


@dataclass
class LayerSparsity:
    """What one layer's weights actually hold."""

    numel: int
    zeros: int
    nm_violations: Optional[int] = None  # None: the layer has no N:M target

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    layers: Dict[str, LayerSparsity]

    @property
    def global_sparsity(self) -> float:
        """Parameter-weighted sparsity over the reported layers."""
        total = sum(layer.numel for layer in self.layers.values())
        return sum(layer.zeros for layer in self.layers.values()) / total if total else 0.0

    @property
    def nm_compliant(self) -> bool:
        return all(not layer.nm_violations for layer in self.layers.values())

    def as_table(self) -> str:
        lines = ["| layer | numel | sparsity | N:M violations |", "|---|---:|---:|---:|"]
        for name, layer in self.layers.items():
            violations = "-" if layer.nm_violations is None else layer.nm_violations
            lines.append(f"| {name} | {layer.numel} | {layer.sparsity:.4f} | {violations} |")
        lines.append(f"| **global** | {sum(x.numel for x in self.layers.values())} | {self.global_sparsity:.4f} | |")
        return "\n".join(lines)


def measure_layer(weight: torch.Tensor, nm: Optional[tuple] = None) -> LayerSparsity:
    """Count zeros (and N:M violations when ``nm=(n, m)`` is given) of a ``[out, in]`` weight."""
    zeros = int((weight == 0).sum())
    violations = nm_violations(weight, *nm) if nm is not None else None
    return LayerSparsity(numel=weight.numel(), zeros=zeros, nm_violations=violations)
