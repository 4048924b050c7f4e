"""Oracles shared by the CPU and CUDA kernel tests: the float64 results the kernels are held to,
the error rule, and the solver's block problems."""

from __future__ import annotations

import torch

from duogpt import BitmapWeight, ops
from duogpt.ops import reference


def exact_spmspv(x, w, kwargs):
    """`sparsify(x) @ w.T` in float64 (CPU), with the activation rule `kwargs` of `ops.spmspv`."""
    keep = reference.activation_keep_mask(x, **kwargs)
    xs = torch.where(keep, x.double(), torch.zeros((), dtype=torch.float64))
    return xs @ w.double().t()


def assert_close_to_exact(got, want_lowp, want_exact):
    """got's error against the float64 result is at most twice that of the float32 reference
    rounded to the output dtype, plus a small floor (flash-attention's rule)."""
    got, want_lowp = got.cpu(), want_lowp.cpu()
    err = (got.double() - want_exact).abs().max().item()
    ref_err = (want_lowp.double() - want_exact).abs().max().item()
    floor = 1e-5 * max(want_exact.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, f"error {err:.3g} vs reference error {ref_err:.3g}"


def block_problem(n: int, B: int, with_P: bool):
    """A block of weights `[n, B]`, the upper Cholesky factor U1 of a random H^-1, and a small P1."""
    X = torch.randn(B, 4 * B)
    H = X @ X.t() / (4 * B) + 0.1 * torch.eye(B)
    U1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    P1 = 0.1 * torch.randn(B, B).triu(1) if with_P else None
    return torch.randn(n, B), U1.contiguous(), P1


def assert_dropped_channels_are_never_read(device, n: int, k: int) -> None:
    """`ops.spmspv` on `device` never reads the weights of an input channel that no token keeps,
    whether its activations are zero or dropped by the top-k rule: those weights are NaN here."""
    w = torch.randn(n, k)
    x = torch.randn(4, k)
    x[:, ::2] = 0  # even channels are zero for every token...
    w[:, ::2] = float("nan")  # ...so their NaN weights must never be touched
    x[0, 1], x[1:, 1] = 5.0, 0.0  # channel 1 is live for one token only
    assert ops.spmspv(x.to(device), BitmapWeight.from_dense(w).to(device)).isfinite().all()
    drop = k // 4
    x = torch.randn(2, k)
    x = x.sign() * (x.abs() + 0.1)  # kept magnitudes >= 0.1: no ties with the dropped ones
    x[:, :drop] = 1e-3  # the smallest magnitudes of both tokens
    w = torch.randn(n, k)
    w[:, :drop] = float("nan")
    y = ops.spmspv(x.to(device), BitmapWeight.from_dense(w).to(device), topk_fraction=drop / k)
    assert y.isfinite().all()
