"""The CUDA kernels' host side, which needs a build with the CUDA kernels but no GPU.

Every native CUDA function checks its arguments before any CUDA call and raises ValueError naming
the problem; a failed CUDA call reaches Python as RuntimeError naming the CUDA error. Both travel
as C++ exceptions thrown from code compiled by the C++ compiler (csrc/cuda/launch.h says why not
by nvcc). The pointers below are never dereferenced: each call is rejected first.
"""

from __future__ import annotations

import pytest

from duogpt import _native

pytestmark = [
    pytest.mark.cuda_build,
    pytest.mark.skipif(not _native.cuda_compiled(), reason="needs a duogpt build with the CUDA kernels"),
]

P = 256  # a 16-byte aligned address standing in for a device pointer
F16, BAD_DTYPE = 1, 7


def C():
    return _native.lib()


# (name, native call, message): every call is invalid in exactly one way.
INVALID_CALLS = [
    ("dense_gemv_cuda: null y",
     lambda: C().dense_gemv_cuda(P, F16, 1, 64, P, F16, 64, 0, 0), "null pointer"),
    ("dense_gemv_cuda: b = 9",
     lambda: C().dense_gemv_cuda(P, F16, 9, 64, P, F16, 64, P, 0), "b must be in"),
    ("dense_gemv_cuda: unknown weight dtype",
     lambda: C().dense_gemv_cuda(P, F16, 1, 64, P, BAD_DTYPE, 64, P, 0), "unknown dtype code"),
    ("spmspv_cuda: no workspace",
     lambda: C().spmspv_cuda(P, F16, 1, 64, P, P, P, F16, 64, 0, -1.0, P, 8, 0, 0, 0),
     "null workspace"),
    ("spmspv_cuda: misaligned workspace",
     lambda: C().spmspv_cuda(P, F16, 1, 64, P, P, P, F16, 64, 0, -1.0, P, 8, P + 4, 1 << 20, 0),
     "16-byte aligned"),
    ("spmspv_cuda: threshold and top-k",
     lambda: C().spmspv_cuda(P, F16, 1, 64, P, P, P, F16, 64, P, 0.5, P, 8, P, 1 << 20, 0),
     "not both"),
    ("spmspv_cuda: top-k fraction 1",
     lambda: C().spmspv_cuda(P, F16, 1, 64, P, P, P, F16, 64, 0, 1.0, P, 8, P, 1 << 20, 0),
     r"topk_fraction must be in \[0, 1\)"),
    ("spmspv_cuda: negative nnz",
     lambda: C().spmspv_cuda(P, F16, 1, 64, P, P, P, F16, 64, 0, -1.0, P, -1, P, 1 << 20, 0),
     "nnz must be in"),
    ("spmspv_cuda_workspace_bytes: k = 0",
     lambda: C().spmspv_cuda_workspace_bytes(1, 0, 64), "sizes must be positive"),
    ("bitmap_index_cuda: null offsets",
     lambda: C().bitmap_index_cuda(P, F16, 64, 64, P, 0, P, 0), "null pointer"),
    ("bitmap_index_cuda: more rows than the grid holds",
     lambda: C().bitmap_index_cuda(P, F16, 65536 * 1024, 1, P, P, P, 0), "limit of"),
    ("bitmap_fill_cuda: null values",
     lambda: C().bitmap_fill_cuda(P, F16, 64, 64, P, 10, 0, 0), "null pointer"),
    ("bitmap_unpack_cuda: nnz = 2^31",
     lambda: C().bitmap_unpack_cuda(P, P, P, F16, 64, 64, 1 << 31, P, 0), "nnz must be in"),
    ("obs_prune_block_cuda: 257 columns",
     lambda: C().obs_prune_block_cuda(P, 8, 257, P, 0, P, 0, 0, 0, P, P, 0), "at most 256"),
    ("obs_prune_block_cuda: 2:128",
     lambda: C().obs_prune_block_cuda(P, 8, 128, P, 0, 0, 2, 128, P, P, P, 0), "0 < N < M <= 64"),
    ("obs_prune_block_cuda: null Err1",
     lambda: C().obs_prune_block_cuda(P, 8, 64, P, 0, P, 0, 0, 0, 0, P, 0), "null pointer"),
]


@pytest.mark.parametrize("call, message", [c[1:] for c in INVALID_CALLS],
                         ids=[c[0] for c in INVALID_CALLS])
def test_invalid_arguments_raise_value_error_before_any_cuda_call(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_block_width_limit_is_exported_for_the_python_check():
    assert C().max_obs_block == 256


@pytest.fixture
def no_cuda_device():
    """Skip unless CUDA reports no usable device: the fake pointers would then be launched on."""
    try:
        C().spmspv_cuda_workspace_bytes(1, 64, 64)  # queries the device's SM count
    except RuntimeError as e:
        assert "CUDA error" in str(e) and "cudaGetDevice" in str(e)
        return
    pytest.skip("a CUDA device is usable here; a launch with fake pointers would fault on it")


def test_a_failed_launch_raises_runtime_error_naming_the_cuda_error(no_cuda_device):
    with pytest.raises(RuntimeError, match=r"CUDA error cuda\w+ \(.+\) in cudaGetLastError"):
        C().dense_gemv_cuda(P, F16, 1, 64, P, F16, 64, P, 0)
