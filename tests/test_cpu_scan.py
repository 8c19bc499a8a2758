"""The C fast-scan kernel (turboquant/kernels/_cpu_scan.c): integer sums, scores and shortlists reproduced exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboquant.codec import code_bytes, decode_mse_numpy, reconstruction_norms
from turboquant.config import QuantizerConfig, Variant
from turboquant.fastscan import faiss_available, nibble_bytes, nibble_plan
from turboquant.index import TurboQuantIndex
from turboquant.kernels import cpu_scan
from turboquant.kernels.cpu_scan import ScanMirror, load_scan_library, scan_library_error

LIB = load_scan_library()
pytestmark = pytest.mark.skipif(LIB is None, reason=f"no compiled scan kernel: {scan_library_error()}")

# (dim, bits, scan_bits): d not a multiple of 4, 2/3/4-bit codes, a fractional rate, M > 256 (uint16 flushes)
# and the 1-bit scan of 2-bit codes (4 coordinates per nibble)
CASES = [(96, 4, 2), (96, 4, 4), (50, 2, 2), (37, 3, 2), (42, 2.5, 2), (30, 1, 2), (1100, 4, 4), (70, 2, 1)]


def _mirror(dim: int, bits: float, scan_bits: int, n: int, lib=LIB, l2: bool = False, seed: int = 0):
    cfg = QuantizerConfig(dim, bits, Variant.MSE)
    plan = nibble_plan(cfg, scan_bits)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, code_bytes(cfg)), dtype=np.uint8)
    alpha = rng.uniform(0.5, 2.0, n).astype(np.float32)
    beta = -rng.uniform(0.0, 3.0, n).astype(np.float32) if l2 else None
    mirror = ScanMirror(cfg, plan, l2, lib)
    cut = n // 3  # two appends: the second starts inside a partly filled 32-vector block
    mirror.append(codes[:cut], alpha[:cut], None if beta is None else beta[:cut])
    mirror.append(codes[cut:], alpha[cut:], None if beta is None else beta[cut:])
    return cfg, plan, codes, alpha, beta, mirror


def _nibbles(codes: np.ndarray, cfg: QuantizerConfig, plan) -> np.ndarray:
    nib = nibble_bytes(codes, cfg, plan)
    return np.stack([(nib[:, m // 2] >> (4 * (m % 2))) & 15 for m in range(len(plan.coords))], axis=1)


def _reference_sums(lut: np.ndarray, vals: np.ndarray) -> np.ndarray:
    m = np.arange(vals.shape[1])
    return np.stack([t[m[None, :], vals].astype(np.int64).sum(1) for t in lut])


def _reference_scores(sums: np.ndarray, inv_a: np.ndarray, bias: np.ndarray, alpha, beta) -> np.ndarray:
    # the kernel's float32 operations in its order: alpha * (sum * inv_a + bias) (+ beta)
    s = sums.astype(np.float32) * inv_a[:, None]
    s = s + bias[:, None]
    s = alpha[None, :] * s
    return s + beta[None, :] if beta is not None else s


def _reference_top(scores: np.ndarray, length: int) -> np.ndarray:
    """Positions of the best ``length`` per row: higher score first, then smaller position."""
    pos = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.sort(np.lexsort((pos, -scores))[:, :length], axis=1)


@pytest.mark.parametrize("dim,bits,scan_bits", CASES)
def test_luts_are_the_quantized_plan_tables(dim: int, bits: float, scan_bits: int) -> None:
    _, plan, *_, mirror = _mirror(dim, bits, scan_bits, 40)
    q = np.random.default_rng(1).standard_normal((3, dim)).astype(np.float32)
    lut, inv_a, bias = mirror.luts(q)
    qv = np.where(plan.coords >= 0, q[:, np.maximum(plan.coords, 0)], 0.0).astype(np.float64)  # (nq, M, dsub)
    table = np.einsum("qms,mvs->qmv", qv, plan.centroids.astype(np.float64))
    lo = table.min(2)
    scale = 255.0 / (table.max(2) - lo).max(1)
    expected = (table - lo[:, :, None]) * scale[:, None, None]
    m = len(plan.coords)
    assert np.abs(lut[:, :m].astype(np.float64) - expected).max() <= 0.5 + 1e-3  # rounded to nearest
    assert not lut[:, m:].any()  # padding positions add nothing
    np.testing.assert_allclose(inv_a, 1 / scale, rtol=1e-5)
    np.testing.assert_allclose(bias, lo.sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim,bits,scan_bits", CASES)
@pytest.mark.parametrize("n", [1, 31, 1000])
def test_sums_equal_integer_reference(dim: int, bits: float, scan_bits: int, n: int) -> None:
    cfg, plan, codes, *_, mirror = _mirror(dim, bits, scan_bits, n)
    q = np.random.default_rng(2).standard_normal((5, dim)).astype(np.float32)  # 5: a partial group of queries
    lut, _, _ = mirror.luts(q)
    np.testing.assert_array_equal(mirror.sums(lut), _reference_sums(lut, _nibbles(codes, cfg, plan)))


@pytest.mark.parametrize("dim,bits,scan_bits", CASES)
@pytest.mark.parametrize("l2", [False, True])
def test_shortlist_is_the_exact_top_of_the_reproduced_scores(dim: int, bits: float, scan_bits: int, l2: bool) -> None:
    cfg, plan, codes, alpha, beta, mirror = _mirror(dim, bits, scan_bits, 777, l2=l2)
    q = np.random.default_rng(3).standard_normal((6, dim)).astype(np.float32)
    lut, inv_a, bias = mirror.luts(q)
    expected = _reference_scores(_reference_sums(lut, _nibbles(codes, cfg, plan)), inv_a, bias, alpha, beta)
    for length in (1, 10, 70, 777):  # 777: every vector
        scores, pos = mirror.search(q, length)
        np.testing.assert_array_equal(np.sort(pos, 1), _reference_top(expected, length))
        np.testing.assert_array_equal(scores, np.take_along_axis(expected, pos, 1))  # bit-identical scores


@pytest.mark.parametrize("skewed", [False, True])
def test_sampled_threshold_keeps_the_exact_top(skewed: bool) -> None:
    """Long ranges start from a threshold estimated on every 16th block; a sample that overshoots
    (skewed: the sampled blocks hold the largest factors) falls back to a full scan."""
    n = 64 * 16 * 10
    cfg = QuantizerConfig(40, 2, Variant.MSE)
    plan = nibble_plan(cfg, 2)
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, (n, code_bytes(cfg)), dtype=np.uint8)
    alpha = rng.uniform(0.5, 2.0, n).astype(np.float32)
    if skewed:
        alpha[(np.arange(n) // 64) % 16 == 0] *= 50.0
    mirror = ScanMirror(cfg, plan, False, LIB)
    mirror.append(codes, alpha)
    q = rng.standard_normal((6, 40)).astype(np.float32)
    lut, inv_a, bias = mirror.luts(q)
    expected = _reference_scores(_reference_sums(lut, _nibbles(codes, cfg, plan)), inv_a, bias, alpha, None)
    for length in (10, 128, 160):  # L >= 128 and 64 L <= n: the sampled start
        for rows in (slice(0, 6), slice(0, 1)):
            scores, pos = mirror.search(q[rows], length)
            np.testing.assert_array_equal(np.sort(pos, 1), _reference_top(expected[rows], length))
            np.testing.assert_array_equal(scores, np.take_along_axis(expected[rows], pos, 1))


def test_ties_go_to_the_smaller_position_for_any_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_scan, "_SPLIT_BYTES", 0)  # single queries split over vector ranges
    cfg = QuantizerConfig(64, 2, Variant.MSE)
    plan = nibble_plan(cfg, 2)
    codes = np.tile(np.random.default_rng(4).integers(0, 256, (8, code_bytes(cfg)), dtype=np.uint8), (125, 1))
    mirror = ScanMirror(cfg, plan, False, LIB)
    mirror.append(codes, np.ones(len(codes), np.float32))  # 8 distinct vectors, each 125 times: all scores tie
    q = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    lut, inv_a, bias = mirror.luts(q)
    expected = _reference_scores(
        _reference_sums(lut, _nibbles(codes, cfg, plan)), inv_a, bias, np.ones(1000, np.float32), None
    )
    for threads in (1, 2, 3):
        for rows in (slice(0, 3), slice(0, 1)):  # query chunks and (single query) vector ranges
            _, pos = mirror.search(q[rows], 50, threads)
            np.testing.assert_array_equal(np.sort(pos, 1), _reference_top(expected[rows], 50))


@pytest.mark.parametrize("variant", ["avx512bw", "avx2", "scalar"])
def test_simd_and_portable_builds_agree(variant: str) -> None:
    other = load_scan_library(variant)
    if other is None:
        pytest.skip(f"{variant} build unavailable: {scan_library_error(variant)}")
    for dim, bits, scan_bits in CASES:
        *_, a = _mirror(dim, bits, scan_bits, 555, l2=True)
        *_, b = _mirror(dim, bits, scan_bits, 555, lib=other, l2=True)
        if LIB.tq_scan_mpad() == other.tq_scan_mpad():  # same layout (else the VNNI rows differ by design)
            np.testing.assert_array_equal(a.blocks, b.blocks)
        q = np.random.default_rng(6).standard_normal((9, dim)).astype(np.float32)
        lut, *_ = a.luts(q)
        lut_b, *_ = b.luts(q)
        m = min(lut.shape[1], lut_b.shape[1])  # padding positions differ with the layout, and are 0
        np.testing.assert_array_equal(lut[:, :m], lut_b[:, :m])
        np.testing.assert_array_equal(a.sums(lut), b.sums(lut_b))
        for x, y in zip(a.search(q, 25), b.search(q, 25)):
            np.testing.assert_array_equal(np.sort(x, 1), np.sort(y, 1))
        for l2 in (False, True):  # one query at a time (its own block-sum path in every build)
            *_, a1 = _mirror(dim, bits, scan_bits, 3000, l2=l2, seed=3)
            *_, b1 = _mirror(dim, bits, scan_bits, 3000, lib=other, l2=l2, seed=3)
            for i in range(4):
                for x, y in zip(a1.search(q[i : i + 1], 10), b1.search(q[i : i + 1], 10)):
                    np.testing.assert_array_equal(np.sort(x, 1), np.sort(y, 1))


@pytest.mark.parametrize(("dim", "bits", "scan_bits"), [(96, 4, 2), (42, 2.5, 2), (70, 2, 1), (50, 2, 2)])
def test_parallel_packing_writes_the_serial_layout(monkeypatch: pytest.MonkeyPatch, dim: int, bits: float, scan_bits: int) -> None:
    """Packing in block-aligned row ranges over threads (from a position inside a block) = one serial pass."""
    cfg, plan, codes, alpha, beta, serial = _mirror(dim, bits, scan_bits, 1000)
    monkeypatch.setattr(cpu_scan, "_PACK_ROWS", 50)  # ranges of ~50 rows: many cuts, none at the start
    parallel = ScanMirror(cfg, plan, False, LIB)
    parallel.append(codes[:37], alpha[:37])
    parallel.append(codes[37:], alpha[37:], threads=7)
    np.testing.assert_array_equal(parallel.blocks[: len(serial.blocks)], serial.blocks)
    np.testing.assert_array_equal(parallel.alpha[:1000], serial.alpha[:1000])


def test_threads_give_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_scan, "_SPLIT_BYTES", 0)  # single queries split over vector ranges
    *_, mirror = _mirror(96, 4, 2, 5000)
    q = np.random.default_rng(7).standard_normal((40, 96)).astype(np.float32)
    one = mirror.search(q, 30, 1)
    for threads in (2, 4):
        many = mirror.search(q, 30, threads)
        single = [mirror.search(q[i : i + 1], 30, threads) for i in range(3)]  # split over vector ranges
        for x, y in zip(one, many):
            np.testing.assert_array_equal(np.sort(x, 1), np.sort(y, 1))
        for i, (s, p) in enumerate(single):
            np.testing.assert_array_equal(np.sort(p[0]), np.sort(one[1][i]))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("l2", [False, True])
def test_exact_rescore_matches_float64_decode(bits: int, l2: bool) -> None:
    cfg, _, codes, alpha, beta, mirror = _mirror(70, bits, 2, 300, l2=l2)
    assert mirror.exact_plan is not None  # widths 1, 2, 4: stored bytes are the exact nibbles
    rng = np.random.default_rng(8)
    q = rng.standard_normal((4, 70)).astype(np.float32)
    cand = rng.integers(0, 300, (4, 12))
    y = decode_mse_numpy(codes, cfg).astype(np.float64)
    dots = np.einsum("qd,qcd->qc", q.astype(np.float64), y[cand])
    expected = alpha[cand] * dots + (beta[cand] if l2 else 0.0)
    np.testing.assert_allclose(mirror.rescore(codes, q, cand), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim,bits", [(70, 1), (70, 2), (70, 4), (36, 2), (8, 4)])  # code bytes % 4 = 1, 2, 3, 1, 0
@pytest.mark.parametrize("l2", [False, True])
def test_vector_rescore_is_bit_identical_to_scalar(dim: int, bits: int, l2: bool) -> None:
    """16 candidates per SIMD pass, a scalar tail, invalid (-1) slots, a last overlapping dword."""
    scalar = load_scan_library("scalar")
    if scalar is None:
        pytest.skip(f"scalar build unavailable: {scan_library_error('scalar')}")
    cfg, _, codes, alpha, beta, mirror = _mirror(dim, bits, 2, 300, l2=l2)
    *_, ref = _mirror(dim, bits, 2, 300, lib=scalar, l2=l2)
    rng = np.random.default_rng(9)
    q = rng.standard_normal((3, dim)).astype(np.float32)
    cand = rng.integers(0, 300, (3, 37))
    cand[0, [0, 17, 36]] = -1
    cand[1, :] = 299  # the last stored row: reads must stay inside the codes
    got = mirror.rescore(codes, q, cand)
    np.testing.assert_array_equal(got, ref.rescore(codes, q, cand))
    assert np.isneginf(got[0, [0, 17, 36]]).all()
    y = decode_mse_numpy(codes, cfg).astype(np.float64)
    ok = cand >= 0
    expected = alpha[cand] * np.einsum("qd,qcd->qc", q.astype(np.float64), y[cand]) + (beta[cand] if l2 else 0.0)
    np.testing.assert_allclose(got[ok], expected[ok], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dim", [1, 7, 96, 300])
def test_query_rotation_matches_float64(dim: int) -> None:
    *_, mirror = _mirror(64, 4, 2, 10)
    rng = np.random.default_rng(10)
    rot_t = rng.standard_normal((dim, dim)).astype(np.float32)
    for nq in (1, 4, 9):  # C for up to 4 queries, BLAS beyond
        q = rng.standard_normal((nq, dim)).astype(np.float32)
        np.testing.assert_allclose(mirror.rotate(q, rot_t), q.astype(np.float64) @ rot_t, rtol=1e-4, atol=1e-4 * dim)


def test_auto_scan_bits_reads_one_bit_of_wide_enough_2_bit_codes() -> None:
    def cfg(d: int, b: float) -> QuantizerConfig:
        return QuantizerConfig(d, b, Variant.MSE)

    assert cpu_scan.auto_scan_bits(cfg(384, 2), 50_000) == 1  # scan bytes halve, shortlist 18 -> 128
    assert cpu_scan.auto_scan_bits(cfg(96, 2), 50_000) == 2  # small d: the longer shortlist costs more
    assert cpu_scan.auto_scan_bits(cfg(384, 2), 2_000) == 2  # few vectors: likewise
    assert all(cpu_scan.auto_scan_bits(cfg(384, b), 10**6) == 2 for b in (1, 2.5, 3, 4))
    assert nibble_plan(cfg(384, 2), 1).coords.shape[1] == 4  # 4 coordinates per nibble
    one = cpu_scan.default_shortlist(10, False, 50_000, 384, scan_width=1)
    assert one > cpu_scan.default_shortlist(10, False, 50_000, 384) > cpu_scan.default_shortlist(10, True, 50_000, 384)


def test_index_one_bit_scan_keeps_recall_of_the_exact_engine() -> None:
    x, q = _vectors(6000, 256, 0.2)
    fast = TurboQuantIndex(256, 2, engine="fastscan", scan_bits=1)
    exact = TurboQuantIndex(256, 2, engine="torch")
    fast.add(x)
    exact.add(x)
    _, ids_f = fast.search(q, 10)
    _, ids_e = exact.search(q, 10)
    assert fast._fastscan.plan.coords.shape[1] == 4  # really the 1-bit scan
    agree = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids_f, ids_e)])
    assert agree >= 0.99, agree


# --------------------------------------------------------------------------- through the index


def _vectors(n: int, dim: int, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spectrum = (1.0 + np.arange(dim)) ** -0.5
    x = (rng.standard_normal((n, dim)) * spectrum).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= rng.lognormal(0, sigma, (n, 1)).astype(np.float32)
    return x, (rng.standard_normal((30, dim)) * spectrum).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("bits,scan_bits", [(4, 2), (3, 2), (2, 2), (2.5, 2), (4, 4)])
def test_index_full_shortlist_equals_exact_engine(metric: str, bits: float, scan_bits: int) -> None:
    x, q = _vectors(700, 46, 0.3)  # d=46: not a multiple of 4
    fast = TurboQuantIndex(46, bits, metric, engine="fastscan", scan_bits=scan_bits)
    exact = TurboQuantIndex(46, bits, metric, engine="torch")
    fast.add(x[:400])
    fast.add(x[400:])  # appended to the mirror
    exact.add(x)
    assert isinstance(fast._fastscan, ScanMirror)  # unequal norms scan in C, no fallback
    s_fast, i_fast = fast.search(q, 8, rerank=len(x))
    s_exact, i_exact = exact.search(q, 8)
    np.testing.assert_allclose(s_fast, s_exact, rtol=2e-4, atol=2e-4)
    assert np.mean(i_fast == i_exact) > 0.98  # float32 near-ties aside


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_index_unequal_norms_default_shortlist_keeps_exact_recall(metric: str) -> None:
    x, q = _vectors(12_000, 64, 0.2)
    fast = TurboQuantIndex(64, 4, metric)
    fast.add(x)
    exact = TurboQuantIndex(64, 4, metric, engine="torch")
    exact.add(x)
    _, a = fast.search(q, 10)
    _, b = exact.search(q, 10)
    # a hard set (d=64, steep spectrum, Gaussian queries); the old norm groups reached 0.98 for ip
    assert np.mean([len(np.intersect1d(u, v)) / 10 for u, v in zip(a, b)]) >= (0.98 if metric == "ip" else 0.95)
    _, k_big = fast.search(q[:2], len(x) // 2)  # k far beyond the default shortlist, single-query path
    assert k_big.shape == (2, len(x) // 2) and len(np.unique(k_big[0])) == len(x) // 2


def test_index_k_equal_n_and_tiny_index() -> None:
    x, q = _vectors(5, 13, 0.1)
    index = TurboQuantIndex(13, 3, "ip")
    index.add(x)
    scores, ids = index.search(q, 5)
    assert sorted(ids[0]) == [0, 1, 2, 3, 4] and np.all(np.diff(scores, axis=1) <= 0)


def test_index_threads_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_scan, "_SPLIT_BYTES", 0)
    x, q = _vectors(3000, 64, 0.2)
    one = TurboQuantIndex(64, 4, "ip", search_threads=1)
    two = TurboQuantIndex(64, 4, "ip", search_threads=2)
    one.add(x)
    two.add(x)
    for rows in (slice(0, 30), slice(0, 1)):
        for a, b in zip(one.search(q[rows], 10), two.search(q[rows], 10)):
            np.testing.assert_array_equal(a, b)


def test_mirror_factors_are_the_corrected_norm_scale() -> None:
    x, _ = _vectors(500, 48, 0.3)
    index = TurboQuantIndex(48, 4, "l2")
    index.add(x)
    index.search(x[:1], 1)
    mirror = index._fastscan
    assert isinstance(mirror, ScanMirror) and mirror.beta is not None
    norms = np.linalg.norm(x, axis=1)
    y = decode_mse_numpy(index._codes.numpy(), index.quantizer_config)
    np.testing.assert_allclose(mirror.alpha[:500], 2 * norms / reconstruction_norms(y), rtol=1e-5)
    np.testing.assert_allclose(mirror.beta[:500], -(norms**2), rtol=1e-5)


def test_no_compiler_falls_back_to_faiss_or_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import turboquant.index as index_module

    monkeypatch.setattr(index_module, "load_scan_library", lambda: None)
    unit, q = _vectors(600, 32, 0.0)
    spread, _ = _vectors(600, 32, 0.3)
    equal = TurboQuantIndex(32, 4, "ip")
    equal.add(unit * np.float32(1.0))
    equal.search(q, 3)
    if faiss_available():
        assert equal._fastscan is not None and not isinstance(equal._fastscan, ScanMirror)
    unequal = TurboQuantIndex(32, 4, "ip")
    unequal.add(spread)
    _, ids = unequal.search(q, 3)
    assert unequal._fastscan is None  # FAISS tables cannot apply per-vector norms: exact torch engine
    exact = TurboQuantIndex(32, 4, "ip", engine="torch")
    exact.add(spread)
    np.testing.assert_array_equal(ids, exact.search(q, 3)[1])


def test_library_is_built_once_per_variant() -> None:
    assert load_scan_library() is LIB
    assert cpu_scan.load_scan_library("native") is LIB
    assert torch.get_num_threads() >= 1


def test_a_header_edit_changes_the_build_digest(tmp_path) -> None:
    from turboquant.kernels.cbuild import _source_bytes

    (tmp_path / "k.c").write_text('#include <stdint.h>\n#include "k_part.h"\nint f(void) { return g(); }\n')
    (tmp_path / "k_part.h").write_text("static int g(void) { return 1; }\n")
    before = _source_bytes(tmp_path / "k.c")
    (tmp_path / "k_part.h").write_text("static int g(void) { return 2; }\n")
    assert _source_bytes(tmp_path / "k.c") != before  # the cached library is rebuilt
    assert b"return 2" in _source_bytes(tmp_path / "k.c")
