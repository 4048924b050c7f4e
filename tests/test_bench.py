"""The C++ kernel benchmarks build and pass their own correctness check. They are not part of the
wheel, so nothing else compiles them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd) -> str:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake on PATH")
def test_benchmarks_build_and_gemv_cpu_validates_its_kernels(tmp_path):
    pybind11 = pytest.importorskip("pybind11")
    # DUOGPT_CUDA's default (AUTO) compiles the CUDA sources where CMake finds a CUDA compiler, and
    # the CUDA benchmarks too where cuBLAS is found (bench/cuda/CMakeLists.txt); one architecture
    # keeps it short. Running them needs a GPU, so only the CPU one runs here.
    build = tmp_path / "build"
    run("cmake", "-S", ROOT, "-B", build, "-DDUOGPT_BUILD_BENCH=ON", "-DCMAKE_CUDA_ARCHITECTURES=90-real",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
    run("cmake", "--build", build, "-j", os.cpu_count() or 1)
    out = run(build / "bench" / "gemv_cpu", "--quick", "--shape", "100x72")
    # gemv_cpu checks spmspv against dense_gemv before timing and exits 1 on a mismatch.
    assert "spmspv with its weight in L2" in out
    assert all(re.search(rf"^100x72 +{b} ", out, re.MULTILINE) for b in (1, 2, 4, 8))
