"""Fast-scan over unequal norms (issue 10): the mirror groups vectors by norm instead of falling back to torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboquant.fastscan import faiss_available, norm_edges
from turboquant.index import TurboQuantIndex

pytestmark = pytest.mark.skipif(not faiss_available(), reason="needs faiss")


def _data(n: int, dim: int, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spectrum = (1.0 + np.arange(dim)) ** -0.5
    x = (rng.standard_normal((n, dim)) * spectrum).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= rng.lognormal(0, sigma, (n, 1)).astype(np.float32)
    q = (rng.standard_normal((50, dim)) * spectrum).astype(np.float32)
    return x, q


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a, b)]))


def test_norm_edges_split_into_groups_of_near_equal_norms() -> None:
    norms = np.exp(np.random.default_rng(0).normal(0, 0.2, 20_000)).astype(np.float32)
    edges = norm_edges(norms, 1.02, 8, 1024)
    assert edges is not None and len(edges) == 7  # capped at 8 groups of ~equal size
    sizes = np.bincount(np.searchsorted(edges, norms, side="right"))
    assert sizes.min() > 0.9 * len(norms) / 8
    assert norm_edges(np.full(100, 3.0, np.float32), 1.02, 8, 10) is None


@pytest.mark.parametrize("metric", ["ip"])
def test_unequal_norms_keep_fastscan_with_exact_engine_recall(metric: str) -> None:
    x, q = _data(12_000, 64, 0.2)
    fast = TurboQuantIndex(64, 4, metric, engine="auto")
    fast.add(x)
    exact = TurboQuantIndex(64, 4, metric, engine="torch")
    exact.add(x)
    _, ids_fast = fast.search(q, 10)
    assert fast._fastscan is not None and len(fast._fastscan.groups) > 1  # grouped, not the torch fallback
    _, ids_exact = exact.search(q, 10)
    # same codes and scores; only the shortlist can miss: the top-10 must agree almost everywhere
    assert _overlap(ids_fast, ids_exact) >= 0.98
    # against exact float ground truth the fast index is as good as the exact code scan
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    truth = (qt @ xt.T if metric == "ip" else -torch.cdist(qt, xt)).topk(10, dim=1).indices.numpy()
    assert _overlap(ids_fast, truth) >= _overlap(ids_exact, truth) - 0.01


def test_l2_with_unequal_norms_uses_the_exact_engine() -> None:
    x, q = _data(3_000, 32, 0.2)
    index = TurboQuantIndex(32, 4, "l2")
    index.add(x)
    index.search(q, 5)
    assert index._fastscan is None


def test_streaming_adds_that_spread_the_norms_regroup_the_mirror() -> None:
    x, q = _data(6_000, 32, 0.0)  # unit norms: one group
    index = TurboQuantIndex(32, 4, "ip")
    index.add(x[:3000])
    assert index._fastscan is not None and index._fastscan.edges is None
    y = x[3000:] * np.random.default_rng(1).lognormal(0, 0.15, (3000, 1)).astype(np.float32)
    index.add(y)
    _, ids = index.search(q, 5)
    assert index._fastscan is not None and index._fastscan.edges is not None
    exact = TurboQuantIndex(32, 4, "ip", engine="torch")
    exact.add(np.concatenate([x[:3000], y]))
    _, ids_exact = exact.search(q, 5)
    assert _overlap(ids, ids_exact) >= 0.95  # d=32, k=5: a short shortlist, the hardest case
    assert index._fastscan.ntotal == 6000
