"""Distortion measurements (benchmarks/distortion.py): MSE vs the exact Lloyd-Max cost, unbiasedness, report."""

from __future__ import annotations

import json

import pytest
import torch

from turboquant import QuantizerConfig, TurboQuantMSE, TurboQuantProd
from turboquant.codebook import exact_mse, lloyd_max_codebook

from conftest import load_benchmark

_bench = load_benchmark("distortion")
Estimate, main, measure = _bench.Estimate, _bench.main, _bench.measure
measure_inner_product, measure_mse, random_unit = _bench.measure_inner_product, _bench.measure_mse, _bench.random_unit


@pytest.fixture(autouse=True)
def _one_thread():
    # many small ops: on a shared 2-core CPU intra-op threads make these tests several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_matches_lloyd_max_cost(bits: int) -> None:
    # 8192 vectors: the 95% CI half-width is 0.3-0.8% of the cost, so 3% is > 4 sigma
    d = 128
    r = measure_mse(TurboQuantMSE(d, bits, seed=1), random_unit(8192, d, seed=bits))
    expected = lloyd_max_codebook(d, bits).unit_vector_mse
    assert r.exact == pytest.approx(expected, rel=1e-12)
    assert abs(r.rel_err) < 0.03, f"measured {r.mse.mean:.5f} vs exact {expected:.5f} ({100 * r.rel_err:+.2f}%)"
    assert r.mse.contains(expected) or abs(r.rel_err) < 0.01
    assert r.lower < r.mse.mean < r.upper


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_prod_bias_ci_contains_zero_over_seeds(bits: int) -> None:
    # y correlated with x (so the mse estimator's shrinkage is large); fixed seeds: deterministic
    d, n = 64, 4096
    x = random_unit(n, d, seed=10 + bits)
    y = x + torch.randn(n, d, generator=torch.Generator().manual_seed(20 + bits)) / d**0.5
    prod = measure_inner_product([TurboQuantProd(d, bits, seed=s) for s in range(16)], x, y)
    assert prod.bias.groups == 16
    assert prod.bias.contains(0.0), f"prod bias {prod.bias.mean:+.5f} ± {prod.bias.ci95:.5f}"
    mse = measure_inner_product([TurboQuantMSE(d, bits, seed=s) for s in range(16)], x, y)
    assert not mse.bias.contains(0.0)
    # E[est − <y,x>] = −D_mse·‖x‖² for y = x + independent noise (Lloyd-Max centroid condition)
    assert mse.relative_bias == pytest.approx(-exact_mse(QuantizerConfig(d, bits)), abs=0.02)


def test_inner_product_error_matches_theory_and_api() -> None:
    # independent unit y: d·E[(<y,x> − est)²] equals the reconstruction MSE of the variant
    d, n = 128, 4096
    x, y = random_unit(n, d, seed=1), random_unit(n, d, seed=2)
    for q in (TurboQuantMSE(d, 2), TurboQuantProd(d, 3)):
        mse, (ip,) = measure(q, x, y)
        assert ip.normalised == pytest.approx(exact_mse(q.config), rel=0.1)
        assert mse.mse.mean == pytest.approx(exact_mse(q.config), rel=0.05)
        # the paired estimator is inner_product's diagonal
        codes = q.quantize(x[:50])
        est = torch.diagonal(q.inner_product(y[:50], codes)).double()
        err = est - (x[:50].double() * y[:50].double()).sum(-1)
        direct = measure_inner_product(q, x[:50], y[:50])
        assert direct.bias.mean == pytest.approx(float(err.mean()), abs=1e-5)


def test_estimate_confidence_interval() -> None:
    e = Estimate.from_groups([torch.tensor([1.0, 2.0, 3.0, 4.0])])
    assert e.mean == 2.5 and e.n == 4 and e.groups == 1
    assert e.ci95 == pytest.approx(3.182446 * e.std / 2, rel=1e-4)  # t(0.975, 3) · s/√n
    g = Estimate.from_groups([torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])])
    assert g.groups == 2 and g.mean == 2.0 and g.contains(2.0)


def test_main_quick_writes_report(tmp_path) -> None:
    assert main(["--quick", "--out", str(tmp_path), "--dims", "64", "--bits", "2", "2.5"]) == 0
    report = json.loads((tmp_path / "distortion.json").read_text())
    assert {"machine", "settings", "random", "real", "rotation", "summary"} <= set(report)
    row = report["random"][0]
    for key in ("dim", "bits", "variant", "mse", "mse_exact", "mse_rel_err", "mse_lower_bound", "mse_upper_bound", "ip", "bias"):
        assert key in row
    assert {"mean", "ci95", "lo", "hi"} <= set(row["bias"]["bias"])
    assert "bias_zero_in_ci" in row["bias"] and "normalised" in row["ip"]
    assert {r["variant"] for r in report["random"]} == {"mse", "prod"}
    assert {"hadamard", "haar"} <= set(report["rotation"][0])
    assert "prod_bias_zero_in_ci" in report["summary"]
