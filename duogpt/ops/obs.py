"""`obs_prune_block`: the solver's fused column loop over one block (docs/algorithm.md 3.5,
step 6.3)."""

from __future__ import annotations

import torch

from duogpt import _native
from duogpt.ops._checks import check_same_device, check_tensor, require
from duogpt.ops._library import define


def _check(W1, U1, P1, mask, prunen, prunem, score_coef) -> None:
    check_tensor(W1, "W1", dtypes=(torch.float32,), dim=2)
    n, B = W1.shape
    check_tensor(U1, "U1", dtypes=(torch.float32,), dim=2)
    require(tuple(U1.shape) == (B, B), lambda: f"U1 must be [{B}, {B}] for a block of "
            f"{B} columns, got {tuple(U1.shape)}")
    if P1 is not None:
        check_tensor(P1, "P1", dtypes=(torch.float32,), dim=2)
        require(tuple(P1.shape) == (B, B), lambda: f"P1 must be [{B}, {B}], got "
                f"{tuple(P1.shape)}")
    check_same_device(("W1", W1), ("U1", U1), ("P1", P1), ("mask", mask), ("score_coef", score_coef))
    if mask is not None:
        check_tensor(mask, "mask", dtypes=(torch.bool,), dim=2)
        require(tuple(mask.shape) == (n, B), lambda: f"mask must be [{n}, {B}] like W1, "
                f"got {tuple(mask.shape)}")
        require(prunem == 0 and score_coef is None,
                lambda: "give either a mask or an N:M rule (prunen, prunem, score_coef)")
        return
    require(prunen != 0 or prunem != 0, lambda: "give a mask or an N:M rule (prunen, prunem, "
            "score_coef); got neither")
    require(0 < prunen < prunem <= 64 and B % prunem == 0, lambda: f"N:M pruning needs "
            f"0 < N < M <= 64 with M dividing the block width {B}, got {prunen}:{prunem}")
    require(score_coef is not None, lambda: "N:M pruning needs score_coef [B]")
    check_tensor(score_coef, "score_coef", dtypes=(torch.float32,), dim=1)
    require(score_coef.shape[0] == B, lambda: f"score_coef must have {B} entries, got "
            f"{score_coef.shape[0]}")


def _check_not_aliased(W1, U1, P1, mask, score_coef) -> None:
    """W1 is updated in place, so an input sharing its memory would be read half-updated."""
    storage = W1.untyped_storage().data_ptr()
    if storage == 0:  # no rows: nothing to share (every empty storage reports address 0)
        return
    for name, t in (("U1", U1), ("P1", P1), ("mask", mask), ("score_coef", score_coef)):
        if t is not None and t.untyped_storage().data_ptr() == storage:
            raise ValueError(f"{name} shares memory with W1, which obs_prune_block updates in "
                             f"place; pass a copy ({name}.clone())")


def _fake(W1, U1, P1, mask, prunen, prunem, score_coef):
    _check(W1, U1, P1, mask, prunen, prunem, score_coef)
    return torch.empty_like(W1), torch.empty_like(W1)


def _args(W1, U1, P1, mask, prunen, prunem, score_coef, Err1, Wpre1):
    return (W1.data_ptr(), W1.shape[0], W1.shape[1], U1.data_ptr(), _native.ptr(P1),
            _native.ptr(mask), prunen, prunem, _native.ptr(score_coef), Err1.data_ptr(),
            Wpre1.data_ptr())


def _cpu(W1, U1, P1, mask, prunen, prunem, score_coef):
    _check(W1, U1, P1, mask, prunen, prunem, score_coef)
    _check_not_aliased(W1, U1, P1, mask, score_coef)
    Err1, Wpre1 = torch.empty_like(W1), torch.empty_like(W1)
    _native.lib().obs_prune_block_cpu(*_args(W1, U1, P1, mask, prunen, prunem, score_coef, Err1, Wpre1))
    return Err1, Wpre1


def _cuda(W1, U1, P1, mask, prunen, prunem, score_coef):
    _check(W1, U1, P1, mask, prunen, prunem, score_coef)
    _check_not_aliased(W1, U1, P1, mask, score_coef)
    C = _native.cuda_lib(W1.device)
    # Checked here as well as in C++, for a message that names the fix.
    require(W1.shape[1] <= C.max_obs_block, lambda: f"obs_prune_block on CUDA handles blocks of "
            f"at most {C.max_obs_block} columns, got {W1.shape[1]}; use narrower blocks (the "
            f"solver's default is 128)")
    Err1, Wpre1 = torch.empty_like(W1), torch.empty_like(W1)
    with torch.cuda.device(W1.device):
        C.obs_prune_block_cuda(*_args(W1, U1, P1, mask, prunen, prunem, score_coef, Err1, Wpre1),
                               _native.stream(W1))
    return Err1, Wpre1


define("obs_prune_block(Tensor(a!) W1, Tensor U1, Tensor? P1, Tensor? mask, int prunen, "
       "int prunem, Tensor? score_coef) -> (Tensor Err1, Tensor Wpre1)",
       fake=_fake, cpu=_cpu, cuda=_cuda)
