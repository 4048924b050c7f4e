"""The OBS solver of DuoGPT (docs/algorithm.md 3) and, with one stream, of SparseGPT (4.1).

One `OBSSolver` serves the projections that share one input (`[q, k, v]`, `[o]`, `[gate, up]`,
`[down]`): it accumulates `H`, `Delta` and `a` once, factorises once, and prunes each sibling's
weight with the shared factors. Names follow the paper: `W` (n x k, rows = outputs), `H = X̂X̂ᵀ/N`,
`Delta = ΔX X̂ᵀ/N`, `a = diag(ΔX ΔXᵀ)/N`, `U` the upper Cholesky factor of `H⁻¹`,
`Q = Delta Uᵀ`, `b`, `c`, `P = α (Q⊙M) U`, `Err1`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch

from duogpt import ops  # noqa: F401  (registers torch.ops.duogpt.obs_prune_block)
from duogpt.solver.masks import WeightSparsity, lowest

logger = logging.getLogger(__name__)

# Dampening escalates x10 from percdamp on a failed Cholesky up to this fraction of mean(diag H);
# at 10 the Hessian is dominated by the identity and pruning degrades to magnitude pruning.
MAX_PERCDAMP = 10.0


class Factors(NamedTuple):
    """What the column loop needs, in processing (act_order) order.

    Attributes:
        U: `[k, k]` float32 upper Cholesky factor of `(H + λI)⁻¹`.
        P: `[k, k]` float32 compensation term `α (Q⊙M) U`, or None (one stream: SparseGPT).
        coef: `[k]` float32 score factor: `S = W² · coef` (docs/algorithm.md 3.2), 0 on dead inputs.
        dead: `[k]` bool, inputs that were zero for every calibration token.
        perm: `[k]` int64 processing order of the input channels, or None.
        percdamp: the dampening that made `H + λI` positive definite.
    """

    U: torch.Tensor
    P: torch.Tensor | None
    coef: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor | None
    percdamp: float


class Pruned(NamedTuple):
    """A pruned weight `[n, k]` float32 and the dampening used (None for methods without one)."""

    weight: torch.Tensor
    percdamp: float | None


def inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor | None:
    """`U` with `(H + λI)⁻¹ = UᵀU`, `λ = percdamp · mean(diag H)`; None if not positive definite.

    Args:
        H: `[k, k]` symmetric, float32 or float64.
    """
    Hd = H.clone()
    Hd.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(Hd)
    if info.item():
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() or not U.diagonal().isfinite().all():
        return None
    return U


def compensation(U: torch.Tensor, Delta: torch.Tensor | None, a: torch.Tensor | None,
                 alpha: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The precomputed score factor and compensation term (docs/algorithm.md 3.1 item 3, 3.2).

    Args:
        U: `[k, k]` upper Cholesky factor of `H⁻¹`.
        Delta: `[k, k]` `ΔX X̂ᵀ / N`, or None for one stream (SparseGPT).
        a: `[k]` `diag(ΔX ΔXᵀ) / N`, or None.
        alpha: scale of every residual term.

    Returns:
        `(P [k, k] or None, coef [k])`: `P = α (Q⊙M) U` and `coef = 1/U_pp² + α (a − b + 2c)`
        with `Q = Delta Uᵀ`, `b_p = Σ_{j>p} Q_pj²`, `c_p = Q_pp / U_pp`; same dtype as U.
    """
    d = U.diagonal()
    coef = d.pow(-2)
    if Delta is None:
        return None, coef
    Q = Delta @ U.T
    c = Q.diagonal() / d
    QM = Q.triu_(1)  # Q ⊙ M, in place: Q itself is not needed any more
    b = torch.linalg.vector_norm(QM, dim=1).square()
    P = torch.matmul(QM, U).mul_(alpha)
    return P, coef + alpha * (a - b + 2 * c)


