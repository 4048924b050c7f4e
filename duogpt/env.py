"""`duogpt env`: what this installation contains and what the machine offers."""

from __future__ import annotations

import torch

from duogpt import _native


def check_device(value: str | torch.device) -> None:
    """Raise a ValueError that says what to use if `value` is no device this machine has."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"{value!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{value}: torch {torch.__version__} sees no CUDA GPU here; use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{value}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here; use "
                         f"cpu or an index below that")


def environment() -> dict:
    """Versions, the CUDA build, the GPU and the CPU features the kernels use."""
    from duogpt import __version__  # here, not at the top: duogpt.prune imports this module
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
