"""Shared test fixtures: the real embedding set from ../shared/data when present."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. Triton reads this variable when a
# kernel is decorated, and transformers' model modules import Triton, so it must be set here,
# before any test module is collected (setting it inside tests/test_kernels.py is too late).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (scripts, not a package) to test the code they measure with."""
    module_name = f"_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def brown_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """(base float32 [53992, 384], queries float32 [1000, 384]) or skip if the set is absent."""
    base = SHARED_DATA / "brown_minilm_base.npy"
    if not base.exists():
        pytest.skip(f"real embedding set not found at {SHARED_DATA}")
    return np.load(base).astype(np.float32), np.load(SHARED_DATA / "brown_minilm_queries.npy").astype(np.float32)
