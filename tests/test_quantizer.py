"""Quantizers: MSE vs theory, unbiasedness, numpy/torch parity, shapes, dtypes and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant import QJL, QuantizerConfig, TurboQuantError, TurboQuantMSE, TurboQuantProd
from turboquant.codebook import lloyd_max_codebook
from turboquant.codec import bytes_per_vector


def _unit(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("rotation", ["hadamard", "haar"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_matches_lloyd_max_cost(rotation: str, bits: int) -> None:
    d, n = 128, 4000
    x = _unit(n, d, seed=bits)
    q = TurboQuantMSE(d, bits, rotation=rotation, seed=11)
    err = ((q.dequantize(q.quantize(x)) - x) ** 2).sum(-1)
    expected = lloyd_max_codebook(d, bits).unit_vector_mse
    # standard error of the mean is ~1% here: 4 sigma
    assert err.mean().item() == pytest.approx(expected, rel=0.04), f"measured {err.mean().item():.5f} vs {expected:.5f}"


def test_fractional_bits_interpolate_mse() -> None:
    d = 128
    x = _unit(3000, d)
    q = TurboQuantMSE(d, 2.5)
    assert q.config.bit_split == (64, 3, 64, 2)
    codes = q.quantize(x)
    assert codes.codes.shape[-1] == 128 * 2.5 / 8
    err = ((q.dequantize(codes) - x) ** 2).sum(-1).mean().item()
    expected = 0.5 * (lloyd_max_codebook(d, 3).unit_vector_mse + lloyd_max_codebook(d, 2).unit_vector_mse)
    assert err == pytest.approx(expected, rel=0.04)
    assert QuantizerConfig(128, 2.25).bit_split == (32, 3, 96, 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_inner_product_is_unbiased(bits: int) -> None:
    # y strongly correlated with x, where the MSE estimator's shrinkage bias is visible.
    d, n = 64, 6000
    x = _unit(n, d, seed=100 + bits, dtype=torch.float64)
    y = x[0] + 0.1 * _unit(1, d, seed=7, dtype=torch.float64)[0]
    xs = x[0:1].expand(n, d) + 0.0  # many independent quantizations need many seeds; use many vectors instead
    del xs
    true = (x @ y).float()
    prod = TurboQuantProd(d, bits, seed=5)
    est = prod.inner_product(y.float(), prod.quantize(x.float()))
    err = (est - true).double()
    ci = 4 * err.std().item() / math.sqrt(n)
    assert abs(err.mean().item()) < ci, f"prod bias {err.mean().item():.4g} outside ±{ci:.3g}"


def test_mse_estimator_is_biased_low_and_prod_is_not() -> None:
    # <y, x> with y = x: MSE reconstruction shrinks (E<x, x̂> = 1 - D_mse); prod must not.
    d, n = 128, 3000
    x = _unit(n, d, seed=3)
    mse, prod = TurboQuantMSE(d, 2), TurboQuantProd(d, 2)
    mse_est = (x * mse.dequantize(mse.quantize(x))).sum(-1)
    prod_codes = prod.quantize(x)
    prod_est = (x * prod.dequantize(prod_codes)).sum(-1)
    d_mse = lloyd_max_codebook(d, 2).unit_vector_mse
    assert mse_est.mean().item() == pytest.approx(1 - d_mse, abs=0.01)
    assert prod_est.mean().item() == pytest.approx(1.0, abs=4 * prod_est.std().item() / math.sqrt(n))


@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
def test_inner_product_equals_dequantized_dot(cls: type) -> None:
    d = 80
    x = torch.randn(300, d) * 3
    q_vecs = torch.randn(5, d)
    quant = cls(d, 3, seed=2)
    codes = quant.quantize(x)
    expected = q_vecs @ quant.dequantize(codes).T
    torch.testing.assert_close(quant.inner_product(q_vecs, codes), expected, atol=2e-4, rtol=2e-4)


def test_qjl_is_prod_with_one_bit() -> None:
    d = 64
    q = QJL(d, seed=1)
    x = torch.randn(10, d)
    codes = q.quantize(x)
    assert codes.codes.shape[-1] == 0 and codes.qjl is not None and codes.qjl.shape[-1] == d // 8
    assert codes.nbytes == 10 * (d // 8 + 8)


def test_nbytes_is_exact_storage() -> None:
    for bits, d in [(1, 64), (3, 80), (5, 96), (7, 128), (2.5, 128)]:
        q = TurboQuantMSE(d, bits)
        codes = q.quantize(torch.randn(7, d))
        assert codes.nbytes == 7 * (math.ceil(bits * d / 8) + 4) == 7 * bytes_per_vector(q.config)
    p = TurboQuantProd(128, 4, norm_dtype="float16")
    assert p.quantize(torch.randn(3, 128)).nbytes == 3 * (48 + 16 + 2 + 2)


def test_zero_vectors_and_any_norm() -> None:
    """Zero vectors decode to exactly 0; vectors of norm ~1e5 have the relative MSE of unit vectors."""
    from turboquant.codebook import exact_mse

    q = TurboQuantProd(64, 3)
    x = torch.zeros(66, 64)
    x[1:65] = 1e4 * torch.randn(64, 64, generator=torch.Generator().manual_seed(5))
    out = q.dequantize(q.quantize(x))
    assert torch.equal(out[0], torch.zeros(64)) and torch.equal(out[65], torch.zeros(64))
    rel_mse = ((out[1:65] - x[1:65]).square().sum(1) / x[1:65].square().sum(1)).mean().item()
    assert rel_mse == pytest.approx(exact_mse(q.config), rel=0.35), (rel_mse, exact_mse(q.config))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_round_trip(dtype: torch.dtype) -> None:
    q = TurboQuantMSE(64, 4)
    x = torch.randn(5, 64).to(dtype)
    out = q.dequantize(q.quantize(x), dtype=dtype)
    assert out.dtype == dtype
    assert ((out.float() - x.float()).norm() / x.float().norm()).item() < 0.15


def test_numpy_in_numpy_out_matches_torch() -> None:
    q = TurboQuantProd(96, 3, seed=4)
    x = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32)
    codes_np = q.quantize(x)
    codes_t = q.quantize(torch.from_numpy(x))
    assert torch.equal(codes_np.codes, codes_t.codes) and torch.equal(codes_np.qjl, codes_t.qjl)
    out = q.dequantize(codes_np)
    assert isinstance(out, np.ndarray) and out.shape == (6, 96)
    np.testing.assert_allclose(out, q.dequantize(codes_t).numpy(), rtol=0, atol=0)
    scores = q.inner_product(x[:2], codes_np)
    assert isinstance(scores, np.ndarray) and scores.shape == (2, 6)


@pytest.mark.parametrize("cls", [TurboQuantMSE, TurboQuantProd])
def test_seeded_determinism(cls: type) -> None:
    x = torch.randn(4, 128)
    a, b, c = cls(128, 3, seed=9), cls(128, 3, seed=9), cls(128, 3, seed=10)
    assert torch.equal(a.quantize(x).codes, b.quantize(x).codes)
    assert not torch.equal(a.quantize(x).codes, c.quantize(x).codes)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    dim=st.sampled_from([2, 3, 7, 16, 33, 64, 80, 96]),
    bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
    prod=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shapes_property(dim: int, bits: int, lead: list[int], prod: bool, seed: int) -> None:
    q = TurboQuantProd(dim, bits) if prod else TurboQuantMSE(dim, bits)
    x = torch.randn(*lead, dim, generator=torch.Generator().manual_seed(seed))
    codes = q.quantize(x)
    assert codes.shape == tuple(lead)
    assert codes.codes.shape == (*lead, math.ceil((bits - prod) * dim / 8))
    assert q.dequantize(codes).shape == x.shape
    assert q.inner_product(torch.randn(2, dim), codes).shape == (2, *lead)
    if x.numel():
        # reconstruction error bounded by the vector norm (pure QJL at tiny d is noisier: E‖e‖² = (π/2 − 1/d)‖x‖²)
        bound = 3.0 if (prod and bits == 1) else 1.5
        assert ((q.dequantize(codes) - x).norm(dim=-1) <= bound * x.norm(dim=-1) + 1e-5).all()


def test_errors_name_the_problem() -> None:
    q = TurboQuantMSE(64, 2)
    with pytest.raises(TurboQuantError, match="last dimension 64"):
        q.quantize(torch.randn(3, 63))
    with pytest.raises(TurboQuantError, match="NaN or Inf"):
        q.quantize(torch.tensor([[float("nan")] * 64]))
    with pytest.raises(TurboQuantError, match="NaN or Inf"):
        q.quantize(torch.full((1, 64), float("inf")))
    with pytest.raises(TurboQuantError, match="unsupported dtype"):
        q.quantize(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(TurboQuantError, match="numpy dtype"):
        q.quantize(np.ones((2, 64), dtype=np.int64))
    with pytest.raises(TurboQuantError, match="must be a torch.Tensor"):
        q.quantize([1.0] * 64)  # type: ignore[arg-type]
    with pytest.raises(TurboQuantError, match="bits=9"):
        TurboQuantMSE(64, 9)
    with pytest.raises(TurboQuantError, match="bits=0"):
        TurboQuantMSE(64, 0)
    with pytest.raises(TurboQuantError, match="dim=1"):
        TurboQuantMSE(1, 2)
    with pytest.raises(TurboQuantError, match="rotation"):
        TurboQuantMSE(64, 2, rotation="dct")
    with pytest.raises(TurboQuantError, match="cannot be realised"):
        TurboQuantMSE(10, 2.33)
    with pytest.raises(TurboQuantError, match="norm_dtype"):
        TurboQuantMSE(64, 2, norm_dtype="int8")
    with pytest.raises(TurboQuantError, match="overflows"):
        TurboQuantMSE(64, 2, norm_dtype="float16").quantize(torch.full((1, 64), 1e5))
    with pytest.raises(TurboQuantError, match="made by"):
        TurboQuantMSE(64, 3).dequantize(q.quantize(torch.randn(1, 64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    q = TurboQuantProd(128, 3)
    x = torch.randn(64, 128)
    cpu, gpu = q.quantize(x), q.quantize(x.cuda())
    assert (cpu.codes == gpu.codes.cpu()).float().mean() > 0.999
    torch.testing.assert_close(q.dequantize(gpu).cpu(), q.dequantize(cpu), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
def test_large_cpu_batches_under_every_autograd_mode(mode: str) -> None:
    """The CPU encode/rotation split large batches over worker threads (turboquant/threads.py);
    grad and inference modes are thread-local, so the workers must run under the caller's."""
    torch.set_num_threads(2)
    q = TurboQuantMSE(256, 4)
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0))  # > 2 chunks of the fast path
    ctx = {"inference": torch.inference_mode(), "no_grad": torch.no_grad(), "grad": torch.enable_grad()}[mode]
    with ctx:
        codes = q.quantize(x)
        x_hat = q.dequantize(codes)
    reference = q.dequantize(q.quantize(x))
    assert torch.equal(x_hat, reference)
    assert ((x_hat - x).square().sum(1) / x.square().sum(1)).mean() < 0.02
