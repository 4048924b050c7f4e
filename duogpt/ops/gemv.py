"""Decode GEMV ops: `spmspv` (bitmap weight x sparsified activations) and its dense baseline.

Both compute `y [b, n] = x [b, k] @ W.T` for b = 1..8 tokens with float32 accumulation; x and y are
float32, float16 or bfloat16 (y takes x's dtype), the weight float32, float16 or bfloat16.
"""

from __future__ import annotations

import torch

from duogpt import _native
from duogpt.ops._checks import FLOAT_DTYPES, check_fraction, check_same_device, check_tensor, require
from duogpt.ops._library import define
from duogpt.ops.bitmap import _check_unpack

MAX_TOKENS = 8  # csrc/include/duogpt/spmspv.h kMaxTokens


def _check_x(x: torch.Tensor, in_features: int) -> None:
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, dim=2)
    require(1 <= x.shape[0] <= MAX_TOKENS, lambda: f"x must hold 1 to {MAX_TOKENS} "
            f"tokens (rows), got {x.shape[0]}; use a dense GEMM for longer inputs")
    require(x.shape[1] == in_features, lambda: f"x has {x.shape[1]} features but the "
            f"weight has {in_features} input channels")


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records any of `tensors` (None skipped): grad mode is on and one of them
    requires grad. The kernels have no backward: the engine's modules then take a dense path, and
    the ops refuse."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_no_grad(op: str, *named: tuple[str, torch.Tensor]) -> None:
    """Refuse inputs that autograd records: PyTorch would otherwise return no gradient for them
    with only a warning."""
    for name, t in named:
        if records_grad(t):
            raise RuntimeError(f"duogpt::{op} has no backward, but {name} requires grad: call it "
                               f"under torch.no_grad() or torch.inference_mode(), or use the "
                               f"engine's modules (SparseLinear, DenseGemvLinear), which run a "
                               f"dense GEMM where autograd records")


def check_activation_rule(x: torch.Tensor, threshold: torch.Tensor | None,
                          topk_fraction: float | None) -> None:
    """The activation rule for `x [tokens, in]`: at most one of a `[in]` float32 threshold on x's
    device and a top-k fraction in [0, 1)."""
    require(threshold is None or topk_fraction is None,
            lambda: "give either threshold or topk_fraction, not both")
    # A decode step checks its rule per projection: a valid threshold passes one expression, and
    # only a wrong one reaches the checks that name the problem, at 2.7x the cost
    # (bench/results/cpu-rule-check-per-call-2026-11-24.md).
    if threshold is not None and not (threshold.dtype == torch.float32 and threshold.is_contiguous()
                                      and threshold.shape == (x.shape[1],)
                                      and threshold.device == x.device):
        check_tensor(threshold, "threshold", dtypes=(torch.float32,), dim=1)
        require(threshold.shape[0] == x.shape[1], lambda: f"threshold has "
                f"{threshold.shape[0]} entries, expected one per input channel ({x.shape[1]})")
        check_same_device(("x", x), ("threshold", threshold))
    check_fraction(topk_fraction, "topk_fraction")


def _check_spmspv(x, bitmap, values, offsets, out_features, threshold, topk_fraction) -> None:
    _check_unpack(bitmap, values, offsets, out_features)
    _check_x(x, bitmap.shape[0])
    check_same_device(("x", x), ("values", values))
    check_activation_rule(x, threshold, topk_fraction)
    _check_no_grad("spmspv", ("x", x), ("values", values))


def _spmspv_fake(x, bitmap, values, offsets, out_features, threshold=None, topk_fraction=None):
    _check_spmspv(x, bitmap, values, offsets, out_features, threshold, topk_fraction)
    return x.new_empty(x.shape[0], out_features)


def _spmspv_args(x, bitmap, values, offsets, out_features, threshold, topk_fraction, y):
    return (x.data_ptr(), _native.dtype_code(x), x.shape[0], x.shape[1], bitmap.data_ptr(),
            values.data_ptr(), offsets.data_ptr(), _native.dtype_code(values), out_features,
            _native.ptr(threshold), -1.0 if topk_fraction is None else topk_fraction, y.data_ptr(),
            values.numel())


def _run_spmspv_cpu(x, bitmap, values, offsets, out_features, threshold, topk_fraction):
    y = x.new_empty(x.shape[0], out_features)
    _native.lib().spmspv_cpu(*_spmspv_args(x, bitmap, values, offsets, out_features, threshold,
                                           topk_fraction, y))
    return y


