"""FAISS peer indexes for side-by-side benchmarks (faiss-cpu >= 1.15).

Small, typed helpers that build the FAISS baselines our benchmarks compare
against in the same run, and time them the same way:

* ``make_flat``           exact inner product / L2 (``IndexFlatIP`` / ``IndexFlatL2``)
* ``make_tq_mse``         FAISS' own TurboQuant-MSE scalar quantizer
                          (``ScalarQuantizer.QT_{b}bit_tqmse``, b in 1, 2, 3, 4, 8)
                          behind a seeded ``RandomRotationMatrix``
* ``make_tq_full``        FAISS' "full" TurboQuant (MSE + 1-bit QJL,
                          ``QT_{b}bit_tq``, b in 2..5), same rotation
* ``make_rabitq``         multi-bit ``IndexRaBitQ`` (1..9 bits per coordinate)
* ``make_rabitq_fastscan`` ``IndexRaBitQFastScan`` (same codes, SIMD scan)
* ``make_pq``             ``IndexPQ`` with 8-bit sub-quantizers
* ``make_pq_fastscan``    ``IndexPQFastScan`` with 4-bit sub-quantizers

plus ``bytes_per_vector``, ``build``, ``search``, ``search_one_by_one``,
``encode_decode_throughput`` and the recall helpers used in the tables.

``faiss`` is imported lazily: importing this module never fails, and
``faiss_available()`` tells whether the peers can run. Every function that
does work takes ``threads``; when it is not ``None`` the FAISS OpenMP thread
count is set to it for the duration of the call (``faiss.omp_set_num_threads``)
and restored afterwards. See ``docs/faiss_notes.md`` for the API findings and
the measured numbers.
"""

from __future__ import annotations

import contextlib
import importlib
import statistics
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "FaissIndex",
    "Metric",
    "build",
    "bytes_per_vector",
    "encode_decode_throughput",
    "faiss_available",
    "faiss_version",
    "make_flat",
    "make_pq",
    "make_pq_fastscan",
    "make_rabitq",
    "make_rabitq_fastscan",
    "make_tq_full",
    "make_tq_mse",
    "omp_threads",
    "overlap_at",
    "recall_1_at",
    "search",
    "search_one_by_one",
]

#: A FAISS index object (faiss ships no useful static types for its SWIG classes).
FaissIndex = Any
#: ``"ip"`` (inner product, what the real data set uses) or ``"l2"``.
Metric = Literal["ip", "l2"]

_TQMSE_BITS = (1, 2, 3, 4, 8)
_TQFULL_BITS = (2, 3, 4, 5)
_RABITQ_BITS = range(1, 10)
_MIN_VERSION = (1, 15)


def _faiss() -> ModuleType:
    """Import and return the ``faiss`` module (raises ``ImportError`` if absent)."""
    return importlib.import_module("faiss")


