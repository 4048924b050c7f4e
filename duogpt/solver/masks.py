"""Which weights to prune: the target weight sparsity and the mask rules the methods share."""

from __future__ import annotations

import dataclasses
import operator

import torch


@dataclasses.dataclass(frozen=True)
class WeightSparsity:
    """Target weight sparsity `p_w` of every pruned projection.

    Attributes:
        fraction: the fraction of zeros (for N:M, `n / m`).
        n, m: N:M sparsity (`n` of every `m` consecutive weights of a row are zero); 0 when
            unstructured.
    """

    fraction: float
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.n or self.m:
            _check_nm(self.n, self.m)
        elif not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"weight sparsity must be in [0, 1), got {self.fraction}")

    @classmethod
    def of(cls, value: float | tuple[int, int] | WeightSparsity) -> WeightSparsity:
        """From a fraction (`0.5`: unstructured) or an `(n, m)` pair of integers (`(2, 4)`: 2:4)."""
        if isinstance(value, WeightSparsity):
            return value
        if isinstance(value, (tuple, list)):
            try:
                n, m = (operator.index(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"N:M sparsity is a pair of integers (n, m), e.g. (2, 4), got "
                                 f"{value!r}") from None
            _check_nm(n, m)
            return cls(n / m, n, m)
        return cls(float(value))

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def spec(self) -> float | tuple[int, int]:
        """The value `of` takes back: a fraction or an `(n, m)` pair."""
        return (self.n, self.m) if self.is_nm else self.fraction

    def to_json(self) -> dict:
        if self.is_nm:
            return {"type": "nm", "n": self.n, "m": self.m}
        return {"type": "unstructured", "fraction": self.fraction}

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g} unstructured"


def _check_nm(n: int, m: int) -> None:
    if not 0 < n < m <= 64:
        raise ValueError(f"N:M sparsity needs 0 < N < M <= 64, got {n}:{m}")


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` smallest entries of `scores`, compared jointly over all of them.

    Exactly `count` entries are selected, so a block or matrix reaches its target sparsity
    exactly. Which of tied entries are selected is unspecified (`topk`'s choice, which may differ
    between devices); ties in practice are at score 0, between weights that are zero either way.
    """
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    flat[scores.flatten().topk(count, largest=False, sorted=False).indices] = True
    return flat.view(scores.shape)


def row_lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """True at the `floor(k * fraction)` smallest scores of each row of `scores [n, k]`."""
    count = int(scores.shape[1] * fraction)
    idx = scores.topk(count, dim=1, largest=False, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


def nm_lowest(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the `n` smallest of every `m` consecutive scores of each row of `scores [rows, k]`
    (ties: lower column first); `k` must be a multiple of `m`."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"N:M sparsity needs the input width {k} to be a multiple of M = {m}")
    groups = scores.reshape(-1, m)
    idx = groups.argsort(dim=1, stable=True)[:, :n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).view(rows, k)


def select(scores: torch.Tensor, sparsity: WeightSparsity) -> torch.Tensor:
    """The prune mask of a whole matrix scored jointly (magnitude) or per N:M group."""
    if sparsity.is_nm:
        return nm_lowest(scores, sparsity.n, sparsity.m)
    return lowest(scores, int(scores.numel() * sparsity.fraction))
