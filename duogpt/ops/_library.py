"""The one op registry: every duogpt kernel is a `torch.library` op in the `duogpt` namespace."""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("duogpt", "DEF")


def define(schema: str, *, fake: Callable, cpu: Callable, cuda: Callable) -> None:
    """Define `duogpt::<schema>` with its fake (shape contract), CPU and CUDA implementations.

    The CUDA implementation is registered even in builds without CUDA, so a CUDA tensor reaches a
    clear error instead of a silent fallback.
    """
    _LIB.define(schema)
    name = "duogpt::" + schema.split("(", 1)[0]
    torch.library.register_fake(name, fake, lib=_LIB)
    torch.library.register_kernel(name, "cpu", cpu, lib=_LIB)
    torch.library.register_kernel(name, "cuda", cuda, lib=_LIB)
