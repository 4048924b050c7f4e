"""Loads the compiled module `duogpt._C` and turns a missing or CPU-only build into clear errors.

Importing duogpt never fails because of the native module: the import error is kept and raised,
with what to do about it, on the first call that needs the module.
"""

from __future__ import annotations

import torch

try:
    from duogpt import _C
    _IMPORT_ERROR: ImportError | None = None
except ImportError as err:  # a source checkout that was never built, or a broken build
    _C = None
    _IMPORT_ERROR = err

# Dtype codes of csrc/include/duogpt/types.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_REBUILD_HINT = (
    "Rebuild with `pip install .` from the source tree (add "
    "`-Ccmake.define.DUOGPT_CUDA=ON` to require the CUDA kernels, with nvcc on PATH or CUDACXX "
    "set); `duogpt env` shows what the installed build contains."
)


def lib():
    """The native module; raises RuntimeError naming the cause when it could not be imported."""
    if _C is None:
        raise RuntimeError(f"duogpt's native module failed to import ({_IMPORT_ERROR}). {_REBUILD_HINT}")
    return _C


def cuda_compiled() -> bool:
    """Whether the installed build contains the CUDA kernels."""
    return _C is not None and _C.cuda_compiled()


def cuda_lib():
    """The native module, checked to contain the CUDA kernels."""
    if not lib().cuda_compiled():
        raise RuntimeError(f"This duogpt build has no CUDA kernels (it was compiled without a CUDA "
                           f"compiler), so CUDA tensors cannot be processed. {_REBUILD_HINT}")
    return _C


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    """The tensor's data pointer as an integer, 0 for None."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, read at call time (graph capture uses it too)."""
    return torch.cuda.current_stream(t.device).cuda_stream
