"""Sparsity masks and the checker that verifies weights against them.

Conventions (stated once, used everywhere):

* A mask is a boolean tensor shaped like the ``[out_features, in_features]`` weight; ``True`` = **kept**.
* **N:M** follows NVIDIA's convention: at most ``N`` *non-zeros are kept* in every group of ``M``
  consecutive input weights of a row. 2:4 is 50 % sparse, 2:8 is 75 % sparse. (Some research code counts
  the *pruned* weights instead; we never do.)
* **Unstructured** masks are chosen per output row, as Wanda does. The layer prunes ``round(sparsity * numel)``
  weights, the nearest count to its target: row ``i`` prunes ``round(a * (i + 1)) - round(a * i)`` with
  ``a = sparsity * in_features`` (the remainder carried from row to row), so rows differ by at most one weight
  and a target off the ``1/in_features`` grid does not gain or lose a fraction of a weight in every row.
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


def row_prune_counts(rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """Weights each of ``rows`` rows of ``cols`` loses so that the matrix loses ``round(sparsity * rows * cols)``:
    the remainder of every row is carried to the next (counts differ by at most one; on the ``1/cols`` grid
    every row gets ``round(sparsity * cols)``). Computed in float64 on the CPU (a count, not a tensor op of
    the layer), as a CPU int64 tensor of ``rows``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}.")
    cumulative = torch.round(torch.arange(rows + 1, dtype=torch.float64) * (sparsity * cols)).long()
    return (cumulative[1:] - cumulative[:-1]).clamp_(0, cols)


def lowest_mask(scores: torch.Tensor, counts) -> torch.Tensor:
    """Prune the ``counts[i]`` lowest scores of every row ``i`` (``counts``: an int for every row, or one per row
    differing by at most one); keep the rest.

    Selection instead of a sort (about 2x faster): every score below the row's k-th smallest is pruned,
    and the rest of the k come from the scores equal to it, lowest input index first, which is exactly
    what a stable sort would prune. Rows that prune one more then lose their lowest kept score (lowest index
    among ties, as the sort would).
    """
    _matrix_shape(scores, "An unstructured mask")
    if isinstance(counts, int):
        low = high = counts
        extra = None
    else:
        low, high = int(counts.min()), int(counts.max())
        if high - low > 1:
            raise ValueError(f"Row prune counts may differ by at most one, got {low} to {high}.")
        extra = (counts.to(scores.device) > low).unsqueeze(1) if high > low else None
    if low == 0:
        kept = torch.ones_like(scores, dtype=torch.bool)
    else:
        threshold = scores.kthvalue(low, dim=1, keepdim=True).values
        below = scores < threshold
        tied = scores == threshold
        still_needed = low - below.sum(dim=1, keepdim=True)
        kept = ~(below | (tied & (tied.cumsum(dim=1) <= still_needed)))
    if extra is not None:
        # argmin returns the first of equal minima: the lowest input index, as a stable sort prunes
        next_lowest = scores.masked_fill(~kept, float("inf")).argmin(dim=1, keepdim=True)
        kept.scatter_(1, next_lowest, ~extra & kept.gather(1, next_lowest))
    return kept


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest-scoring weights of every row, ``round(sparsity * numel)`` pruned in all
    (:func:`row_prune_counts`)."""
    rows, cols = _matrix_shape(scores, "An unstructured mask")
    return lowest_mask(scores, row_prune_counts(rows, cols, sparsity))


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