def faiss_available() -> bool:
    """True when ``faiss`` imports and is at least 1.15 (the release with TurboQuant SQ types)."""
    try:
        faiss = _faiss()
    except ImportError:
        return False
    try:
        major, minor = (int(p) for p in faiss.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return (major, minor) >= _MIN_VERSION and hasattr(faiss.ScalarQuantizer, "QT_4bit_tqmse")


def faiss_version() -> str:
    """The installed faiss version string, or ``""`` when faiss is not importable."""
    try:
        return str(_faiss().__version__)
    except ImportError:
        return ""


@contextlib.contextmanager
def omp_threads(threads: int | None) -> Iterator[None]:
    """Context manager: run the body with ``faiss.omp_set_num_threads(threads)``.

    ``None`` leaves the current setting alone. The previous value
    (``faiss.omp_get_max_threads()``) is restored on exit.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    faiss = _faiss()
    previous = int(faiss.omp_get_max_threads())
    faiss.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _metric(metric: Metric) -> int:
    """Map ``"ip"`` / ``"l2"`` to ``faiss.METRIC_INNER_PRODUCT`` / ``faiss.METRIC_L2``."""
    faiss = _faiss()
    if metric == "ip":
        return int(faiss.METRIC_INNER_PRODUCT)
    if metric == "l2":
        return int(faiss.METRIC_L2)
    raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def _f32(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """C-contiguous float32 2-D copy/view of ``x`` (FAISS requires exactly this)."""
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {a.shape}")
    return a


def _rotated(inner: FaissIndex, d: int, seed: int) -> FaissIndex:
    """Wrap ``inner`` in ``IndexPreTransform(RandomRotationMatrix(d, d) seeded with seed)``.

    ``RandomRotationMatrix.init(seed)`` draws a Haar-random orthogonal matrix
    (Gaussian + QR); without it, ``train`` would use the fixed seed 12345.
    The Python wrapper keeps references to ``rot`` and ``inner`` alive.
    """
    faiss = _faiss()
    rot = faiss.RandomRotationMatrix(d, d)
    rot.init(int(seed))
    return faiss.IndexPreTransform(rot, inner)


def make_flat(d: int, metric: Metric = "ip") -> FaissIndex:
    """Exact brute force: ``IndexFlatIP(d)`` / ``IndexFlatL2(d)`` (4·d B/vector, no training)."""
    faiss = _faiss()
    if metric == "ip":
        return faiss.IndexFlatIP(d)
    if metric == "l2":
        return faiss.IndexFlatL2(d)
    raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")


def make_tq_mse(
    d: int, bits: int, metric: Metric = "ip", seed: int = 0, rotate: bool = True
) -> FaissIndex:
    """FAISS TurboQuant-MSE: ``IndexScalarQuantizer(d, QT_{bits}bit_tqmse, metric)``.

    ``bits`` must be 1, 2, 3, 4 or 8. Codes are exactly ``ceil(d·bits/8)``
    bytes; FAISS stores no per-vector norm, so inputs must be unit norm (the
    codebook is the Lloyd-Max codebook of one coordinate of a random unit
    vector, it clips larger values). With ``rotate`` (default) the SQ sits
    behind a seeded ``RandomRotationMatrix`` inside ``IndexPreTransform``, as
    the TurboQuant paper prescribes. Training is data-independent (it only
    builds the codebook from ``d`` and ``bits``) but is still required before
    ``add``; ``build`` does it with one vector.
    """
    faiss = _faiss()
    if bits not in _TQMSE_BITS:
        raise ValueError(f"FAISS has QT_{{b}}bit_tqmse only for b in {_TQMSE_BITS}, got {bits}")
    qtype = getattr(faiss.ScalarQuantizer, f"QT_{bits}bit_tqmse")
    inner = faiss.IndexScalarQuantizer(d, qtype, _metric(metric))
    return _rotated(inner, d, seed) if rotate else inner


def make_tq_full(
    d: int, bits: int, metric: Metric = "ip", seed: int = 0, rotate: bool = True
) -> FaissIndex:
    """FAISS "full" TurboQuant: ``IndexScalarQuantizer(d, QT_{bits}bit_tq, metric)``.

    ``bits`` in 2..5: (bits-1)-bit MSE codes + 1-bit QJL sign of the residual
    + 8 bytes of per-vector factors, i.e. ``d·bits/8 + 8`` bytes. Same rotation
    and (trivial) training as ``make_tq_mse``.
    """
    faiss = _faiss()
    if bits not in _TQFULL_BITS:
        raise ValueError(f"FAISS has QT_{{b}}bit_tq only for b in {_TQFULL_BITS}, got {bits}")
    qtype = getattr(faiss.ScalarQuantizer, f"QT_{bits}bit_tq")
    inner = faiss.IndexScalarQuantizer(d, qtype, _metric(metric))
    return _rotated(inner, d, seed) if rotate else inner


def make_rabitq(
    d: int,
    bits: int,
    metric: Metric = "ip",
    qb: int = 4,
    rotate: bool = False,
    seed: int = 0,
) -> FaissIndex:
    """Multi-bit RaBitQ: ``IndexRaBitQ(d, metric, bits)``, ``bits`` in 1..9.

    Code size is ``d·bits/8 + 8`` bytes for 1 bit and ``d·bits/8 + 20`` for
    2..9 bits (sign bits, extra bits and per-vector float factors).
    ``qb`` (index attribute, FAISS default 4) is the number of bits the *query*
    is quantized to; 1..8 use the integer path, 0 means float queries, which
    FAISS 1.15.1 scans ~100x slower for no recall gain (see the notes).
    Per call it can be overridden with ``faiss.RaBitQSearchParameters``
    (fields ``qb``, ``centered``). Training computes the data centroid (cheap,
    but required). ``IndexRaBitQ`` applies no rotation itself; ``rotate`` puts
    a seeded ``RandomRotationMatrix`` in front.
    """
    faiss = _faiss()
    if bits not in _RABITQ_BITS:
        raise ValueError(f"IndexRaBitQ supports 1..9 bits, got {bits}")
    inner = faiss.IndexRaBitQ(d, _metric(metric), bits)
    inner.qb = int(qb)
    return _rotated(inner, d, seed) if rotate else inner


def make_rabitq_fastscan(d: int, bits: int, metric: Metric = "ip", qb: int = 8) -> FaissIndex:
    """``IndexRaBitQFastScan(d, metric, 32, bits)``: RaBitQ codes, SIMD-scanned 32 at a time.

    Same bytes/vector as ``make_rabitq``; ``qb`` defaults to 8 in FAISS here.
    """
    faiss = _faiss()
    if bits not in _RABITQ_BITS:
        raise ValueError(f"IndexRaBitQFastScan supports 1..9 bits, got {bits}")
    index = faiss.IndexRaBitQFastScan(d, _metric(metric), 32, bits)
    index.qb = int(qb)
    return index


def make_pq(d: int, code_bytes: int, metric: Metric = "ip") -> FaissIndex:
    """``IndexPQ(d, M=code_bytes, nbits=8, metric)``: ``code_bytes`` bytes/vector.

    ``d`` must be divisible by ``code_bytes`` (sub-vector length ``d / M``).
    Needs k-means training (256 centroids per sub-quantizer).
    """
    if code_bytes < 1 or d % code_bytes:
        raise ValueError(f"d={d} must be a multiple of code_bytes={code_bytes}")
    faiss = _faiss()
    return faiss.IndexPQ(d, code_bytes, 8, _metric(metric))


def make_pq_fastscan(d: int, code_bytes: int, metric: Metric = "ip") -> FaissIndex:
    """``IndexPQFastScan(d, M=2·code_bytes, nbits=4, metric)``: ``code_bytes`` bytes/vector.

    FastScan only supports 4-bit sub-quantizers, so ``M = 2·code_bytes`` and
    ``d`` must be divisible by ``M``. Codes are stored in blocks of
    ``bbs = 32`` vectors (the last block is zero-padded). Needs k-means training
    (16 centroids per sub-quantizer).
    """
    m = 2 * code_bytes
    if code_bytes < 1 or d % m:
        raise ValueError(f"d={d} must be a multiple of M=2*code_bytes={m}")
    faiss = _faiss()
    return faiss.IndexPQFastScan(d, m, 4, _metric(metric))


def bytes_per_vector(index: FaissIndex) -> int:
    """Bytes FAISS stores per database vector, per-vector scalars included.

    This is ``index.sa_code_size()``, which FAISS defines for every index used
    here (``IndexPreTransform`` forwards to the wrapped index): ``4·d`` for
    Flat, ``d·b/8`` for ``QT_*_tqmse``, ``d·b/8 + 8`` for ``QT_*_tq``, the
    RaBitQ code incl. its float factors, ``M·nbits/8`` for PQ / PQFastScan.
    It excludes per-index state (rotation matrix, codebooks, centroid) and the
    FastScan padding of the last 32-vector block.
    """
    return int(index.sa_code_size())


def build(
    index: FaissIndex,
    xb: npt.ArrayLike,
    threads: int | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> float:
    """Train ``index`` if needed, add ``xb``, and return the wall seconds of both.

    Training uses all of ``xb`` unless ``train_size`` is given (then a seeded
    random subset of that size). The float32 conversion of ``xb`` happens
    before the clock starts.
    """
    x = _f32(xb)
    xt = x
    if train_size is not None and train_size < len(x):
        rows = np.random.default_rng(seed).choice(len(x), size=train_size, replace=False)
        xt = np.ascontiguousarray(x[np.sort(rows)])
    with omp_threads(threads):
        t0 = time.perf_counter()
        if not index.is_trained:
            index.train(xt)
        index.add(x)
        return time.perf_counter() - t0


def search(
    index: FaissIndex,
    xq: npt.ArrayLike,
    k: int,
    threads: int | None = None,
    params: Any = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], float]:
    """One batched ``index.search(xq, k)``: returns ``(D, I, seconds)``.

    ``params`` is an optional ``faiss.SearchParameters`` subclass (e.g.
    ``faiss.RaBitQSearchParameters``). QPS = ``len(xq) / seconds``.
    """
    q = _f32(xq)
    with omp_threads(threads):
        t0 = time.perf_counter()
        dist, ids = index.search(q, k, params=params) if params is not None else index.search(q, k)
        return dist, ids, time.perf_counter() - t0


def search_one_by_one(
    index: FaissIndex,
    xq: npt.ArrayLike,
    k: int,
    threads: int | None = None,
    params: Any = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], float]:
    """Search the queries one at a time (a Python loop of 1-row searches).

    Returns ``(D, I, seconds)`` for the whole loop; models a latency-bound
    server. QPS = ``len(xq) / seconds``.
    """
    q = _f32(xq)
    n = len(q)
    dist = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    rows = [q[i : i + 1] for i in range(n)]
    with omp_threads(threads):
        t0 = time.perf_counter()
        for i, row in enumerate(rows):
            if params is not None:
                dist[i], ids[i] = index.search(row, k, params=params)
            else:
                dist[i], ids[i] = index.search(row, k)
        return dist, ids, time.perf_counter() - t0


def encode_decode_throughput(
    index: FaissIndex,
    x: npt.ArrayLike,
    repeats: int = 5,
    threads: int | None = None,
) -> tuple[float, float]:
    """Median encode and decode throughput (vectors/s) of ``index`` as a codec.

    Uses ``index.sa_encode(x)`` and ``index.sa_decode(codes)``. On an
    ``IndexPreTransform`` both include the random rotation (encode rotates
    then quantizes; decode dequantizes then applies the inverse rotation).
    The index is trained on ``x`` if needed (not timed); one untimed warm-up
    encode precedes the timed runs. Returns
    ``(encode_vps, decode_vps)``, each the median over ``repeats`` runs.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    a = _f32(x)
    enc: list[float] = []
    dec: list[float] = []
    with omp_threads(threads):
        if not index.is_trained:
            index.train(a)
        codes = index.sa_encode(a)
        for _ in range(repeats):
            t0 = time.perf_counter()
            codes = index.sa_encode(a)
            t1 = time.perf_counter()
            index.sa_decode(codes)
            t2 = time.perf_counter()
            enc.append(len(a) / (t1 - t0))
            dec.append(len(a) / (t2 - t1))
    return statistics.median(enc), statistics.median(dec)


def recall_1_at(ids: npt.ArrayLike, gt_ids: npt.ArrayLike, k: int) -> float:
    """1@k: share of queries whose true nearest neighbour ``gt_ids[:, 0]`` is in ``ids[:, :k]``."""
    found = np.asarray(ids)[:, :k]
    true_nn = np.asarray(gt_ids)[:, :1]
    return float(np.mean(np.any(found == true_nn, axis=1)))


def overlap_at(ids: npt.ArrayLike, gt_ids: npt.ArrayLike, k: int) -> float:
    """k@k: mean of ``|ids[:, :k] ∩ gt_ids[:, :k]| / k`` over queries (e.g. 10@10)."""
    found = np.asarray(ids)[:, :k]
    truth = np.asarray(gt_ids)[:, :k]
    hits = [len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)
