"""Import hygiene, the deferred native-module error, `duogpt env`, and which GPUs a CUDA build
runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import duogpt
from duogpt import _native
from duogpt._native import arch_error
from duogpt.env import check_device, environment

# Subprocesses start outside the source tree: from its root, `python -c` and `python -m` would
# import the uncompiled `duogpt/` folder instead of the installed package.
OUTSIDE_SOURCE = Path(__file__).parent


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, with `env` added to the environment."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=OUTSIDE_SOURCE, check=False,
                          env=os.environ | env)


@pytest.mark.parametrize(("error", "message"), [
    ('ImportError("hidden for the test")', "hidden for the test"),
    # What the import system raises for a source tree that was never built.
    ('ModuleNotFoundError("No module named \'duogpt._C\'", name="duogpt._C")',
     "No module named 'duogpt._C'"),
])
def test_import_without_native_module_succeeds_and_calls_explain(error, message):
    result = run_python(f"""
        import importlib.abc, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "duogpt._C":
                    raise {error}
        sys.meta_path.insert(0, Hide())
        import torch, duogpt
        try:
            duogpt.BitmapWeight.from_dense(torch.eye(4))
        except RuntimeError as err:
            print("ERROR:", err)
    """)
    assert result.returncode == 0, result.stderr
    assert f"ERROR: duogpt's native module failed to import ({message})" in result.stdout
    assert "duogpt env" in result.stdout


def test_import_leaves_transformers_unimported():
    """`import duogpt` takes torch's import time, not transformers' seconds more: the model code
    imports transformers when it runs, and the quantizer registers when transformers loads."""
    result = run_python("""
        import sys, duogpt
        print(sorted(name for name in sys.modules if name.split(".")[0] == "transformers"))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_changes_no_global_torch_state():
    result = run_python("""
        import torch
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                  torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
        import duogpt
        after = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled())
        print(before == after)
    """)
    assert result.stdout.strip() == "True", result.stderr


def _op_arguments() -> dict[str, tuple]:
    """Valid arguments of every duogpt op, on CPU."""
    w = torch.randn(40, 24).masked_fill(torch.rand(40, 24) < 0.5, 0).half()
    bitmap, values, offsets = torch.ops.duogpt.bitmap_pack(w)
    x = torch.randn(3, 24, dtype=torch.float16)
    U1 = torch.linalg.cholesky(torch.eye(16) + 0.1 * torch.ones(16, 16), upper=True).contiguous()
    return {"bitmap_pack": (w,),
            "bitmap_unpack": (bitmap, values, offsets, 40),
            "spmspv": (x, bitmap, values, offsets, 40, None, 0.5),
            "dense_gemv": (x, w),
            "obs_prune_block": (torch.randn(12, 16), U1, None, torch.rand(12, 16) < 0.5, 0, 0, None)}


def test_every_op_is_registered_with_cpu_and_cuda_kernels():
    for name in _op_arguments():
        op = getattr(torch.ops.duogpt, name).default
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)


