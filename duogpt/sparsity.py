"""Activation sparsity: the rule that zeroes projection inputs, identical in calibration,
evaluation and the engine.

Two rules (docs/pruning.md, Activation sparsity): `topk` (the paper's: per token, drop the
`floor(in * p_a)` smallest |x|) and `threshold` (TEAL's: keep |x| > t with one calibrated threshold
vector per projection).
The exact semantics, ties and NaN included, are those of `duogpt.ops.reference.sparsify`, which
the spmspv kernels fuse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from duogpt.ops.reference import sparsify

RULES = ("topk", "threshold")


@dataclasses.dataclass(frozen=True)
class ActivationSparsity:
    """How the inputs of the pruned projections are sparsified.

    Attributes:
        fraction: `p_a` in [0, 1): the target fraction of zeroed activations (0 = dense inputs).
        rule: "topk" or "threshold".
        thresholds: for the threshold rule, `{module name: [in] float32}`, e.g.
            `"model.layers.0.self_attn.q_proj"`; every sparsified module needs one.
    """

    fraction: float = 0.0
    rule: str = "topk"
    thresholds: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"activation sparsity must be in [0, 1), got {self.fraction}")
        if self.rule not in RULES:
            raise ValueError(f"activation rule must be one of {RULES}, got {self.rule!r}")

    @property
    def active(self) -> bool:
        return self.fraction > 0.0

    def kernel_args(self, name: str) -> dict:
        """Keyword arguments of `duogpt.ops.spmspv` / `reference.sparsify` for module `name`."""
        if not self.active:
            return {}
        if self.rule == "topk":
            return {"topk_fraction": self.fraction}
        if name not in self.thresholds:
            raise KeyError(f"no activation threshold for {name!r}; calibrate thresholds for every "
                           f"pruned projection")
        return {"threshold": self.thresholds[name]}

    def threshold(self, name: str, in_features: int) -> torch.Tensor | None:
        """Module `name`'s `[in_features]` threshold under the threshold rule, else None; a
        ValueError if it has another width (thresholds that do not belong to the model)."""
        threshold = self.kernel_args(name).get("threshold")
        if threshold is not None and tuple(threshold.shape) != (in_features,):
            raise ValueError(f"{name}: the activation threshold has shape {tuple(threshold.shape)}, "
                             f"expected ({in_features},), one per input channel")
        return threshold

    def apply(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """`x [..., in]` with the dropped activations zeroed (same shape, dtype, device)."""
        if not self.active:
            return x
        kwargs = self.kernel_args(name)
        if "threshold" in kwargs:
            kwargs["threshold"] = kwargs["threshold"].to(x.device)
        return sparsify(x, **kwargs)

    def to_json(self) -> dict:
        """JSON-able description (threshold tensors are saved separately, by module name)."""
        return {"fraction": self.fraction, "rule": self.rule}


@contextlib.contextmanager
def sparsified_inputs(modules: Mapping[str, nn.Module], sparsity: ActivationSparsity) -> Iterator[None]:
    """Within the block, every module in `modules` ({full name: module}) sees its input
    sparsified by `sparsity` (a forward pre-hook; removed on exit, also on error)."""
    handles = []
    try:
        if sparsity.active:
            for name, module in modules.items():
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, name=name: (sparsity.apply(args[0], name), *args[1:])))
        yield
    finally:
        for h in handles:
            h.remove()


class ThresholdHistogram:
    """TEAL-style calibration of one projection input's threshold, streaming.

    `|x|` is counted into `bins` equal bins spanning `[0, q99]` of the first batch, plus one
    overflow bin; the threshold for sparsity `p` is the inverse CDF at `p`, interpolated linearly
    inside its bin, so that `|x| > threshold` keeps about `1 - p` of the activations. (TEAL bins the
    signed x over its 1%-99% range and reads the CDF at `0.5 + p/2` assuming a symmetric
    distribution; binning |x| reads the same quantile without that assumption.)
    """

    def __init__(self, bins: int = 10_000):
        self.bins = bins
        self.top: float | None = None
        self.counts: torch.Tensor | None = None  # [bins + 1] float64, last = overflow

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Count the activations `x [..., in]` (any float dtype and device)."""
        mag = x.detach().float().abs().flatten().nan_to_num(nan=math.inf)
        if self.counts is None:
            q99 = mag.kthvalue(max(1, math.ceil(0.99 * mag.numel()))).values.item()
            self.top = q99 if 0.0 < q99 < math.inf else 1.0
            self.counts = torch.zeros(self.bins + 1, dtype=torch.float64)
        idx = (mag * (self.bins / self.top)).clamp_(max=self.bins).long()
        self.counts += torch.bincount(idx, minlength=self.bins + 1).cpu().double()

    def threshold(self, fraction: float) -> float:
        """The magnitude below which about `fraction` of the counted activations lie."""
        if self.counts is None or not 0.0 < fraction < 1.0:
            raise ValueError(f"need counted activations and a fraction in (0, 1), got {fraction}")
        cdf = self.counts.cumsum(0) / self.counts.sum()
        j = int(torch.searchsorted(cdf, torch.tensor([fraction], dtype=torch.float64)))
        if j >= self.bins:  # the quantile lies among the outliers: not resolvable, keep them all
            return self.top
        below = cdf[j - 1].item() if j > 0 else 0.0
        inside = (fraction - below) / (cdf[j].item() - below)
        return (j + inside) * self.top / self.bins
