"""Pure-PyTorch references of every native kernel: the oracle the tests compare against.

They favour clarity over speed and compute in float32 (float64 where noted). Each mirrors one op
of `duogpt.ops` argument for argument; the bitmap layout is described in docs/format.md.
"""

from __future__ import annotations

import math

import torch

TILE_ROWS = 1024  # rows per offset tile (docs/format.md)
WORD_BITS = 32


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| in float32 with NaN ranked as +inf: every non-finite activation ties for the largest
    magnitude, so the rules always keep it."""
    return x.float().abs().nan_to_num(nan=math.inf, posinf=math.inf)


def activation_keep_mask(
    x: torch.Tensor, threshold: torch.Tensor | None = None, topk_fraction: float | None = None
) -> torch.Tensor:
    """Which activations the rule keeps.

    Args:
        x: `[b, k]` activations, any float dtype, any device.
        threshold: `[k]` float32: keep `|x[t, j]| > threshold[j]` (TEAL's rule).
        topk_fraction: `p_a` in [0, 1): per token, the value at ascending index `floor(k * p_a)`
            of the sorted `|x|` is the token's threshold and entries `>=` it are kept, so exactly
            `floor(k * p_a)` entries are dropped when there are no ties (the paper's rule).

    Returns:
        `[b, k]` bool, True where kept. With neither rule, everything is kept.
    """
    mag = _magnitude(x)
    if threshold is not None:
        return mag > threshold.float()
    if topk_fraction is not None:
        k = x.shape[-1]
        drop = math.floor(k * topk_fraction)
        tau = mag.kthvalue(drop + 1, dim=-1, keepdim=True).values
        return mag >= tau
    return torch.ones_like(mag, dtype=torch.bool)


def sparsify(
    x: torch.Tensor, threshold: torch.Tensor | None = None, topk_fraction: float | None = None
) -> torch.Tensor:
    """x with the dropped activations set to zero; same shape, dtype and device."""
    return torch.where(activation_keep_mask(x, threshold, topk_fraction), x, torch.zeros_like(x))


def bitmap_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a dense `[n, k]` weight; returns `(bitmap [k, ceil(n/32)] int32, values [nnz] w.dtype,
    offsets [k * ceil(n/1024) + 1] int32)`."""
    n, k = w.shape
    words, tiles = -(-n // WORD_BITS), -(-n // TILE_ROWS)
    nz = (w != 0).t()  # [k, n]: channel-major
    padded = torch.zeros(k, words * WORD_BITS, dtype=torch.int64, device=w.device)
    padded[:, :n] = nz.long()
    weights = torch.bitwise_left_shift(torch.ones(WORD_BITS, dtype=torch.int64, device=w.device),
                                       torch.arange(WORD_BITS, device=w.device))
    bitmap = (padded.view(k, words, WORD_BITS) * weights).sum(-1)
    # Two's complement by hand: torch does not define an int64 -> int32 cast out of range (on CPU it
    # wraps today, which is why a mutation test could not tell this line from none).
    bitmap = torch.where(bitmap >= 2**31, bitmap - 2**32, bitmap).to(torch.int32)
    tile_counts = torch.zeros(k, tiles * TILE_ROWS, dtype=torch.int64, device=w.device)
    tile_counts[:, :n] = nz.long()
    counts = tile_counts.view(k, tiles, TILE_ROWS).sum(-1).flatten()
    offsets = torch.zeros(k * tiles + 1, dtype=torch.int64, device=w.device)
    offsets[1:] = counts.cumsum(0)
    values = w.t()[nz]  # boolean indexing walks channel by channel, rows ascending
    return bitmap, values, offsets.to(torch.int32)


def bitmap_unpack(
    bitmap: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, out_features: int
) -> torch.Tensor:
    """Dense `[out_features, k]` weight of `values.dtype` from its packed form."""
    k = bitmap.shape[0]
    bits = torch.bitwise_right_shift(bitmap.long().unsqueeze(-1) & 0xFFFFFFFF,
                                     torch.arange(WORD_BITS, device=bitmap.device)) & 1
    nz = bits.flatten(1)[:, :out_features].bool()  # [k, n]
    wt = torch.zeros(k, out_features, dtype=values.dtype, device=values.device)
    wt[nz] = values
    return wt.t().contiguous()


def spmspv(
    x: torch.Tensor,
    bitmap: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    out_features: int,
    threshold: torch.Tensor | None = None,
    topk_fraction: float | None = None,
) -> torch.Tensor:
    """`y [b, n] = sparsify(x) [b, k] @ W.T` in float32, returned in `x.dtype`.

    Only what the kernels read contributes: the channels some token keeps, and in a channel with a
    non-finite activation only the non-zero weights. So a NaN weight in a channel no token keeps
    stays out, and a non-finite activation reaches exactly the outputs whose weight in its channel
    is non-zero (a dense matmul would turn `inf * 0` into NaN).
    """
    xs = sparsify(x, threshold, topk_fraction).float()
    w = bitmap_unpack(bitmap, values, offsets, out_features).float()
    finite, active = xs.isfinite().all(0), (xs != 0).any(0)
    y = xs[:, finite & active] @ w[:, finite & active].t()
    for j in (~finite).nonzero().flatten().tolist():
        col = w[:, j]
        y = y + torch.where(col != 0, xs[:, j, None] * col, torch.zeros_like(col))
    return y.to(x.dtype)


def dense_gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`y [b, n] = x [b, k] @ w [n, k].T` in float32, returned in `x.dtype`."""
    return (x.float() @ w.float().t()).to(x.dtype)


def nm_prune_mask(scores: torch.Tensor, prunen: int) -> torch.Tensor:
    """For `[rows, M]` scores, True at the `prunen` smallest of each row (ties: lower index first)."""
    order = torch.argsort(scores, dim=1, stable=True)[:, :prunen]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)


def obs_prune_block(
    W1: torch.Tensor,
    U1: torch.Tensor,
    P1: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    prunen: int = 0,
    prunem: int = 0,
    score_coef: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The solver's column loop over one block (docs/algorithm.md 3.5, step 6.3), in place on `W1`.

    Args:
        W1: `[n, B]` float32 block weights; on return, the pruned block.
        U1: `[B, B]` float32, the block of the upper Cholesky factor of `H^-1`.
        P1: `[B, B]` float32 compensation term (DuoGPT), or None (SparseGPT).
        mask: `[n, B]` bool, True = prune (unstructured); or None for N:M.
        prunen, prunem: the N:M rule, applied every M columns on the updated weights.
        score_coef: `[B]` float32; N:M scores are `W1[:, i:i+M]**2 * score_coef[i:i+M]`.

    Returns:
        `(Err1, Wpre1)`, both `[n, B]` float32: `(w - q) / U1[i, i]` and the pre-decision `w`.
    """
    B = W1.shape[1]
    Err1 = torch.zeros_like(W1)
    Wpre1 = torch.zeros_like(W1)
    for i in range(B):
        if mask is None and i % prunem == 0:
            scores = W1[:, i:i + prunem] ** 2 * score_coef[i:i + prunem]
            nm = nm_prune_mask(scores, prunen)
        prune = mask[:, i] if mask is not None else nm[:, i % prunem]
        w = W1[:, i].clone()
        q = torch.where(prune, torch.zeros_like(w), w)
        e = (w - q) / U1[i, i]
        W1[:, i] = q
        update = e[:, None] * U1[i, i + 1:]
        if P1 is not None:
            update = update - w[:, None] * P1[i, i + 1:]
        W1[:, i + 1:] -= update
        Err1[:, i] = e
        Wpre1[:, i] = w
    return Err1, Wpre1
