"""Oracles shared by the CPU and CUDA kernel tests: the float64 results the kernels are held to,
the error rule, and the solver's block problems."""

from __future__ import annotations

import torch

from duogpt import BitmapWeight, ops
from duogpt.ops import reference


def assert_close_to_exact(got, want_lowp, x, w, rule=None):
    """`got` (`[b, n]`, any device) against `sparsify(x) @ w.T` in float64, `sparsify` being the
    activation rule `rule` (keyword arguments of `ops.spmspv`; none keeps every entry).

    flash-attention's rule, per output: each output's error, in units of its own scale
    `sum_j |sparsify(x)_j * w_ij|`, is at most twice the largest such error of the float32
    reference `want_lowp` (rounded to the output dtype), plus 1e-5. Per output, so that a small
    output is held to its own size rather than to one ulp of the largest output.
    """
    keep = reference.activation_keep_mask(x.cpu(), **(rule or {}))
    xs = torch.where(keep, x.cpu().double(), torch.zeros((), dtype=torch.float64))
    w = w.cpu().double()
    exact, scale = xs @ w.t(), xs.abs() @ w.abs().t()
    scale = scale.clamp_min(torch.finfo(torch.float64).tiny)  # an output of scale 0 must be exact

    def worst_scaled_error(y):
        return ((y.cpu().double() - exact).abs() / scale).max().item()

    err, ref_err = worst_scaled_error(got), worst_scaled_error(want_lowp)
    assert err <= 2 * ref_err + 1e-5, f"scaled error {err:.3g} vs reference's {ref_err:.3g}"


def block_problem(n: int, B: int, with_P: bool):
    """A block of weights `[n, B]`, the upper Cholesky factor U1 of a random H^-1, and a small P1."""
    X = torch.randn(B, 4 * B)
    H = X @ X.t() / (4 * B) + 0.1 * torch.eye(B)
    U1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    P1 = 0.1 * torch.randn(B, B).triu(1) if with_P else None
    return torch.randn(n, B), U1.contiguous(), P1


def assert_dropped_channels_are_never_read(device, n: int, k: int) -> None:
    """`ops.spmspv` on `device` never reads the weights of an input channel that no token keeps,
    whether its activations are zero or dropped by the top-k rule: those weights are NaN here.
    The reference skips them too."""

    def check(x, w, **rule):
        bw = BitmapWeight.from_dense(w)
        y = ops.spmspv(x.to(device), bw.to(device), **rule)
        assert y.isfinite().all()
        want = reference.spmspv(x, bw.bitmap, bw.values, bw.offsets, n, **rule)
        torch.testing.assert_close(y.cpu(), want)

    w = torch.randn(n, k)
    x = torch.randn(4, k)
    x[:, ::2] = 0  # even channels are zero for every token...
    w[:, ::2] = float("nan")  # ...so their NaN weights must never be touched
    x[0, 1], x[1:, 1] = 5.0, 0.0  # channel 1 is live for one token only
    check(x, w)
    drop = k // 4
    x = torch.randn(2, k)
    x = x.sign() * (x.abs() + 0.1)  # kept magnitudes >= 0.1: no ties with the dropped ones
    x[:, :drop] = 1e-3  # the smallest magnitudes of both tokens
    w = torch.randn(n, k)
    w[:, :drop] = float("nan")
    check(x, w, topk_fraction=drop / k)