def _spmspv_cpu(x, bitmap, values, offsets, out_features, threshold=None, topk_fraction=None):
    _check_spmspv(x, bitmap, values, offsets, out_features, threshold, topk_fraction)
    return _run_spmspv_cpu(x, bitmap, values, offsets, out_features, threshold, topk_fraction)


def _direct_cpu(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a `*_validated` call may skip the dispatcher: eager (not traced) and on CPU. The
    dispatcher's round trip into the Python kernel plus the weight's checks cost ~11-25 us a call
    on this project's 2-core CI machine, as much as the kernel itself on a 192 x 576 projection."""
    return not torch.compiler.is_compiling() and x.is_cpu and w.is_cpu


def spmspv_validated(x, bitmap, values, offsets, out_features, threshold=None, topk_fraction=None):
    """`torch.ops.duogpt.spmspv` for an owner that validated its packed weight once
    (`SparseLinear`): only `x` and the activation rule are checked per call, and on CPU outside
    `torch.compile` the kernel is called directly. Same arguments and result as the op; traced and
    CUDA calls go through the op unchanged.
    """
    if not _direct_cpu(x, values):
        return torch.ops.duogpt.spmspv(x, bitmap, values, offsets, out_features, threshold,
                                       topk_fraction)
    _check_x(x, bitmap.shape[0])
    # The rule is an attribute its owner's user may reassign or cast (`model.half()`); a wrong
    # threshold would be read past its end by the kernel.
    check_activation_rule(x, threshold, topk_fraction)
    return _run_spmspv_cpu(x, bitmap, values, offsets, out_features, threshold, topk_fraction)


def _spmspv_cuda(x, bitmap, values, offsets, out_features, threshold=None, topk_fraction=None):
    _check_spmspv(x, bitmap, values, offsets, out_features, threshold, topk_fraction)
    C = _native.cuda_lib(x.device)
    y = x.new_empty(x.shape[0], out_features)
    with torch.cuda.device(x.device):
        # Partial sums per channel slice (and the top-k thresholds): a torch allocation on the
        # current stream, so a captured CUDA graph owns it like any other intermediate.
        workspace = torch.empty(C.spmspv_cuda_workspace_bytes(x.shape[0], x.shape[1], out_features),
                                dtype=torch.uint8, device=x.device)
        C.spmspv_cuda(*_spmspv_args(x, bitmap, values, offsets, out_features, threshold,
                                    topk_fraction, y),
                      workspace.data_ptr(), workspace.numel(), _native.stream(x))
    return y


def _check_dense(x, w) -> None:
    check_tensor(w, "w", dtypes=FLOAT_DTYPES, dim=2)
    _check_x(x, w.shape[1])
    check_same_device(("x", x), ("w", w))
    _check_no_grad("dense_gemv", ("x", x), ("w", w))


def _dense_fake(x, w):
    _check_dense(x, w)
    return x.new_empty(x.shape[0], w.shape[0])


def _dense_args(x, w, y):
    return (x.data_ptr(), _native.dtype_code(x), x.shape[0], x.shape[1], w.data_ptr(),
            _native.dtype_code(w), w.shape[0], y.data_ptr())


def _run_dense_cpu(x, w):
    y = x.new_empty(x.shape[0], w.shape[0])
    _native.lib().dense_gemv_cpu(*_dense_args(x, w, y))
    return y


def _dense_cpu(x, w):
    _check_dense(x, w)
    return _run_dense_cpu(x, w)


def dense_gemv_validated(x, w):
    """`torch.ops.duogpt.dense_gemv` for an owner that validated its weight once
    (`DenseGemvLinear`): the `spmspv_validated` of the dense baseline, so that both engines pay the
    same per-call cost."""
    if not _direct_cpu(x, w):
        return torch.ops.duogpt.dense_gemv(x, w)
    _check_x(x, w.shape[1])
    return _run_dense_cpu(x, w)


def _dense_cuda(x, w):
    _check_dense(x, w)
    C = _native.cuda_lib(x.device)
    y = x.new_empty(x.shape[0], w.shape[0])
    with torch.cuda.device(x.device):
        C.dense_gemv_cuda(*_dense_args(x, w, y), _native.stream(x))
    return y


define("spmspv(Tensor x, Tensor bitmap, Tensor values, Tensor offsets, int out_features, "
       "Tensor? threshold=None, float? topk_fraction=None) -> Tensor",
       fake=_spmspv_fake, cpu=_spmspv_cpu, cuda=_spmspv_cuda)
define("dense_gemv(Tensor x, Tensor w) -> Tensor", fake=_dense_fake, cpu=_dense_cpu, cuda=_dense_cuda)
