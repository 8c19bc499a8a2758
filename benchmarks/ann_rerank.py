"""Recall of the fast-scan index vs its shortlist size at 100k and 1M vectors (docs/index_notes.md).

    python benchmarks/ann_rerank.py
"""

import time

import numpy as np

from turboquant.index import TurboQuantIndex
rng = np.random.default_rng(0)
dim = 384
spectrum = ((1.0 + np.arange(dim)) ** -0.6).astype(np.float32)
centers = (rng.standard_normal((1000, dim)) * spectrum).astype(np.float32)
def draw(m):
    x = centers[rng.integers(0, len(centers), m)] + 0.6 * (rng.standard_normal((m, dim)) * spectrum).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
for n in (100_000, 1_000_000):
    base = np.concatenate([draw(100_000) for _ in range(n // 100_000)])
    q = draw(200)
    gt = np.concatenate([np.argsort(-(q @ base[i:i+200000].T), axis=1)[:, :10] + i for i in range(0, n, 200000)], axis=1)
    sc = np.concatenate([np.sort(-(q @ base[i:i+200000].T), axis=1)[:, :10] for i in range(0, n, 200000)], axis=1)
    order = np.argsort(sc, axis=1)[:, :10]; gt = np.take_along_axis(gt, order, 1)
    idx = TurboQuantIndex(dim, 4, "ip"); t0=time.time(); idx.add(base); print("build", n, time.time()-t0, flush=True)
    exact = TurboQuantIndex(dim, 4, "ip", engine="torch"); exact.add(base[:0] if False else base)
    _, ie = exact.search(q, 10)
    print(n, "exact-engine R10@10", np.mean([len(np.intersect1d(a, b))/10 for a, b in zip(ie, gt)]), flush=True)
    for rr in (64, 128, 256, 512):
        t0 = time.time(); _, ids = idx.search(q, 10, rerank=rr); dt = time.time()-t0
        r = np.mean([len(np.intersect1d(a, b))/10 for a, b in zip(ids, gt)])
        print(n, rr, "R10@10", round(r, 4), "qps", round(200/dt), flush=True)
    del base, idx, exact
