"""Argument checks shared by the fake, CPU and CUDA implementations of the ops.

`torch._check*` raises a clear error (ValueError for values, TypeError for types) both eagerly and
under tracing, so one function states each op's contract for every backend.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t: torch.Tensor, name: str, *, dtypes=None, dim: int | None = None) -> None:
    if dtypes is not None:
        torch._check_type(t.dtype in dtypes, lambda: f"{name} must have dtype in "
                          f"{[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None:
        torch._check_value(t.dim() == dim, lambda: f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    torch._check_value(t.is_contiguous(), lambda: f"{name} must be contiguous (call .contiguous())")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for n, t in present[1:]:
        torch._check_value(t.device == first.device, lambda: f"{n} is on {t.device} but "
                           f"{first_name} is on {first.device}; move them to one device")


def check_fraction(p: float | None, name: str) -> None:
    if p is not None:
        torch._check_value(0.0 <= p < 1.0, lambda: f"{name} must be in [0, 1), got {p}")