class OBSSolver:
    """Blockwise OBS pruning of the weights that share one input.

    DuoGPT (two streams) fits the pruned weights on sparse-stream inputs `X̂` to the dense model's
    output on `X̃`; SparseGPT (one stream, no `Delta`) is the special case `ΔX = 0`.

    Args:
        columns: `k`, the shared input width.
        sparsity: the target weight sparsity.
        two_stream: accumulate `Delta` and `a` from dense-stream inputs (DuoGPT).
        alpha: DuoGPT's residual scale (ignored with one stream).
        percdamp: initial dampening, escalated x10 on a failed Cholesky.
        blocksize: columns per block of the column loop (the lazy update happens between blocks).
        act_order: process input channels by descending `diag H` (not with N:M).
        device: where the statistics live and the solve runs.
        label: names the group in log messages and errors.
        block_kernel: the fused column loop, with the schema of `torch.ops.duogpt.obs_prune_block`;
            tests and benchmarks pass `duogpt.ops.reference.obs_prune_block`.
    """

    def __init__(self, columns: int, sparsity: WeightSparsity, *, two_stream: bool,
                 alpha: float = 0.125, percdamp: float = 0.01, blocksize: int = 128,
                 act_order: bool = True, device: str | torch.device = "cpu", label: str = "",
                 block_kernel: Callable = torch.ops.duogpt.obs_prune_block):
        if sparsity.is_nm and (act_order or blocksize % sparsity.m):
            raise ValueError(f"N:M pruning needs act_order off (it forms the groups in permuted "
                             f"order) and a blocksize divisible by M = {sparsity.m}")
        self.columns, self.sparsity = columns, sparsity
        self.alpha, self.percdamp, self.blocksize, self.act_order = alpha, percdamp, blocksize, act_order
        self.label, self.block_kernel = label, block_kernel
        zeros = {"dtype": torch.float32, "device": device}
        self.H = torch.zeros(columns, columns, **zeros)
        self.Delta = torch.zeros(columns, columns, **zeros) if two_stream else None
        self.a = torch.zeros(columns, **zeros) if two_stream else None
        self.tokens = 0
        self._factors: Factors | None = None

    @torch.no_grad()
    def add_batch(self, X_hat: torch.Tensor, X_tilde: torch.Tensor | None = None) -> None:
        """Accumulate the statistics of a batch of tokens (running means in float32).

        Args:
            X_hat: `[..., k]` sparse-stream inputs (any float dtype, on the solver's device).
            X_tilde: `[..., k]` dense-stream inputs of the same tokens (two streams only).
        """
        X = X_hat.reshape(-1, self.columns).float()
        total = self.tokens + X.shape[0]
        keep, scale = self.tokens / total, 1.0 / total
        self.H.mul_(keep).addmm_(X.T, X, alpha=scale)
        if self.Delta is not None:
            dX = X_tilde.reshape(-1, self.columns).float() - X
            self.Delta.mul_(keep).addmm_(dX.T, X, alpha=scale)
            self.a.mul_(keep).add_(dX.square().sum(0), alpha=scale)
        self.tokens = total

    def factors(self) -> Factors:
        """Factorise the accumulated statistics once (they are consumed) and cache the result."""
        if self._factors is None:
            self._factors = self._factorize()
            self.H = self.Delta = self.a = None
        return self._factors

    def _factorize(self) -> Factors:
        H, Delta, a = self.H, self.Delta, self.a
        # Checked here, not per batch: one sync per group. No dampening could fix these.
        if not all(t.isfinite().all() for t in (H, Delta, a) if t is not None):
            raise ValueError(f"{self.label}: the calibration inputs' statistics hold NaN or Inf (an "
                             f"activation overflowed its dtype, or the model has non-finite "
                             f"weights); prune in float32 (--dtype float32)")
        # Dead inputs (never non-zero in X̂) carry nothing X̂ could use: H_dd = 1 keeps H invertible
        # without coupling them, and they are always pruned (like SparseGPT, a block may exceed
        # p_w, an N:M group N). Their weights are not zeroed up front, so with two streams the
        # column step still pushes their dense-stream share w_d X̃_d onto later columns
        # (docs/algorithm.md 3.5, step 2); a dead weight kept as well would count that share twice.
        dead = H.diagonal() == 0
        H.diagonal()[dead] = 1.0
        perm = None
        if self.act_order:
            perm = torch.argsort(H.diagonal(), descending=True)
            H, dead = H[perm][:, perm], dead[perm]
            if Delta is not None:
                Delta, a = Delta[perm][:, perm], a[perm]
        percdamp = self.percdamp
        while (U := inverse_factor(H, percdamp)) is None:
            if percdamp * 10 > MAX_PERCDAMP:
                raise ValueError(f"{self.label}: H is not positive definite even with percdamp "
                                 f"{percdamp:g}; use more calibration samples (--nsamples) or a "
                                 f"longer --seqlen")
            logger.warning("%s: Cholesky failed with percdamp %g; retrying with %g", self.label,
                           percdamp, percdamp * 10)
            percdamp *= 10
        del H
        P, coef = compensation(U, Delta, a, self.alpha)
        coef[dead] = 0.0
        return Factors(U, P, coef, dead, perm, percdamp)

    @torch.no_grad()
    def prune(self, W: torch.Tensor) -> Pruned:
        """Prune one weight of the group (docs/algorithm.md 3.5, steps 6-7).

        Args:
            W: `[n, k]` weight (any float dtype, on the solver's device); not modified.

        Returns:
            The pruned weight `[n, k]` float32 with exact zeros, and the dampening used.

        Raises:
            FloatingPointError: the result has NaN or Inf.
        """
        U, P, coef, dead, perm, percdamp = self.factors()
        W = W.float().clone() if perm is None else W.float()[:, perm]
        k, B = self.columns, self.blocksize
        for i1 in range(0, k, B):
            i2 = min(i1 + B, k)
            W1 = W[:, i1:i2].contiguous()
            U1 = U[i1:i2, i1:i2].contiguous()
            P1 = None if P is None else P[i1:i2, i1:i2].contiguous()
            coef1 = coef[i1:i2].contiguous()
            if self.sparsity.is_nm:
                Err1, Wpre1 = self.block_kernel(W1, U1, P1, None, self.sparsity.n, self.sparsity.m,
                                                coef1)
                # The rule prunes at most N dead inputs of a group (score 0). Pruning the rest
                # afterwards is exact: U has no entries off the diagonal in a dead row or column,
                # so their error reaches no other column.
                W1[:, dead[i1:i2]] = 0.0
            else:
                # Adaptive mask: the p_w fraction of lowest scores over the whole n x B block.
                mask = lowest(W1.square() * coef1, int(W1.numel() * self.sparsity.fraction))
                mask |= dead[i1:i2]
                Err1, Wpre1 = self.block_kernel(W1, U1, P1, mask, 0, 0, None)
            W[:, i1:i2] = W1
            if i2 < k:  # lazy update of the columns right of the block: one GEMM per term
                W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
                if P is not None:
                    W[:, i2:].addmm_(Wpre1, P[i1:i2, i2:])
        if perm is not None:
            W = W[:, torch.argsort(perm)]
        if not W.isfinite().all():
            raise FloatingPointError(f"{self.label}: the pruned weight has NaN/Inf; raise "
                                     f"--percdamp or use more calibration samples")
        return Pruned(W, percdamp)

    def free(self) -> None:
        """Drop the statistics and factors."""
        self.H = self.Delta = self.a = self._factors = None
