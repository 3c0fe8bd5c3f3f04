"""Shared fixtures: the golden-data directory, dtype tolerances, the device under test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("ATTNZOO_GOLDEN", ROOT.parent / "shared" / "golden"))

# Tolerances per dtype (atol, rtol), as PyTorch's own tests keep them.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (5e-3, 5e-3),
}


def load_golden(relative: str) -> dict[str, Any]:
    """Load a recorded golden file, or skip the test with the reason when it is not there."""
    path = GOLDEN_DIR / relative
    if not path.exists():
        pytest.skip(f"golden file {path} not found (set ATTNZOO_GOLDEN or put shared/ beside the clone)")
    return torch.load(path, weights_only=True)


def golden_files(pattern: str) -> list[Path]:
    """Golden files matching ``pattern`` (empty when the directory is absent: tests then skip)."""
    return sorted(GOLDEN_DIR.glob(pattern)) if GOLDEN_DIR.exists() else []


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    # Kernel choice by the static rules, so every run takes the same paths (tests/kernels/test_choose.py
    # switches calibration back on); subprocesses inherit it.
    os.environ.setdefault("ATTNZOO_KERNEL_CALIBRATE", "0")


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
