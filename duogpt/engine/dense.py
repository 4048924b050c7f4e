"""The dense engine: the same pruned weights stored dense, the baseline of the decode benchmark.

It runs no activation rule (selecting activations only costs time when every weight is read
anyway), so it is what one would deploy without duogpt's kernels. Two projection kernels:
`torch` (F.linear, i.e. the platform BLAS) and `duogpt` (`duogpt.ops.dense_gemv` for up to
`MAX_TOKENS` tokens, the spmspv kernels' dense twin with the same threading).
"""

from __future__ import annotations

import torch
from torch import nn

from duogpt.engine.sparse_linear import sparse_projections
from duogpt.ops.gemv import MAX_TOKENS, dense_gemv_validated

DENSE_KERNELS = ("torch", "duogpt")


class DenseGemvLinear(nn.Linear):
    """`nn.Linear` whose decode GEMV (up to MAX_TOKENS tokens) runs `duogpt.ops.dense_gemv`.

    Its weight is an unpacked `SparseLinear`'s (`to_dense_engine`), valid by construction, so each
    call checks only `x`, as `SparseLinear` does (`dense_gemv_validated`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in]` -> `[..., out]` in x's dtype."""
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        if rows.shape[0] > MAX_TOKENS:
            return super().forward(x)
        y = dense_gemv_validated(rows.contiguous(), self.weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


def to_dense_engine(model: nn.Module, kernel: str = "torch") -> nn.Module:
    """Replace every `SparseLinear` of `model` by a dense linear holding its unpacked weight (in
    the values dtype), in place, one projection at a time. Returns `model`."""
    if kernel not in DENSE_KERNELS:
        raise ValueError(f"dense kernel must be one of {DENSE_KERNELS}, got {kernel!r}")
    cls = DenseGemvLinear if kernel == "duogpt" else nn.Linear
    for name, sparse in sparse_projections(model).items():
        weight = sparse.dense_weight()
        linear = cls(sparse.in_features, sparse.out_features, bias=sparse.bias is not None,
                     device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if sparse.bias is not None:
            linear.bias = nn.Parameter(sparse.bias.to(weight.dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model
