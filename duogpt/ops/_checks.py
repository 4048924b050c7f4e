"""Argument checks shared by the fake, CPU and CUDA implementations of the ops: one function
states each op's contract for every backend, eagerly and under tracing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require(ok: bool, message: Callable[[], str], error: type[Exception] = ValueError) -> None:
    """Raise `error(message())` unless `ok`. Plain Python rather than `torch._check_value`, which
    costs microseconds a call: a decode step runs these checks hundreds of times."""
    if not ok:
        raise error(message())


def check_tensor(t: torch.Tensor, name: str, *, dtypes=None, dim: int | None = None) -> None:
    if dtypes is not None:
        require(t.dtype in dtypes, lambda: f"{name} must have dtype in "
                f"{[str(d) for d in dtypes]}, got {t.dtype}", TypeError)
    if dim is not None:
        require(t.dim() == dim, lambda: f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    require(t.is_contiguous(), lambda: f"{name} must be contiguous (call .contiguous())")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; move "
                             f"them to one device")


def check_fraction(p: float | None, name: str) -> None:
    if p is not None:
        require(0.0 <= p < 1.0, lambda: f"{name} must be in [0, 1), got {p}")
