"""`SparseLinear`: a pruned projection that holds only its bitmap-packed weight.

Decode (up to `MAX_TOKENS` tokens) runs the `spmspv` kernel with the activation rule fused: input
channels whose activation is dropped are never read. Longer inputs (prefill, perplexity windows),
and inputs whose gradient autograd needs, unpack the weight into a transient dense tensor, apply the
same rule with `duogpt.ops.reference.sparsify` and run one dense GEMM; the transient is freed when
the layer returns, so at most one projection is ever dense (the allocator reuses the block across
layers).
"""

from __future__ import annotations

import torch
from torch import nn

from duogpt.formats import BitmapWeight
from duogpt.models import layer_map
from duogpt.ops.gemv import MAX_TOKENS, check_activation_rule, records_grad, spmspv_validated
from duogpt.ops.reference import sparsify
from duogpt.sparsity import ActivationSparsity

# Tensor names of one packed projection `P` in a checkpoint: `P.weight` holds the non-zero values
# (docs/format.md `values`). Naming them `weight` makes a plain, unregistered transformers load fail
# with a size mismatch ([nnz] vs [out, in]) instead of quietly building random projections.
PACKED_KEYS = ("weight", "bitmap", "offsets", "shape")


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """`x` in the autocast dtype where autocast is on for x's device, else `x`: the input dtype
    `nn.Linear` computes in. The custom ops are outside autocast's op lists, so the engine's
    modules cast for them, on every path, so that the activation rule sees the same values."""
    device = "cuda" if x.is_cuda else "cpu"  # the kernels' devices; `x.device.type` costs ~0.5 us
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x


class _UnpackedMatmul(torch.autograd.Function):
    """`x [tokens, in] @ W.T` for a bitmap-packed `W`, unpacked in forward and again in backward:
    `F.linear` would keep the transient dense `W` for x's gradient, so a forward in grad mode
    would hold every projection dense until the graph is freed. The packed tensors are buffers
    and get no gradient."""

    @staticmethod
    def forward(x, bitmap, values, offsets, out_features):
        return x @ torch.ops.duogpt.bitmap_unpack(bitmap, values, offsets, out_features).to(x.dtype).T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:4])
        ctx.out_features = inputs[4]

    @staticmethod
    def backward(ctx, grad):
        w = torch.ops.duogpt.bitmap_unpack(*ctx.saved_tensors, ctx.out_features)
        return grad @ w.to(grad.dtype), None, None, None, None


