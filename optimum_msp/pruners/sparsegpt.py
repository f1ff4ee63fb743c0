"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with weight updates from the input Hessian.

Columns are processed left to right in blocks (128 by default). Within a block, the mask is chosen from
the saliency w^2 / [H^-1]_jj^2 (unstructured: over the whole block, as the paper; N:M: per group of M
columns of each row) and each pruned weight's error is propagated to the not-yet-processed columns.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from ..masks import lowest_mask
from ..options import Options, option
from ..plan import LayerTarget
from ..statistics import InputHessian
from .base import PRUNERS, Pruner

__all__ = ["InputHessian", "SparseGPTOptions", "SparseGPTPruner"]

logger = logging.getLogger(__name__)


def _upper_inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """cholesky(H^-1, upper) with relative dampening, raised tenfold until H is positive definite.

    At most two matrices of H's size live beside H at any time (the dampening is added to a copy's diagonal in
    place, and each step drops the previous one): for a 28672-wide MLP input that is 3.3 GB per matrix."""
    diag_mean = torch.mean(torch.diag(hessian))
    damp = dampening
    for _ in range(8):
        damped = hessian.clone()
        damped.diagonal().add_(damp * diag_mean)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return upper
        logger.warning(
            "SparseGPT: the Hessian is not positive definite with dampening %.3g; retrying with %.3g.",
            damp, max(damp * 10, 1e-4),
        )
        damp = max(damp * 10, 1e-4)
    raise RuntimeError("SparseGPT: the Hessian stays singular even with heavy dampening; use more calibration data.")


@dataclass
class SparseGPTOptions(Options):
    block_size: int = option(128, "SparseGPT: columns processed together (the lazy-batch width)", kind=int, low=1)
    dampening: float = option(0.01, "SparseGPT: dampening added to the Hessian's diagonal, relative to its mean",
                              kind=float, low=0.0)


@PRUNERS.register("sparsegpt", options=SparseGPTOptions)
class SparseGPTPruner(Pruner):
    name = "sparsegpt"
    updates_weights = True

    def __init__(self, options: SparseGPTOptions = None):
        super().__init__(options if options is not None else SparseGPTOptions())
        self.block_size = self.options.block_size
        self.dampening = self.options.dampening
        # The inverse-Hessian factor depends only on the statistics: layers sharing an input (q/k/v) and
        # repeated prunes of one layer at several levels (the MSP search) reuse it.
        self._factors: "weakref.WeakKeyDictionary[InputHessian, tuple]" = weakref.WeakKeyDictionary()

    def _factor(self, stats: InputHessian):
        if stats not in self._factors:
            H = stats.hessian
            dead = torch.diag(H) == 0  # inputs that were always zero carry no information
            H[dead, dead] = 1.0
            self._factors[stats] = (dead, _upper_inverse_cholesky(H, self.dampening))
        return self._factors[stats]

    def new_statistics(self, in_features):
        return InputHessian(in_features)

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputHessian, target: LayerTarget) -> torch.Tensor:
        W = weight.clone().float()
        rows, cols = W.shape
        if target.is_nm and cols % target.m:
            raise ValueError(f"N:M with M={target.m} needs in_features divisible by {target.m}, got {cols}.")
        dead, Hinv = self._factor(stats)
        dead, Hinv = dead.to(W.device), Hinv.to(W.device)
        W[:, dead] = 0.0

        # Blocks must hold whole N:M groups.
        block = self.block_size if not target.is_nm else max(target.m, self.block_size // target.m * target.m)
        for start in range(0, cols, block):
            end = min(start + block, cols)
            # The block transposed, so that column i is a contiguous row: the column loop is the one Python
            # loop of the method, and two fused ops per column keep it about twice as fast as the textbook form.
            W1 = W[:, start:end].t().contiguous()
            Hinv1 = Hinv[start:end, start:end]
            diag = torch.diag(Hinv1)
            Err1 = torch.empty_like(W1)
            # err_i = w_i * scale_i, with scale = 1 / [H^-1]_ii on pruned weights and 0 on kept ones
            if target.is_nm:
                scale = torch.empty_like(W1)  # each group's mask depends on the updates of the groups before it
            else:
                # the layer's count round(sparsity * numel) split over the blocks, the remainder carried on:
                # rounding each block alone would miss it by up to half a weight per block
                count = round(target.sparsity * rows * end) - round(target.sparsity * rows * start)
                scale = self._unstructured_block_mask(W1.t(), diag, count).t() / diag.unsqueeze(1)
            for i in range(end - start):
                if target.is_nm and i % target.m == 0:
                    group = slice(i, i + target.m)
                    pruned = self._nm_group_mask(W1[group].t(), diag[group], target).t()
                    torch.div(pruned, diag[group].unsqueeze(1), out=scale[group])
                err = torch.mul(W1[i], scale[i], out=Err1[i])
                # OBS update of the columns not yet processed; column i itself becomes its pruned value
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            W[:, start:end] = W1.masked_fill_(scale != 0, 0.0).t()  # exact zeros, not w - (w / d) * d
            W[:, end:] -= Err1.t() @ Hinv[start:end, end:]
        return W

    @staticmethod
    def _unstructured_block_mask(W1: torch.Tensor, diag: torch.Tensor, count: int) -> torch.Tensor:
        """Pruned (True) entries of one column block: its ``count`` lowest saliencies over the whole block, ties
        to the lower flat index. One selection over the flattened block (5-9x faster than sorting it)."""
        saliency = (W1**2 / diag.unsqueeze(0) ** 2).reshape(1, -1)
        return ~lowest_mask(saliency, min(max(count, 0), saliency.shape[1])).reshape(W1.shape)

    @staticmethod
    def _nm_group_mask(group: torch.Tensor, diag: torch.Tensor, target: LayerTarget) -> torch.Tensor:
        saliency = group**2 / diag.unsqueeze(0) ** 2
        pruned = torch.zeros_like(group, dtype=torch.bool)
        drop = target.m - target.n
        if drop:
            pruned.scatter_(1, torch.sort(saliency, dim=1, stable=True).indices[:, :drop], True)
        return pruned
