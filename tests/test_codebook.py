"""Codebooks: compare with independent float64 numerical integration and with the paper's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special

from turboquant.codebook import lloyd_max_codebook, mse_lower_bound, mse_upper_bound
from turboquant.config import TurboQuantError


def _density(dim: int):
    log_c = special.gammaln(dim / 2) - special.gammaln((dim - 1) / 2) - 0.5 * math.log(math.pi)
    return lambda t: math.exp(log_c) * (1 - t * t) ** ((dim - 3) / 2)


@pytest.mark.parametrize("dim", [3, 8, 64, 200])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_centroids_are_conditional_means_under_scipy_quadrature(dim: int, bits: int) -> None:
    cb = lloyd_max_codebook(dim, bits)
    f = _density(dim)
    edges = np.concatenate([[-1.0], cb.boundaries, [1.0]])
    mse = 0.0
    for i, c in enumerate(cb.centroids):
        a, b = edges[i], edges[i + 1]
        mass = integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
        first = integrate.quad(lambda t: t * f(t), a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
        mse += integrate.quad(lambda t: (t - c) ** 2 * f(t), a, b, epsabs=1e-15, epsrel=1e-12, limit=200)[0]
        assert first / mass == pytest.approx(c, abs=1e-8 / math.sqrt(dim)), f"centroid {i} is not the cell mean"
    np.testing.assert_allclose(cb.boundaries, 0.5 * (cb.centroids[1:] + cb.centroids[:-1]), rtol=0, atol=1e-15)
    assert cb.mse_per_coordinate == pytest.approx(mse, rel=1e-6)


@pytest.mark.parametrize("bits,expected", [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)])
def test_large_dim_matches_paper_values(bits: int, expected: float) -> None:
    cb = lloyd_max_codebook(100_000, bits)
    assert cb.unit_vector_mse == pytest.approx(expected, rel=2e-3)
    assert mse_lower_bound(bits) < cb.unit_vector_mse < mse_upper_bound(bits)


def test_arcsine_and_uniform_closed_forms() -> None:
    # d=2: density is arcsine; 1-bit centroids are ±2/π. d=3: uniform on [-1, 1].
    np.testing.assert_allclose(lloyd_max_codebook(2, 1).centroids, [-2 / math.pi, 2 / math.pi], atol=1e-9)
    uniform = lloyd_max_codebook(3, 3)
    np.testing.assert_allclose(uniform.centroids, (np.arange(8) + 0.5) / 4 - 1, atol=1e-9)
    assert uniform.unit_vector_mse == pytest.approx(3 * (0.25**2) / 12, rel=1e-8)


@pytest.mark.parametrize("dim", [2, 5, 64, 1536])
def test_all_widths_converge_symmetric_and_sorted(dim: int) -> None:
    previous = math.inf
    for bits in range(1, 9):
        cb = lloyd_max_codebook(dim, bits)
        assert cb.centroids.shape == (1 << bits,)
        assert np.all(np.diff(cb.centroids) > 0)
        np.testing.assert_allclose(cb.centroids, -cb.centroids[::-1], atol=1e-15)
        assert cb.unit_vector_mse < previous
        previous = cb.unit_vector_mse


@pytest.mark.parametrize("dim,bits", [(1, 2), (64, 0), (64, 9), (64, 2.5)])
def test_rejects_bad_arguments(dim: object, bits: object) -> None:
    with pytest.raises(TurboQuantError):
        lloyd_max_codebook(dim, bits)  # type: ignore[arg-type]
