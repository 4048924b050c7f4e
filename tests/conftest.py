"""Shared fixtures: a fixed seed per test, the shared real-text folder, and CUDA skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import duogpt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_data_dir() -> Path | None:
    """`$DUOGPT_DATA`, else the `shared/data` folder beside the repository, if present."""
    env = os.environ.get("DUOGPT_DATA")
    candidate = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real text not found: set DUOGPT_DATA or place shared/data beside the repo")
    return d


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and duogpt._native.cuda_compiled():
        return
    reason = ("no CUDA GPU" if not torch.cuda.is_available()
              else "this duogpt build has no CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
