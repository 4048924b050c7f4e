"""`duogpt env`: what this installation contains and what the machine offers."""

from __future__ import annotations

import torch

from duogpt import __version__, _native


def environment() -> dict:
    """Versions, the CUDA build, the GPU and the CPU features the kernels use."""
    info = {"version": __version__, "torch": torch.__version__, "native_module": _native._C is not None,
            "cuda_compiled": _native.cuda_compiled(), "cuda_archs": None, "gpu": None,
            "cpu_features": [], "cpu_isa": None}
    if _native._C is not None:
        C = _native._C
        info.update(cuda_archs=C.cuda_archs().split(",") if C.cuda_compiled() else None,
                    cpu_features=C.cpu_features(), cpu_isa=C.cpu_isa())
    else:
        info["native_error"] = str(_native._IMPORT_ERROR)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
