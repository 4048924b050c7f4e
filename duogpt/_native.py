"""Loads the compiled module `duogpt._C` and turns a missing or CPU-only build into clear errors.

Importing duogpt never fails because of the native module: the import error is kept and raised,
with what to do about it, on the first call that needs the module.
"""

from __future__ import annotations

import functools
import importlib
import re

import torch

try:
    # Not `from duogpt import _C`: for a missing module that reports a circular import.
    _C = importlib.import_module("duogpt._C")
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


def cuda_lib(device: torch.device):
    """The native module, checked to contain CUDA kernels that run on `device` (a CUDA device)."""
    if not lib().cuda_compiled():
        raise RuntimeError(f"This duogpt build has no CUDA kernels (it was compiled without a CUDA "
                           f"compiler), so CUDA tensors cannot be processed. {_REBUILD_HINT}")
    error = _arch_error_on(device)
    if error is not None:
        raise RuntimeError(error)
    return _C


@functools.cache
def _arch_error_on(device: torch.device) -> str | None:
    return arch_error(_C.cuda_archs(), torch.cuda.get_device_capability(device),
                      torch.cuda.get_device_name(device))


def arch_error(archs: str, capability: tuple[int, int], name: str) -> str | None:
    """Why kernels built for `archs` (CMAKE_CUDA_ARCHITECTURES, comma-separated) cannot run on a GPU
    of this compute capability, or None when they can. A launch would fail there with "no kernel
    image"; this message names the GPU and the rebuild instead.
    `XY-real` is machine code for X.Y, which runs on X.Z with Z >= Y; `XY-virtual` is PTX, compiled
    by the driver for any capability >= X.Y; a bare `XY` is both. Arch-specific code (`90a`) runs
    on X.Y only, family code (`100f`) like machine code. Names CMake resolves itself (`native`,
    `all`) are trusted."""
    cc = capability[0] * 10 + capability[1]
    if cc < 80:
        return (f"{name} has compute capability {capability[0]}.{capability[1]}; duogpt's CUDA "
                f"kernels need 8.0 or newer (they use cp.async). Run the model on the CPU instead.")
    for arch in archs.split(","):
        m = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", arch)
        if m is None:
            return None
        code = int(m[1])  # major * 10 + minor, like cc
        if m[2] == "a":
            runs = code == cc
        elif m[3] == "real" or m[2] == "f":
            runs = code // 10 == cc // 10 and code <= cc
        else:
            runs = code <= cc
        if runs:
            return None
    return (f"This duogpt build has CUDA kernels for {archs}, none of which runs on {name} "
            f"(compute capability {capability[0]}.{capability[1]}). Rebuild for it: "
            f"CMAKE_ARGS=\"-DCMAKE_CUDA_ARCHITECTURES={cc}-real\" pip install .")


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        # Reached by an owner that skipped the op's checks and was then cast (`module.double()`).
        raise TypeError(f"duogpt's kernels take float32, float16 or bfloat16 tensors, got "
                        f"{t.dtype}; cast the model or tensor to one of them") from None


def ptr(t: torch.Tensor | None) -> int:
    """The tensor's data pointer as an integer, 0 for None."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, read at call time (graph capture uses it too)."""
    return torch.cuda.current_stream(t.device).cuda_stream
