"""Oracles shared by the CPU and CUDA kernel tests: the float64 results the kernels are held to,
the error rule, and the solver's block problems."""

from __future__ import annotations

import torch

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
