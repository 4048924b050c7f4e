"""The dense engine: the same pruned weights stored dense, the baseline of the decode benchmark.

It runs no activation rule (selecting activations only costs time when every weight is read
anyway), so it is what one would deploy without duogpt's kernels. Two projection kernels:
`torch` (F.linear, i.e. the platform BLAS) and `duogpt` (`duogpt.ops.dense_gemv` for up to
`MAX_TOKENS` tokens, the spmspv kernels' dense twin with the same threading). The output
projection, dense in every engine, runs with the same kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from duogpt.engine.sparse_linear import autocast_input, sparse_projections
from duogpt.ops._checks import FLOAT_DTYPES, check_tensor
from duogpt.ops.gemv import MAX_TOKENS, dense_gemv_validated, records_grad

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DENSE_KERNELS = ("torch", "duogpt")


class DenseGemvLinear(nn.Linear):
    """`nn.Linear` whose decode GEMV (up to MAX_TOKENS tokens) runs `duogpt.ops.dense_gemv`.

    Its weight is an unpacked `SparseLinear`'s (`to_dense_engine`), valid by construction, or the
    output projection's (`set_head_kernel`), checked there once. So each call checks only `x`, as
    `SparseLinear` does (`dense_gemv_validated`), and that the weight is still contiguous: one
    assigned since (a transposed view) runs `nn.Linear`, which the kernel would misread.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in]` -> `[..., out]` in x's dtype (under autocast, the autocast dtype)."""
        x = autocast_input(x)
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        # As in SparseLinear.forward: the dict, not `nn.Module.__getattr__`, on the hot path.
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        # The kernel has no backward: where autograd records (a trained head, x's gradient),
        # nn.Linear runs.
        if rows.shape[0] > MAX_TOKENS or records_grad(x, weight, bias) or not weight.is_contiguous():
            return super().forward(x)
        y = dense_gemv_validated(rows.contiguous(), weight)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def _linear_class(kernel: str) -> type[nn.Linear]:
    if kernel not in DENSE_KERNELS:
        raise ValueError(f"dense kernel must be one of {DENSE_KERNELS}, got {kernel!r}")
    return DenseGemvLinear if kernel == "duogpt" else nn.Linear


def set_head_kernel(model: PreTrainedModel, kernel: str) -> None:
    """Run the model's output projection (`lm_head`, never pruned) with `kernel`, in place. Its
    weight is kept, so a head tied to the input embeddings stays tied.

    The head is the largest GEMV of a decode step (49152 x 576 on SmolLM2, 3 ms on the CI machine).
    duogpt's dense GEMV runs it 1.0-1.3x (1 token) to 2.5x (4 tokens) faster than torch's bf16
    matmul on CPU (bench/results/cpu-decode-smollm2-head-2026-11-23.md).
    """
    cls = _linear_class(kernel)
    head = model.get_output_embeddings()
    if cls is DenseGemvLinear:
        check_tensor(head.weight, "the output projection's weight", dtypes=FLOAT_DTYPES, dim=2)
    new = cls(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    new.weight, new.bias = head.weight, head.bias
    model.set_output_embeddings(new)


def set_engine_head(model: PreTrainedModel) -> None:
    """The sparse engine's output projection: duogpt's dense GEMV on CPU. On CUDA the head stays on
    cuBLAS, which the CUDA `dense_gemv` has not been measured against on the head alone."""
    if model.device.type == "cpu":
        set_head_kernel(model, "duogpt")


def to_dense_engine(model: PreTrainedModel, kernel: str = "torch") -> PreTrainedModel:
    """Replace every `SparseLinear` of `model` by a dense linear holding its unpacked weight, in
    place, one projection at a time, and run the output projection with the same kernel. Returns
    `model`.

    The weights take the activations' dtype (the input embeddings'), as in a plain dense model of
    that dtype: packed values may be stored in another (`duogpt.load(dtype=)` keeps them), which
    `nn.Linear` cannot multiply with.
    """
    cls = _linear_class(kernel)
    set_head_kernel(model, kernel)
    dtype = model.get_input_embeddings().weight.dtype
    for name, sparse in sparse_projections(model).items():
        weight = sparse.dense_weight().to(dtype)
        linear = cls(sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
                     device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if sparse.bias is not None:
            linear.bias = nn.Parameter(sparse.bias.to(weight.dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model
