"""Shared test fixtures: the real embedding set from ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter. Triton reads this variable when a
# kernel is decorated, and transformers' model modules import Triton, so it must be set here,
# before any test module is collected (setting it inside tests/test_kernels.py is too late).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def brown_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """(base float32 [53992, 384], queries float32 [1000, 384]) or skip if the set is absent."""
    base = SHARED_DATA / "brown_minilm_base.npy"
    if not base.exists():
        pytest.skip(f"real embedding set not found at {SHARED_DATA}")
    return np.load(base).astype(np.float32), np.load(SHARED_DATA / "brown_minilm_queries.npy").astype(np.float32)