def test_every_op_has_a_fake_kernel_with_the_real_output_shapes_and_dtypes():
    """What torch.compile and meta-device tracing run in place of the kernel."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for name, args in _op_arguments().items():
        op = getattr(torch.ops.duogpt, name).default
        real = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        with FakeTensorMode(shape_env=ShapeEnv()) as mode:  # the shape env allows bitmap_pack's nnz
            fake = op(*[mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a
                        for a in args])
        real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
        assert len(fake) == len(real), name
        for i, (r, f) in enumerate(zip(real, fake)):
            assert isinstance(f, FakeTensor) and f.dtype == r.dtype, (name, i)
            if (name, i) == ("bitmap_pack", 1):  # the value count depends on the data: a symbol
                assert f.dim() == 1 and isinstance(f.shape[0], torch.SymInt)
            else:
                assert f.shape == r.shape, (name, i)


def test_env_command_prints_the_diagnostics():
    result = subprocess.run([sys.executable, "-m", "duogpt", "env"], capture_output=True, text=True,
                            timeout=300, cwd=OUTSIDE_SOURCE, check=False)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["version"] == duogpt.__version__ and info["torch"] == torch.__version__
    assert info["cuda_compiled"] == duogpt._native.cuda_compiled()
    assert set(info) >= {"cuda_archs", "gpu", "cpu_features", "cpu_isa"}
    if not torch.cuda.is_available():
        assert info["gpu"] is None


def test_env_reports_what_the_native_module_contains():
    C = _native.lib()
    info = environment()
    assert info["native_module"] is True and "native_error" not in info
    assert info["cuda_compiled"] is _native.cuda_compiled() is C.cuda_compiled()
    assert info["cuda_archs"] == (C.cuda_archs().split(",") if C.cuda_compiled() else None)
    assert info["cpu_features"] == C.cpu_features() and info["cpu_isa"] == C.cpu_isa()


def test_env_without_native_module_reports_why(monkeypatch):
    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("hidden for the test"))
    info = environment()
    assert info["native_module"] is False and info["cuda_compiled"] is False
    assert info["native_error"] == "hidden for the test"
    assert info["cuda_archs"] is None and info["cpu_features"] == [] and info["cpu_isa"] is None


def test_env_names_the_first_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"Test GPU {index}")
    assert environment()["gpu"] == "Test GPU 0"


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("device, count", [("cuda", 1), ("cuda:0", 1), ("cuda:1", 2), ("cpu", 0)])
def test_a_device_this_machine_has_is_accepted(device, count, monkeypatch):
    _fake_gpus(monkeypatch, count)
    check_device(device)


@pytest.mark.parametrize("device, count", [("cuda:1", 1), ("cuda:2", 2)])
def test_a_cuda_index_past_the_gpus_is_refused_with_what_to_use(device, count, monkeypatch):
    _fake_gpus(monkeypatch, count)
    with pytest.raises(ValueError, match=rf"{device}: torch sees {count} CUDA GPU\(s\) here; use cpu or an"):
        check_device(device)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA GPU of compute capability `gpu.capability`, as the kernels' arch check sees it."""
    if not _native.cuda_compiled():
        pytest.skip("needs a duogpt build with the CUDA kernels")
    fake = types.SimpleNamespace(capability=(8, 0))
    monkeypatch.setattr(_native._C, "cuda_archs", lambda: "90-real")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: fake.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    _native._arch_error_on.cache_clear()
    yield fake
    _native._arch_error_on.cache_clear()


def test_the_cuda_kernels_are_handed_out_for_a_gpu_they_run_on(gpu):
    gpu.capability = (9, 0)
    assert _native.cuda_lib(torch.device("cuda", 0)) is _native.lib()


def test_a_gpu_the_kernels_cannot_run_on_is_refused_before_any_launch(gpu):
    gpu.capability = (7, 5)
    with pytest.raises(RuntimeError, match="Test GPU has compute capability 7.5; .* need 8.0 or newer"):
        _native.cuda_lib(torch.device("cuda", 0))


DEFAULT_ARCHS = "80-real,86-real,89-real,90-real,90-virtual"  # CMakeLists.txt's default


@pytest.mark.parametrize("archs, capability", [
    (DEFAULT_ARCHS, (8, 0)),   # A100: its own machine code
    (DEFAULT_ARCHS, (8, 7)),   # Orin: 8.6 machine code runs on 8.7
    (DEFAULT_ARCHS, (12, 0)),  # Blackwell: the 9.0 PTX, compiled by the driver
    ("90", (10, 0)),           # a bare number is machine code and PTX
    ("90-virtual", (9, 0)),    # PTX runs on its own capability too
    ("100f-real", (10, 3)),    # family code runs across its family
    ("native", (9, 0)),        # resolved by CMake at build time: trusted
])
def test_kernels_run_where_machine_code_or_ptx_covers_the_gpu(archs, capability):
    assert arch_error(archs, capability, "GPU") is None


@pytest.mark.parametrize("archs, capability, fix", [
    ("90-real", (8, 6), "CMAKE_CUDA_ARCHITECTURES=86-real"),    # machine code does not run on older GPUs
    ("80-real", (9, 0), "CMAKE_CUDA_ARCHITECTURES=90-real"),    # nor across major versions
    ("90a-real", (10, 0), "CMAKE_CUDA_ARCHITECTURES=100-real"),  # arch-specific code: 9.0 only
    ("100a-real", (10, 3), "CMAKE_CUDA_ARCHITECTURES=103-real"),  # not even on a later minor
    ("100f", (12, 0), "CMAKE_CUDA_ARCHITECTURES=120-real"),      # family code stays in its family
    (DEFAULT_ARCHS, (7, 5), "8.0 or newer"),                    # T4: below what the kernels need
])
def test_kernels_that_cannot_run_name_the_gpu_and_the_fix(archs, capability, fix):
    error = arch_error(archs, capability, "Some GPU")
    assert "Some GPU" in error and fix in error
