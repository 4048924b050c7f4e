"""The mask-only baselines: Wanda and magnitude (docs/algorithm.md 4). No weight update.

They share `OBSSolver`'s interface (`add_batch`, `prune`, `free`) so the layer-by-layer pipeline
drives every method the same way.
"""

from __future__ import annotations

import torch

from duogpt.solver.masks import WeightSparsity, nm_lowest, row_lowest, select
from duogpt.solver.obs import Pruned


class WandaPruner:
    """Wanda: score `|W_ij| · ||X_j||₂`, the lowest `p_w` of each output row pruned (N:M: per
    group of M in each row).

    Args:
        columns: `k`, the shared input width.
        sparsity: the target weight sparsity.
        device: where the statistics live.
    """

    def __init__(self, columns: int, sparsity: WeightSparsity, *, device: str | torch.device = "cpu"):
        self.columns, self.sparsity = columns, sparsity
        self.scaler_row = torch.zeros(columns, dtype=torch.float32, device=device)  # mean of X_j²
        self.tokens = 0

    @torch.no_grad()
    def add_batch(self, X_hat: torch.Tensor, X_tilde: torch.Tensor | None = None) -> None:
        """Accumulate `X_hat [..., k]` (the inputs of the partly pruned model); `X_tilde` is unused."""
        X = X_hat.reshape(-1, self.columns).float()
        total = self.tokens + X.shape[0]
        self.scaler_row.mul_(self.tokens / total).add_(X.square().sum(0), alpha=1.0 / total)
        self.tokens = total

    @torch.no_grad()
    def prune(self, W: torch.Tensor) -> Pruned:
        """`W [n, k]` pruned (float32 copy with exact zeros)."""
        W = W.float()
        S = W.abs() * self.scaler_row.sqrt()
        if self.sparsity.is_nm:
            mask = nm_lowest(S, self.sparsity.n, self.sparsity.m)
        else:
            mask = row_lowest(S, self.sparsity.fraction)
        return Pruned(W.masked_fill(mask, 0.0), None)

    def free(self) -> None:
        self.scaler_row = None


class MagnitudePruner:
    """Magnitude: the lowest `p_w` of `|W|` over the whole matrix (N:M: per group of M)."""

    def __init__(self, sparsity: WeightSparsity):
        self.sparsity = sparsity

    def add_batch(self, X_hat: torch.Tensor, X_tilde: torch.Tensor | None = None) -> None:
        """Magnitude pruning uses no data."""

    @torch.no_grad()
    def prune(self, W: torch.Tensor) -> Pruned:
        W = W.float()
        return Pruned(W.masked_fill(select(W.abs(), self.sparsity), 0.0), None)

    def free(self) -> None:
        """Nothing to free."""