class SparseLinear(nn.Module):
    """`y = sparsify(x) @ W.T + b` with `W` stored in the bitmap format (docs/format.md).

    Buffers (all on one device):
        weight: `[nnz]` float16/bfloat16/float32 non-zero values.
        bitmap: `[in, ceil(out/32)]` int32.
        offsets: `[in * ceil(out/1024) + 1]` int32.
        shape: `[2]` int64 `(out, in)`, kept for the checkpoint.
        bias: `[out]` or None.
        threshold: `[in]` float32 for the threshold rule, else None.

    Attributes:
        topk_fraction: the top-k rule's `p_a`, or None (threshold rule or dense activations).
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, *, dtype: torch.dtype,
                 bias: bool = False, device: torch.device | str | None = None):
        """An empty module of the given packed sizes (filled by `load_state_dict` or transformers)."""
        super().__init__()
        words, tiles = -(-out_features // 32), -(-out_features // 1024)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(nnz, dtype=dtype, device=device))
        self.register_buffer("bitmap", torch.empty(in_features, words, dtype=torch.int32, device=device))
        self.register_buffer("offsets", torch.empty(in_features * tiles + 1, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("shape", torch.tensor([out_features, in_features], device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device)
                             if bias else None)
        self.register_buffer("threshold", None)
        self.topk_fraction: float | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> SparseLinear:
        """Pack a pruned `nn.Linear` (exact zeros); values in `dtype`, default the weight's."""
        return cls.from_bitmap(BitmapWeight.from_dense(linear.weight.detach(), dtype), linear.bias)

    @classmethod
    def from_bitmap(cls, packed: BitmapWeight, bias: torch.Tensor | None = None) -> SparseLinear:
        """Wrap a packed weight (and an optional `[out]` bias, kept in its own dtype)."""
        out_features, in_features = packed.shape
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), one per output row, got "
                             f"{tuple(bias.shape)}")
        module = cls(in_features, out_features, packed.values.numel(), dtype=packed.dtype,
                     bias=bias is not None, device="meta")
        module.weight, module.bitmap, module.offsets = packed.values, packed.bitmap, packed.offsets
        module.shape = torch.tensor(packed.shape, device=packed.device)
        if bias is not None:
            module.bias = bias.detach()
        module.packed()  # a BitmapWeight built by hand is checked once here, never per call
        return module

    def packed(self) -> BitmapWeight:
        """The weight as a `BitmapWeight`, validated: ValueError names a corrupted tensor, or a
        stored shape that is not the module's (a config.json edited or of another model), which
        the kernels would read past the buffers' ends."""
        packed = BitmapWeight.from_state_dict({k: getattr(self, k) for k in PACKED_KEYS[1:]}
                                              | {"values": self.weight})
        if packed.shape != (self.out_features, self.in_features):
            raise ValueError(f"the stored weight is {packed.shape[0]} x {packed.shape[1]} but the "
                             f"model's config makes this projection {self.out_features} x "
                             f"{self.in_features}; config.json does not belong to these weights")
        return packed

    @property
    def nbytes(self) -> int:
        """Resident bytes of the packed weight (values + bitmap + offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bitmap, self.offsets))

    def set_activation_rule(self, sparsity: ActivationSparsity, name: str) -> None:
        """Use `sparsity`'s rule for this module, registered under its full name `name`."""
        self.topk_fraction = sparsity.kernel_args(name).get("topk_fraction")
        threshold = sparsity.threshold(name, self.in_features)
        self.threshold = (None if threshold is None
                          else threshold.to(device=self.bitmap.device, dtype=torch.float32).contiguous())

    def _apply(self, fn, recurse=True):
        # A dtype cast of the module (`model.half()`, `.to(torch.bfloat16)`) casts every floating
        # buffer; the thresholds move with it but stay float32, the precision the kernels compare in.
        threshold = self.threshold
        super()._apply(fn, recurse)
        if threshold is not None and self.threshold.dtype != torch.float32:
            self.threshold = threshold.to(self.threshold.device)
        return self

    def dense_weight(self) -> torch.Tensor:
        """`[out, in]` dense weight in the values dtype (a fresh tensor; the module keeps none)."""
        return torch.ops.duogpt.bitmap_unpack(self.bitmap, self.weight, self.offsets, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [..., in]` -> `[..., out]` in x's dtype (under autocast, the autocast dtype)."""
        # The buffers straight from their dict: `nn.Module.__getattr__` costs ~1 us a name on the
        # CI machine, 5-6 us of a ~30 us decode call on SmolLM2's 192 x 576 projections.
        buffers = self._buffers
        threshold, bias = buffers["threshold"], buffers["bias"]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but this "
                             f"projection has {self.in_features} input channels")
        x = autocast_input(x)
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        # The kernel has no backward: where autograd needs x's gradient (adapters trained over the
        # frozen sparse model, saliency), the dense path gives it, through the kept activations.
        if 0 < rows.shape[0] <= MAX_TOKENS and not records_grad(x):
            y = spmspv_validated(rows.contiguous(), buffers["bitmap"], buffers["weight"],
                                 buffers["offsets"], self.out_features, threshold, self.topk_fraction)
        else:
            check_activation_rule(rows, threshold, self.topk_fraction)
            rows = sparsify(rows, threshold, self.topk_fraction)
            y = _UnpackedMatmul.apply(rows, buffers["bitmap"], buffers["weight"], buffers["offsets"],
                                      self.out_features)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.weight.numel() / (self.in_features * self.out_features)
        rule = (f"topk_fraction={self.topk_fraction}" if self.topk_fraction is not None
                else "threshold" if self.threshold is not None else "dense activations")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={density:.3f}, values={self.weight.dtype}, {rule}")


def sparse_projections(model: nn.Module) -> dict[str, SparseLinear]:
    """`{"model.layers.3.mlp.up_proj": SparseLinear, ...}` of a model converted for the engine."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SparseLinear)}


def set_activation_sparsity(model: nn.Module, sparsity: ActivationSparsity) -> None:
    """Give every `SparseLinear` of `model` the rule `sparsity` (thresholds looked up by name)."""
    modules = sparse_projections(model)
    if not modules:
        raise ValueError("the model has no SparseLinear projections; load it with duogpt.load")
    for name, module in modules.items():
        module.set_activation_rule(sparsity, name)


def convert_for_runtime(model: nn.Module, sparsity: ActivationSparsity,
                        dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the seven projections of every layer of a dense pruned model by `SparseLinear`
    (in place; each dense weight is released as soon as it is packed). Returns `model`."""
    projections = layer_map(model).named_projections()
    for name, linear in projections.items():
        parent, _, child = name.rpartition(".")
        module = SparseLinear.from_linear(linear, dtype)
        module.set_activation_rule(sparsity, name)
        setattr(model.get_submodule(parent), child, module)
    return model
