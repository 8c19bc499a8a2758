"""TurboQuantIndex: exactness against brute force, recall floors, persistence, corruption, threads, errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turboquant import TurboQuantError
from turboquant.cli import main as cli_main
from turboquant.codebook import codebook_tensors
from turboquant.config import QuantizerConfig
from turboquant.index import TurboQuantIndex
from turboquant.io import save_codes
from turboquant.codec import decode_mse, encode_mse, layout
from turboquant.packing import pack_codes
from turboquant.quantizer import TurboQuantMSE

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:  # pragma: no cover
    HAVE_FAISS = False

ENGINES = ["torch", "fastscan"] if HAVE_FAISS else ["torch"]
SCANS = [("torch", 2)] + ([("fastscan", 2), ("fastscan", 4)] if HAVE_FAISS else [])


def _data(n: int = 600, dim: int = 64, nq: int = 20, seed: int = 0, unit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, q


def _expected_scores(x: np.ndarray, q: np.ndarray, bits: float, correction: bool = True) -> np.ndarray:
    """Brute force over the core quantizer: ‖x‖·<Πq, ŷ>/‖ŷ‖ (or without the /‖ŷ‖)."""
    quant = TurboQuantMSE(x.shape[1], bits, rotation="haar")
    codes = quant.quantize(torch.from_numpy(x))
    y_hat = decode_mse(codes.codes, quant.config).double()
    scale = codes.norms.double() / (y_hat.norm(dim=1) if correction else 1.0)
    return ((quant.rotate(torch.from_numpy(q)).double() @ y_hat.T) * scale).numpy()


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("engine,scan_bits", SCANS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 2.5, 5, 8])
def test_matches_brute_force_over_core_codes(engine: str, scan_bits: int, bits: float) -> None:
    if scan_bits == 4 and bits > 4:
        pytest.skip("scan_bits=4 needs codes of at most 4 bits")
    x, q = _data()
    index = TurboQuantIndex(64, bits, "ip", engine=engine, scan_bits=scan_bits)  # type: ignore[arg-type]
    index.add(x)
    scores, ids = index.search(q, 10, rerank=len(x) if engine == "fastscan" else None)
    expected = _expected_scores(x, q, bits)
    order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), rtol=1e-4, atol=1e-5)
    assert np.mean(ids == order) > 0.99  # ties in float32 aside, the same ranking


def test_plain_estimator_when_correction_off() -> None:
    x, q = _data()
    index = TurboQuantIndex(64, 3, "ip", engine="torch", correction=False)
    index.add(x)
    scores, _ = index.search(q, 5)
    np.testing.assert_allclose(
        scores, -np.sort(-_expected_scores(x, q, 3, correction=False), 1)[:, :5], rtol=1e-4, atol=1e-5
    )


@pytest.mark.skipif(not HAVE_FAISS, reason="FAISS not installed")
@pytest.mark.parametrize("scan_bits", [2, 4])
@pytest.mark.parametrize("bits", [3, 4])
def test_fastscan_shortlist_agrees_with_exact_scan(scan_bits: int, bits: int) -> None:
    x, q = _data(n=3000, dim=96, nq=50)
    fast = TurboQuantIndex(96, bits, engine="fastscan", scan_bits=scan_bits)
    exact = TurboQuantIndex(96, bits, engine="torch")
    fast.add(x)
    exact.add(x)
    _, a = fast.search(q, 10)
    _, b = exact.search(q, 10)
    assert np.mean([len(np.intersect1d(u, v)) / 10 for u, v in zip(a, b)]) > 0.97


def test_metrics() -> None:
    x, q = _data(n=400, dim=48, unit=False)
    x *= np.random.default_rng(1).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)
    # l2: ascending estimated squared distances close to the true ones
    l2 = TurboQuantIndex(48, 4, "l2")
    l2.add(x)
    d, i = l2.search(q, 5)
    assert np.all(np.diff(d, axis=1) >= 0)
    true = ((q[:, None, :] - x[i]) ** 2).sum(-1)
    np.testing.assert_allclose(d, true, rtol=0.1)
    # cosine: invariant to rescaling stored vectors and queries
    cos = TurboQuantIndex(48, 4, "cosine")
    cos.add(x)
    s1, i1 = cos.search(q, 5)
    cos2 = TurboQuantIndex(48, 4, "cosine")
    cos2.add(x * 3.0)
    s2, i2 = cos2.search(q * 0.1, 5)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    assert np.all(s1 <= 1.05)
    # ip with very different norms: the big-norm vector wins, as exact MIPS says
    ip = TurboQuantIndex(48, 4, "ip")
    ip.add(x)
    _, top = ip.search(q, 5)
    exact = np.argmax(q @ x.T, axis=1)
    assert np.mean((top == exact[:, None]).any(1)) >= 0.95  # would fail if norms were ignored


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def brown_small(brown_embeddings: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base, queries = brown_embeddings
    base, queries = base[:10000], queries[:200]
    gt = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    return base, queries, gt


def _recall10(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[:10], b)) / 10 for a, b in zip(ids, gt)]))


@pytest.mark.slow
@pytest.mark.parametrize("bits,floor", [(1, 0.62), (2, 0.79), (3, 0.87), (4, 0.93)])
def test_recall_floor_on_real_embeddings(brown_small: tuple, bits: int, floor: float) -> None:
    base, queries, gt = brown_small
    index = TurboQuantIndex(384, bits, "ip")
    index.add(base)
    _, ids = index.search(queries, 10)
    corrected = _recall10(ids, gt)
    assert corrected >= floor
    if bits >= 2:  # the norm correction is what beats plain TurboQuant_mse ranking
        plain = TurboQuantIndex(384, bits, "ip", correction=False)
        plain.add(base)
        _, plain_ids = plain.search(queries, 10)
        assert corrected > _recall10(plain_ids, gt)


# --------------------------------------------------------------------------- add / remove / ids


def test_streaming_add_equals_one_add_and_ids() -> None:
    x, q = _data(n=257)
    whole = TurboQuantIndex(64, 4)
    whole.add(x)
    parts = TurboQuantIndex(64, 4)
    for chunk in np.array_split(np.arange(len(x)), [1, 2, 33, 100, 200]):
        parts.add(x[chunk])
    assert len(parts) == len(whole) == parts.ntotal == 257
    for a, b in zip(whole.search(q, 7), parts.search(q, 7)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(parts.ids, np.arange(257))
    assert parts.nbytes == 257 * parts.bytes_per_vector == 257 * (32 + 4)  # implicit ids are not stored


def test_custom_ids_remove_and_nbytes() -> None:
    x, _ = _data(n=100)
    index = TurboQuantIndex(64, 2)
    big = np.arange(100, dtype=np.int64) * 1_000_003 + 2**40
    assert np.array_equal(index.add(x, ids=big), big)
    assert index.nbytes == 100 * (index.bytes_per_vector + 8)
    _, ids = index.search(x[:5], 1)
    np.testing.assert_array_equal(ids[:, 0], big[:5])
    assert index.remove(big[:5]) == 5 and len(index) == 95
    _, ids = index.search(x[:5], 3)
    assert not np.isin(ids, big[:5]).any()
    with pytest.raises(TurboQuantError, match="not in the index"):
        index.remove([big[6], 12345])
    assert len(index) == 95  # nothing removed on error
    new = index.add(x[:2])  # default ids continue after the largest id seen
    assert new[0] == big[-1] + 1 and len(index) == 97
    index.reset()
    assert len(index) == 0 and index.nbytes == 0


def test_remove_then_fastscan_rebuild() -> None:
    x, q = _data(n=500)
    index = TurboQuantIndex(64, 4)
    index.add(x)
    index.search(q, 3)
    index.remove(np.arange(0, 500, 2))
    _, ids = index.search(x[1:20:2], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(1, 20, 2))


def test_reconstruct_close_to_input() -> None:
    x, _ = _data(n=50, dim=128)
    index = TurboQuantIndex(128, 4)
    index.add(x)
    rec = index.reconstruct([3, 7, 11])
    err = np.sum((rec - x[[3, 7, 11]]) ** 2, axis=1)
    assert np.all(err < 0.03)  # unit vectors, 4 bits: D_mse ≈ 0.0095


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 80), dim=st.sampled_from([8, 33, 64]), nq=st.integers(0, 5),
    k=st.integers(1, 10), bits=st.sampled_from([1, 2, 3, 4, 1.5]), metric=st.sampled_from(["ip", "cosine", "l2"]),
    engine=st.sampled_from(ENGINES), split=st.integers(1, 80),
)  # fmt: skip
def test_shapes_and_ids_property(
    n: int, dim: int, nq: int, k: int, bits: float, metric: str, engine: str, split: int
) -> None:
    if bits == 1.5 and dim % 2:
        bits = 1
    x, q = _data(n=n, dim=dim, nq=nq, seed=n + dim)
    index = TurboQuantIndex(dim, bits, metric, engine=engine)  # type: ignore[arg-type]
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    for start in range(0, n, split):
        index.add(x[start : start + split], ids=ids[start : start + split])
    k = min(k, n)
    scores, found = index.search(q, k)
    assert scores.shape == found.shape == (nq, k) and scores.dtype == np.float32 and found.dtype == np.int64
    assert np.isin(found, ids).all()
    assert all(len(set(row)) == k for row in found)
    if nq:
        assert np.all(np.diff(scores, axis=1) >= 0) if metric == "l2" else np.all(np.diff(scores, axis=1) <= 0)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 8, 2.5, 3.25]), seed=st.integers(0, 2**16))
def test_table_bucketize_encoder_is_bit_exact(bits: float, seed: int) -> None:
    """The CPU encode (float-key table + exact fallback) equals torch.bucketize + packing, bit for bit."""
    cfg = QuantizerConfig(128, bits)
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(64, 128, generator=g) / 128**0.5
    n_hi, _, _, b_lo = cfg.bit_split
    _, bounds = codebook_tensors(128, b_lo)
    y[0, n_hi : n_hi + len(bounds)] = bounds[: 128 - n_hi]  # exactly on boundaries
    y[1] = 0.0
    y[2] = -0.0
    y[3] = torch.nextafter(y[0], torch.tensor(1.0))
    reference = torch.cat(
        [pack_codes(torch.bucketize(y[:, s.first : s.first + s.count].contiguous(), codebook_tensors(128, s.width)[1]), s.width) for s in layout(cfg).streams],
        dim=1,
    )
    np.testing.assert_array_equal(encode_mse(y, cfg).numpy(), reference.numpy())


def test_torch_io_and_dtypes() -> None:
    x, q = _data(n=200)
    index = TurboQuantIndex(64, 4)
    index.add(torch.from_numpy(x).to(torch.float16))
    scores, ids = index.search(torch.from_numpy(q).double(), 4)
    assert isinstance(scores, torch.Tensor) and isinstance(ids, torch.Tensor) and ids.dtype == torch.int64
    s2, i2 = index.search(q[0], 4)  # 1-D query
    assert s2.shape == (1, 4)
    np.testing.assert_array_equal(i2[0], ids[0].numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_search_on_cuda() -> None:
    x, q = _data(n=2000)
    index = TurboQuantIndex(64, 4)
    index.add(torch.from_numpy(x).cuda())
    assert index.device.type == "cuda"
    scores, ids = index.search(torch.from_numpy(q).cuda(), 10)
    assert scores.device.type == "cuda" and ids.device.type == "cuda"
    cpu = TurboQuantIndex(64, 4, engine="torch")
    cpu.add(x)
    s_cpu, i_cpu = cpu.search(q, 10)
    assert np.mean(ids.cpu().numpy() == i_cpu) > 0.99
    np.testing.assert_allclose(scores.cpu().numpy(), s_cpu, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- errors


def test_bad_input_errors() -> None:
    x, q = _data(n=20)
    index = TurboQuantIndex(64, 4)
    with pytest.raises(TurboQuantError, match="empty"):
        index.search(q, 1)
    with pytest.raises(TurboQuantError, match="shape"):
        index.add(x[:, :32])
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(TurboQuantError, match="NaN"):
        index.add(bad)
    bad[3, 5] = np.inf
    with pytest.raises(TurboQuantError, match="NaN or Inf"):
        index.add(bad)
    assert len(index) == 0  # failed adds leave nothing behind
    index.add(x)
    with pytest.raises(TurboQuantError, match="exceeds"):
        index.search(q, 21)
    with pytest.raises(TurboQuantError, match="positive"):
        index.search(q, 0)
    with pytest.raises(TurboQuantError, match="shape"):
        index.search(q[:, :10], 1)
    q_bad = q.copy()
    q_bad[0, 0] = np.inf
    with pytest.raises(TurboQuantError, match="NaN or Inf"):
        index.search(q_bad, 1)
    with pytest.raises(TurboQuantError, match="dtype"):
        index.add(np.ones((2, 64), dtype=np.int32))
    with pytest.raises(TurboQuantError, match="non-negative"):
        index.add(x[:2], ids=[-1, 5])
    with pytest.raises(TurboQuantError, match="integers"):
        index.add(x[:2], ids=[0.5, 1.5])
    with pytest.raises(TurboQuantError, match="1-D sequence of 2"):
        index.add(x[:2], ids=[1, 2, 3])
    with pytest.raises(TurboQuantError, match="metric"):
        TurboQuantIndex(64, 4, "hamming")  # type: ignore[arg-type]
    with pytest.raises(TurboQuantError, match="bits"):
        TurboQuantIndex(64, 9)
    with pytest.raises(TurboQuantError, match="zero vector"):
        TurboQuantIndex(64, 4, "cosine").add(np.zeros((1, 64), np.float32))
    if HAVE_FAISS:
        with pytest.raises(TurboQuantError, match="up to 4 bits"):
            TurboQuantIndex(64, 5, engine="fastscan", scan_bits=4)
        with pytest.raises(TurboQuantError, match="scan_bits"):
            TurboQuantIndex(64, 4, scan_bits=3)


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path: Path, mmap: bool) -> None:
    x, q = _data(n=300)
    index = TurboQuantIndex(64, 3.5, "cosine", seed=5, norm_dtype="float16")
    index.add(x[:200], ids=np.arange(200) + 10**12)
    index.remove([10**12 + 1])
    path = tmp_path / "idx.tq"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["idx.tq"]  # atomic: no temp file left
    loaded = TurboQuantIndex.load(path, mmap=mmap)
    assert loaded.config == index.config and loaded.metric == "cosine" and len(loaded) == 199
    assert loaded.nbytes == index.nbytes
    for a, b in zip(index.search(q, 5), loaded.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    loaded.add(x[200:])  # a mapped index copies on first write
    assert loaded.add(x[:1])[0] == 10**12 + 200 + 100
    assert len(TurboQuantIndex.load(path)) == 199  # the file is unchanged
    empty = TurboQuantIndex(64, 2)
    empty.save(tmp_path / "empty.tq")
    assert len(TurboQuantIndex.load(tmp_path / "empty.tq", mmap=mmap)) == 0


@pytest.mark.parametrize("mmap", [False, True])
def test_corrupt_and_truncated_files(tmp_path: Path, mmap: bool) -> None:
    x, _ = _data(n=100)
    index = TurboQuantIndex(64, 4)
    index.add(x)
    path = tmp_path / "idx.tq"
    index.save(path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    cases = {
        "data": lambda b: b[:-100] + bytes([b[-100] ^ 0x01]) + b[-99:],
        "truncated": lambda b: b[: len(b) - 37],
        "header_only": lambda b: b[: 8 + header_len],
        "tiny": lambda b: b[:5],
        "header_byte": lambda b: b[:40] + bytes([b[40] ^ 0x20]) + b[41:],
        "count": lambda b: b.replace(b'\\"count\\": 100', b'\\"count\\": 101'),
    }
    for name, corrupt in cases.items():
        bad = tmp_path / f"{name}.tq"
        bad.write_bytes(corrupt(raw))
        assert bad.read_bytes() != raw, name
        with pytest.raises(TurboQuantError):
            TurboQuantIndex.load(bad, mmap=mmap)
    with pytest.raises(TurboQuantError, match="no such file"):
        TurboQuantIndex.load(tmp_path / "missing.tq", mmap=mmap)
    codes_file = tmp_path / "codes.tq"  # a valid turboquant file of another kind
    save_codes(codes_file, TurboQuantMSE(64, 4).quantize(torch.randn(3, 64)))
    with pytest.raises(TurboQuantError):
        TurboQuantIndex.load(codes_file, mmap=mmap)


# --------------------------------------------------------------------------- threads


def test_search_during_concurrent_add() -> None:
    x, q = _data(n=4000)
    index = TurboQuantIndex(64, 4)
    index.add(x[:100])
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for start in range(100, 4000, 50):
                index.add(x[start : start + 50])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread via `errors`
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    searches = 0
    while not done.is_set() or searches < 5:
        n_before = len(index)
        _, ids = index.search(q, 10)
        assert ids.min() >= 0 and ids.max() < max(n_before, len(index))
        searches += 1
    thread.join()
    assert not errors and len(index) == 4000
    _, ids = index.search(x[3990:], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(3990, 4000))


# --------------------------------------------------------------------------- CLI


def test_cli_build_search_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, q = _data(n=300)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    out = tmp_path / "idx.tq"
    assert cli_main(["index", "build", "--input", str(tmp_path / "x.npy"), "--bits", "4", "--out", str(out), "-q"]) == 0
    assert cli_main(["index", "search", "--index", str(out), "--queries", str(tmp_path / "q.npy"), "-k", "3",
                     "--out", str(tmp_path / "r.npz"), "-q"]) == 0  # fmt: skip
    res = np.load(tmp_path / "r.npz")
    index = TurboQuantIndex.load(out)
    np.testing.assert_array_equal(res["ids"], index.search(q, 3)[1])
    capsys.readouterr()
    assert (
        cli_main(["index", "search", "--index", str(out), "--queries", str(tmp_path / "q.npy"), "-k", "2", "--json"])
        == 0
    )
    assert capsys.readouterr().out.count('"ids"') == len(q)
    assert cli_main(["index", "info", "--index", str(out)]) == 0
    assert '"vectors": 300' in capsys.readouterr().out
    assert cli_main(["index", "search", "--index", str(out), "--queries", str(tmp_path / "q.npy"), "-k", "999"]) == 2
    assert "exceeds" in capsys.readouterr().err
    assert cli_main(["index", "build", "--input", str(tmp_path / "nope.npy"), "--out", str(out)]) == 2


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
@pytest.mark.parametrize("bits", [2, 4])
def test_single_query_fast_path_checks_and_matches_the_batch(metric: str, bits: int) -> None:
    """One query (its finiteness checked inside the C call for ``ip``) answers as its row of a batch,
    and a NaN, an Inf or a norm that overflows float32 is refused, not ranked."""
    x, q = _data(n=300)
    index = TurboQuantIndex(64, bits, metric)  # type: ignore[arg-type]
    index.add(x)
    scores, ids = index.search(q, 7)
    for i in range(len(q)):
        s1, i1 = index.search(q[i], 7)
        np.testing.assert_array_equal(i1[0], ids[i])
        np.testing.assert_allclose(s1[0], scores[i], rtol=1e-6, atol=1e-6)
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = q[:1].copy()
        bad[0, 17] = bad_value
        with pytest.raises(TurboQuantError, match="NaN or Inf"):
            index.search(bad, 3)
    huge = np.full((1, 64), 3e19, np.float32)  # finite elements, squared norm overflows float32
    with pytest.raises(TurboQuantError, match="NaN or Inf"):
        index.search(huge, 3)
