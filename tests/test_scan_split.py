"""Codes stored once (turboquant/kernels/scan_split.py): the scan's blocked nibbles + the low-bit plane.

Every result is compared with the index as it was before the split storage: the same index with the
split turned off (``split_spec`` -> None keeps the row-major codes beside the scan mirror), with a
float64 numpy reference of the exact scores, and across save -> load in both file versions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turboquant.codec import code_bytes, decode_mse_numpy, encode
from turboquant.config import QuantizerConfig, TurboQuantError
from turboquant.fastscan import nibble_plan
from turboquant.index import TurboQuantIndex
from turboquant.index_file import digest
from turboquant.io import save_tensors, tensors_checksum
from turboquant.kernels import cpu_scan
from turboquant.kernels.cpu_scan import OWN_CODES, ScanMirror, load_scan_library, scan_layout
from turboquant.kernels.scan_split import join_codes, low_plane, split_spec, unpack_nibbles

LIB = load_scan_library()
pytestmark = pytest.mark.skipif(LIB is None, reason="no compiled scan kernel")


def _codes(dim: int, bits: float, n: int, seed: int = 0) -> tuple[QuantizerConfig, np.ndarray]:
    cfg = QuantizerConfig(dim, bits)
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))
    return cfg, encode(x, cfg).codes.numpy()


@pytest.fixture
def rows_only(monkeypatch: pytest.MonkeyPatch):
    """Build indexes as before the split storage (row-major codes + a scan mirror); returns a builder."""

    def build(*args, **kw) -> TurboQuantIndex:
        with monkeypatch.context() as m:
            m.setattr(cpu_scan, "split_spec", lambda *a: None)
            index = TurboQuantIndex(*args, **kw.pop("options", {}))
            for part in kw["parts"]:
                index.add(part)
            index.search(part[:1], 1)  # builds the (non-split) mirror under the patch
            assert index._split() is None
            return index

    return build


@pytest.mark.parametrize("variant", ["native", "avx2", "scalar"])
@pytest.mark.parametrize(
    ("dim", "bits", "scan_bits"),
    [(96, 4, 2), (97, 4, 2), (50, 2, 2), (64, 2, 2), (70, 2, 1), (33, 2, 1), (128, 2, 1), (96, 4, 4), (30, 1, 1), (64, 1, 1)],
)
def test_split_storage_rebuilds_every_code_and_rescores_bit_identically(variant, dim, bits, scan_bits) -> None:
    lib = load_scan_library(variant)
    if lib is None:
        pytest.skip(f"no {variant} build")
    n = 300 + dim  # not a multiple of 64
    cfg, codes = _codes(dim, bits, n)
    plan = nibble_plan(cfg, scan_bits)
    mirror = ScanMirror(cfg, plan, True, lib)
    assert mirror.spec is not None
    rng = np.random.default_rng(1)
    alpha, beta = rng.uniform(0.5, 2, n).astype(np.float32), -rng.uniform(0, 3, n).astype(np.float32)
    mirror.append(codes[:100], alpha[:100], beta[:100])  # the second append starts inside a block
    mirror.append(codes[100:], alpha[100:], beta[100:], threads=3)
    np.testing.assert_array_equal(mirror.codes(), codes)
    if mirror.spec.low_bytes:  # the C low plane is the numpy statement's
        np.testing.assert_array_equal(mirror.low[:n], low_plane(codes, mirror.spec))
    pos = rng.integers(-1, n, 77)
    got = mirror.codes(pos=pos)
    np.testing.assert_array_equal(got[pos >= 0], codes[pos[pos >= 0]])
    assert not got[pos < 0].any()
    # the numpy reader of the blocked layout agrees with the C one
    vnni, _ = scan_layout(lib)
    nib = unpack_nibbles(mirror.blocks, mirror.Mp, vnni, 0, n)
    low = mirror.low[:n] if mirror.spec.low_bytes else None
    np.testing.assert_array_equal(join_codes(nib, low, mirror.spec), codes)
    # the exact re-score from the split storage is the one from the stored rows, bit for bit
    q = rng.standard_normal((5, dim)).astype(np.float32)
    cand = rng.integers(-1, n, (5, 40))
    own = mirror.rescore(OWN_CODES, q, cand)
    np.testing.assert_array_equal(own, mirror.rescore(codes, q, cand))
    # ... and a float64 reference of alpha * <q, y_hat> + beta
    y = decode_mse_numpy(codes, cfg).astype(np.float64)
    ok = cand >= 0
    ref = alpha[cand].astype(np.float64) * np.einsum("qd,qcd->qc", q.astype(np.float64), y[np.maximum(cand, 0)]) + beta[cand]
    np.testing.assert_allclose(own[ok], ref[ok], rtol=1e-4, atol=1e-4)
    assert np.isneginf(own[~ok]).all()
    for nq, threads in ((5, 1), (5, 2), (1, 2)):
        a = mirror.search(q[:nq], 30, threads, codes, k=10)
        b = mirror.search(q[:nq], 30, threads, OWN_CODES, k=10)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_plans_without_a_split_keep_rows() -> None:
    for bits, scan_bits in ((3, 2), (2.5, 2), (4, 1)):
        cfg = QuantizerConfig(96, bits)
        assert split_spec(cfg, nibble_plan(cfg, scan_bits)) is None


def _compare(a: TurboQuantIndex, b: TurboQuantIndex, q: np.ndarray, k: int) -> None:
    for qq in (q, q[:1]):
        sa, ia = a.search(qq, k)
        sb, ib = b.search(qq, k)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)


def _write_v1(path, index: TurboQuantIndex) -> None:
    """A version 1 index file (row-major codes, no codes_layout), as turboquant wrote it before."""
    tensors = {"codes": index._codes.contiguous(), "norms": index._norms.contiguous()}
    if index._ids is not None:
        tensors["ids"] = index._ids.view("ids")
    meta = {"index_version": 1, "config": index.quantizer_config.to_dict(), "metric": index.metric.value,
            "correction": index.config.correction, "count": len(index), "next_id": index._next_id,
            "explicit_ids": index._ids is not None}  # fmt: skip
    save_tensors(path, tensors, "index", {"index": meta, "index_digest": digest(meta, tensors_checksum(tensors))})


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 700),
    dim=st.sampled_from([8, 31, 64, 96]),
    bits=st.sampled_from([2, 3, 4]),
    metric=st.sampled_from(["ip", "l2", "cosine"]),
    pieces=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_split_index_matches_the_row_index(rows_only, tmp_path_factory, n, dim, bits, metric, pieces, seed) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, dim)) * rng.lognormal(0, 0.2, (n, 1))).astype(np.float32)
    q = rng.standard_normal((7, dim)).astype(np.float32)
    cuts = np.sort(rng.integers(0, n + 1, pieces - 1))
    parts = [p for p in np.split(x, cuts) if len(p)]
    ref = rows_only(dim, bits, metric, parts=parts)
    index = TurboQuantIndex(dim, bits, metric)
    for p in parts:
        index.add(p)
    k = min(n, 5)
    _compare(ref, index, q, k)
    assert (index._split() is not None) == (bits != 3)
    torch.testing.assert_close(index._codes, ref._codes, rtol=0, atol=0)
    some = rng.integers(0, n, 5)
    np.testing.assert_array_equal(index.reconstruct(some), ref.reconstruct(some))
    folder = tmp_path_factory.mktemp("split")
    index.save(folder / "v2.tq")
    _write_v1(folder / "v1.tq", ref)
    for name in ("v2.tq", "v1.tq"):
        for mmap in (False, True):
            loaded = TurboQuantIndex.load(folder / name, mmap=mmap)
            _compare(ref, loaded, q, k)
            assert (loaded._split() is not None) == (bits != 3)
    # changes after the split: add (a partial last block), remove, add again
    more = rng.standard_normal((70, dim)).astype(np.float32)
    for a in (ref, index, loaded):
        a.add(more)
        a.remove([0])
        a.add(more[:3])
    _compare(ref, index, q, k)
    _compare(ref, loaded, q, k)


def test_memory_mapped_split_storage_is_searched_in_place(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 128)).astype(np.float32)
    index = TurboQuantIndex(128, 4)
    index.add(x)
    assert index._split() is not None and "codes" not in index._store.tensors
    # codes once: blocks + low plane + norms + one float factor per vector (4 of 68 bytes at d = 128)
    assert index.memory_bytes <= 1.10 * index.nbytes
    index.save(tmp_path / "x.tq")
    raw = (tmp_path / "x.tq").read_bytes()
    table = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert set(table) - {"__metadata__"} == {"norms", "scan_blocks", "low_bits"}  # no row-major codes in the file
    loaded = TurboQuantIndex.load(tmp_path / "x.tq", mmap=True)
    blocks, low = loaded._fastscan.blocks, loaded._fastscan.low
    _compare(index, loaded, x[:9], 10)
    assert loaded._fastscan.blocks is blocks and loaded._fastscan.low is low  # no copy at the first search
    loaded.add(x[:10])  # the first change copies into RAM
    assert loaded._fastscan.blocks is not blocks and loaded._fastscan.blocks.flags.writeable


def test_other_layouts_and_no_compiler_convert_at_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((900, 64)).astype(np.float32)
    index = TurboQuantIndex(64, 4, "l2")
    index.add(x)
    index.save(tmp_path / "x.tq")
    vnni, mpad = scan_layout(LIB)
    with monkeypatch.context() as m:  # a file from a machine with the other layout: rebuilt into rows
        m.setattr(cpu_scan, "scan_layout", lambda lib: (not vnni, 2 if mpad == 8 else 8))
        other = TurboQuantIndex.load(tmp_path / "x.tq", mmap=True)
        assert other._split() is None and "codes" in other._store.tensors
    torch.testing.assert_close(other._codes, index._codes, rtol=0, atol=0)
    _compare(index, other, x[:5], 10)  # the first search builds this machine's split storage
    assert other._split() is not None
    torch_engine = TurboQuantIndex.load(tmp_path / "x.tq", engine="torch")
    torch.testing.assert_close(torch_engine._codes, index._codes, rtol=0, atol=0)
    assert torch_engine._split() is None


def test_bad_split_headers_fail_clearly(tmp_path) -> None:
    rng = np.random.default_rng(3)
    index = TurboQuantIndex(32, 3)  # 3-bit codes have no split storage
    index.add(rng.standard_normal((100, 32)).astype(np.float32))
    n = len(index)
    blocks = torch.zeros((-(-n // 64), 8 * 32), dtype=torch.uint8)
    tensors = {"norms": index._norms.contiguous(), "scan_blocks": blocks}
    for layout, match in ((("x",), "codes_layout"), ({"bits": 2, "vnni": True, "mpad": 8}, "no split storage"),
                          ({"bits": 9, "vnni": True, "mpad": 8}, "bits"), ({"bits": 2, "vnni": 1, "mpad": 3}, "vnni|mpad")):  # fmt: skip
        meta = {"index_version": 2, "codes_layout": layout, "config": index.quantizer_config.to_dict(), "metric": "ip",
                "correction": True, "count": n, "next_id": n, "explicit_ids": False}  # fmt: skip
        plan = nibble_plan(index.quantizer_config, 2)
        t = dict(tensors)
        t["scan_blocks"] = torch.zeros((-(-n // 64), -(-len(plan.coords) // 8) * 8 * 32), dtype=torch.uint8)
        t["low_bits"] = torch.zeros((n, -(-code_bytes(index.quantizer_config) // 2)), dtype=torch.uint8)
        save_tensors(tmp_path / "bad.tq", t, "index", {"index": meta, "index_digest": digest(meta, tensors_checksum(t))})
        with pytest.raises(TurboQuantError, match=match):
            TurboQuantIndex.load(tmp_path / "bad.tq")
    meta["index_version"] = 3
    save_tensors(tmp_path / "v3.tq", t, "index", {"index": meta, "index_digest": digest(meta, tensors_checksum(t))})
    with pytest.raises(TurboQuantError, match="index version 3 is not supported"):
        TurboQuantIndex.load(tmp_path / "v3.tq")


def test_another_scan_plan_or_no_compiler_at_load(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import turboquant.index as index_module

    rng = np.random.default_rng(4)
    x = rng.standard_normal((700, 64)).astype(np.float32)
    index = TurboQuantIndex(64, 2, scan_bits=2)
    index.add(x)
    index.save(tmp_path / "x.tq")
    one_bit = TurboQuantIndex(64, 2, scan_bits=1)
    one_bit.add(x)
    other = TurboQuantIndex.load(tmp_path / "x.tq", mmap=True, scan_bits=1)  # rows now, its own split at the first search
    assert other._split() is None
    _compare(one_bit, other, x[:6], 5)
    assert other._split() is not None and other._fastscan.width == 1
    with monkeypatch.context() as m:  # no compiler: rows rebuilt in numpy, searched without the C scan
        m.setattr(index_module, "load_scan_library", lambda *a: None)
        plain = TurboQuantIndex.load(tmp_path / "x.tq")
        assert plain._split() is None
        torch.testing.assert_close(plain._codes, index._codes, rtol=0, atol=0)
        exact = TurboQuantIndex.load(tmp_path / "x.tq", engine="torch")
        np.testing.assert_array_equal(plain.search(x[:4], 5)[1], exact.search(x[:4], 5)[1])
