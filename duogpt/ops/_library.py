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
    op = schema.split("(", 1)[0]
    torch.library.register_fake("duogpt::" + op, fake, lib=_LIB)
    # Library.impl rather than torch.library.register_kernel: the latter's wrapper costs ~30 us a
    # call, a third of a small decode GEMV.
    _LIB.impl(op, cpu, "CPU")
    _LIB.impl(op, cuda, "CUDA")
