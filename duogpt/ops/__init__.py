"""duogpt's kernels as `torch.ops.duogpt.*` ops, with the Python-facing wrappers.

Importing this package registers the ops (`bitmap_pack`, `bitmap_unpack`, `spmspv`, `dense_gemv`,
`obs_prune_block`); `duogpt.ops.reference` holds their pure-PyTorch oracles.
"""

from __future__ import annotations

import torch

from duogpt.ops import bitmap as _bitmap  # noqa: F401  (registers the ops)
from duogpt.ops import gemv as _gemv  # noqa: F401
from duogpt.ops import obs as _obs  # noqa: F401


def spmspv(x: torch.Tensor, w, *, threshold: torch.Tensor | None = None,
           topk_fraction: float | None = None) -> torch.Tensor:
    """`y = sparsify(x) @ W.T` with W a `duogpt.BitmapWeight`.

    Args:
        x: `[b, in]` activations, b = 1..8, float32/float16/bfloat16, contiguous, on w's device.
        w: `BitmapWeight` of shape `(out, in)`.
        threshold: `[in]` float32: keep `|x| > threshold` per input channel (TEAL's rule).
        topk_fraction: `p_a` in [0, 1): per token, drop the `floor(in * p_a)` smallest `|x|`.

    Returns:
        `[b, out]` in x's dtype. Input channels whose activation is zero (or dropped) for every
        token are never read. NaN/Inf activations are kept and propagate through the non-zero
        weights of their channel. Repeated calls give the same bits; on CPU the summation order
        depends on the thread count, so the last bits may differ between counts.

    Inference only: the op has no backward, and raises RuntimeError where autograd records x (or
    the values). `SparseLinear` runs a dense GEMM instead where autograd needs x's gradient.
    """
    return torch.ops.duogpt.spmspv(x, w.bitmap, w.values, w.offsets, w.shape[0], threshold,
                                   topk_fraction)


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`y [b, out] = x [b, in] @ w [out, in].T` with float32 accumulation, b = 1..8: the dense
    baseline of `spmspv` (same storage dtypes, same threading). NaN/Inf in x propagate as in any
    dense matmul (an Inf times a zero weight is NaN). Inference only, like `spmspv`."""
    return torch.ops.duogpt.dense_gemv(x, w)


def obs_prune_block(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor | None = None, *,
                    mask: torch.Tensor | None = None, nm: tuple[int, int] | None = None,
                    score_coef: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one block of the solver in place; see `duogpt.ops.reference.obs_prune_block`.

    Args:
        W1: `[n, B]` float32 block (updated by earlier blocks); on return the pruned block.
        U1: `[B, B]` float32 diagonal block of the upper Cholesky factor of `H^-1`. Its
            diagonal must be positive and finite: the CPU op raises ValueError otherwise;
            on CUDA, where checking would wait on the GPU, such a column's errors are non-finite.
        P1: `[B, B]` float32 DuoGPT compensation block, or None for SparseGPT.
        mask: `[n, B]` bool, True = prune; exclusive with `nm`.
        nm: `(N, M)`: prune the N lowest-scoring of every M weights, scored inside the loop as
            `W1**2 * score_coef` on the updated weights.
        score_coef: `[B]` float32 per-column score factor (N:M only).

    Returns:
        `(Err1, Wpre1)`: `[n, B]` float32 scaled errors and pre-decision weights for the lazy update.
    """
    prunen, prunem = nm if nm is not None else (0, 0)
    return torch.ops.duogpt.obs_prune_block(W1, U1, P1, mask, prunen, prunem, score_coef)
