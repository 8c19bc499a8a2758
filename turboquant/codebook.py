"""Lloyd-Max codebooks for one coordinate of a random unit vector.

After a uniformly random rotation, each coordinate ``t`` of a unit vector in
``R^d`` follows (paper Lemma 1)

    f_d(t) = Γ(d/2) / (√π Γ((d-1)/2)) · (1 − t²)^((d−3)/2),   t ∈ [−1, 1],

which tends to N(0, 1/d) for large d. TurboQuant_mse quantizes each coordinate
with the optimal scalar quantizer for this density (paper Eq. 4): the
Lloyd-Max quantizer, whose centroids are the conditional means of their cells and
whose boundaries are midpoints between neighbouring centroids.

We solve it for the *exact* density, not only its Gaussian limit. Integrals use
the substitution ``t = sin θ``, under which ``f_d(t) dt ∝ cos^(d−2) θ dθ`` is smooth
for every d ≥ 2 (the d = 2 arcsine singularity disappears); the first moment has
a closed form. Lloyd iterations run until no centroid moves by more than
``TOLERANCE`` standard deviations (σ = 1/√d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import MAX_BITS, MIN_BITS, QuantizerConfig, TurboQuantError, Variant

TOLERANCE = 1e-9
"""Convergence threshold: max centroid change between Lloyd iterations, in units of σ = 1/√d."""
MAX_ITERATIONS = 500
_PANELS = 8
_NODES = 16
_TAIL_SIGMAS = 14.0  # beyond 14σ the density is < 1e-40 relative to its peak; clipping changes nothing in float64


@dataclass(frozen=True)
class Codebook:
    """A solved Lloyd-Max quantizer for ``f_d`` at ``bits`` bits.

    Attributes:
        dim: dimension d of the sphere.
        bits: bits per coordinate.
        centroids: ``(2**bits,)`` float64, ascending, symmetric about 0.
        boundaries: ``(2**bits - 1,)`` float64 midpoints between centroids.
        mse_per_coordinate: ``E[(t − Q(t))²]`` under ``f_d``; times ``dim`` this is the
            MSE of a unit vector (paper Theorem 1's ``D_mse`` before rounding,
            ≈ 0.3634, 0.1175, 0.03454, 0.009497 for b = 1..4 and large d).
        iterations: Lloyd iterations used.
    """

    dim: int
    bits: int
    centroids: np.ndarray
    boundaries: np.ndarray
    mse_per_coordinate: float
    iterations: int

    @property
    def unit_vector_mse(self) -> float:
        """Expected ``||u − û||²`` for a unit vector: ``dim · mse_per_coordinate``."""
        return self.dim * self.mse_per_coordinate


def _log_normaliser(dim: int) -> float:
    return math.lgamma(dim / 2) - math.lgamma((dim - 1) / 2) - 0.5 * math.log(math.pi)


def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(_NODES)
    return nodes, weights


def _interval_moments(dim: int, edges_theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probability mass and first moment of each cell ``[θ_i, θ_{i+1}]``.

    Mass: composite Gauss-Legendre on ``cos^(d−2) θ`` (``_PANELS`` × ``_NODES`` points per cell).
    First moment: exact, ``∫ t f(t) dt = C (cos^(d−1) θ_a − cos^(d−1) θ_b) / (d − 1)``.
    """
    log_c = _log_normaliser(dim)
    a, b = edges_theta[:-1], edges_theta[1:]
    nodes, weights = _gauss_legendre()
    panel = (b - a) / _PANELS
    starts = a[:, None] + panel[:, None] * np.arange(_PANELS)[None, :]
    theta = starts[:, :, None] + 0.5 * panel[:, None, None] * (nodes[None, None, :] + 1.0)
    with np.errstate(divide="ignore"):
        log_cos = np.log(np.cos(theta).clip(min=0.0))
    integrand = np.exp((dim - 2) * log_cos + log_c) if dim > 2 else np.full_like(theta, math.exp(log_c))
    mass = (integrand * weights).sum(axis=(1, 2)) * 0.5 * panel
    with np.errstate(divide="ignore"):
        log_cos_edges = np.log(np.cos(edges_theta).clip(min=0.0))
    pow_edges = np.exp((dim - 1) * log_cos_edges + log_c)
    first = (pow_edges[:-1] - pow_edges[1:]) / (dim - 1)
    return mass, first


def _density(dim: int, t: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        log_1mt2 = np.log(np.clip(1.0 - t * t, 0.0, None))
    return np.exp(0.5 * (dim - 3) * log_1mt2 + _log_normaliser(dim))


def _lloyd_map(dim: int, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd step ``T(c)`` (conditional means of the midpoint cells) and its Jacobian.

    With ``c_i = M1_i / M0_i`` over the cell ``[b_{i-1}, b_i]`` and ``b_i = (c_i + c_{i+1})/2``:
    ``∂c_i/∂b_i = f(b_i)(b_i − c_i)/M0_i`` and ``∂c_i/∂b_{i−1} = f(b_{i−1})(c_i − b_{i−1})/M0_i``.
    """
    boundaries = 0.5 * (centroids[1:] + centroids[:-1])
    mass, first = _interval_moments(dim, _theta_edges(dim, boundaries))
    mass = np.maximum(mass, 1e-300)
    mapped = first / mass
    levels = centroids.size
    f_b = _density(dim, boundaries)
    d_upper = f_b * (boundaries - mapped[:-1]) / mass[:-1]  # ∂c_i/∂b_i, i = 0..L-2
    d_lower = f_b * (mapped[1:] - boundaries) / mass[1:]  # ∂c_{i+1}/∂b_i
    jac = np.zeros((levels, levels))
    idx = np.arange(levels - 1)
    # b_i depends on c_i and c_{i+1} with weight 1/2 each
    jac[idx, idx] += 0.5 * d_upper
    jac[idx, idx + 1] += 0.5 * d_upper
    jac[idx + 1, idx] += 0.5 * d_lower
    jac[idx + 1, idx + 1] += 0.5 * d_lower
    return mapped, jac


def _theta_edges(dim: int, boundaries: np.ndarray) -> np.ndarray:
    limit = math.pi / 2
    if dim > 2:
        limit = min(limit, _TAIL_SIGMAS / math.sqrt(dim - 2))
    inner = np.arcsin(np.clip(boundaries, -1.0, 1.0)).clip(-limit, limit)
    return np.concatenate([[-limit], inner, [limit]])


def _initial_centroids(dim: int, levels: int) -> np.ndarray:
    # Panter-Dite: with many levels the optimal cell density is ∝ f^(1/3). Quantiles of
    # f^(1/3) (computed on a θ grid, where dt = cos θ dθ) start Newton close to the optimum.
    limit = _theta_edges(dim, np.empty(0))[-1]
    theta = np.linspace(-limit, limit, 1 << 14)
    weight = np.cos(theta).clip(min=0.0) ** (dim / 3.0)  # f(sin θ)^(1/3) · cos θ, up to a constant
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (weight[1:] + weight[:-1]))])
    cdf /= cdf[-1]
    targets = (np.arange(levels) + 0.5) / levels
    return np.sin(np.interp(targets, cdf, theta))


@lru_cache(maxsize=None)
def lloyd_max_codebook(dim: int, bits: int) -> Codebook:
    """Solve the Lloyd-Max quantizer for ``f_d`` with ``2**bits`` levels (cached).

    Args:
        dim: sphere dimension d ≥ 2.
        bits: 1..8.

    Example:
        >>> cb = lloyd_max_codebook(128, 2)
        >>> round(cb.unit_vector_mse, 3)
        0.117
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 2:
        raise TurboQuantError(f"codebook dim must be an int >= 2, got {dim!r}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (MIN_BITS <= bits <= MAX_BITS):
        raise TurboQuantError(f"codebook bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    dim, bits = int(dim), int(bits)
    levels = 1 << bits
    sigma = 1.0 / math.sqrt(dim)
    centroids = _initial_centroids(dim, levels)
    iterations = 0
    for iterations in range(1, MAX_ITERATIONS + 1):
        mapped, jacobian = _lloyd_map(dim, centroids)
        residual = mapped - centroids
        if np.max(np.abs(residual)) < TOLERANCE * sigma:
            centroids = mapped
            break
        # Newton on c = T(c): plain Lloyd converges linearly and needs thousands of
        # iterations at high rates; the Jacobian of T is tridiagonal and cheap.
        step = np.linalg.solve(np.eye(levels) - jacobian, residual)
        candidate = centroids + step
        if iterations <= 3 or not np.all(np.diff(candidate) > 0) or abs(candidate[-1]) >= 1:
            candidate = mapped  # fall back to a Lloyd step, which always stays ordered
        centroids = 0.5 * (candidate - candidate[::-1])  # the density is symmetric: keep it exact
    else:  # pragma: no cover - guarded by tests over all dims/bits
        raise RuntimeError(f"Lloyd-Max did not converge for dim={dim}, bits={bits}")
    boundaries = 0.5 * (centroids[1:] + centroids[:-1])
    mass, first = _interval_moments(dim, _theta_edges(dim, boundaries))
    # E[(t-c_i)^2 | cell i] summed, with E[t^2] = 1/d exactly:  1/d - 2 Σ c_i m1_i + Σ p_i c_i^2
    mse = 1.0 / dim - 2.0 * float(np.dot(centroids, first)) + float(np.dot(mass, centroids**2))
    centroids.setflags(write=False)
    boundaries.setflags(write=False)
    return Codebook(dim, bits, centroids, boundaries, mse, iterations)


@lru_cache(maxsize=256)
def codebook_tensors(dim: int, bits: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(centroids, boundaries)`` as float32 tensors on ``device`` (cached per device)."""
    cb = lloyd_max_codebook(dim, bits)
    dev = torch.device(device)
    return (
        torch.tensor(cb.centroids, dtype=torch.float32, device=dev),
        torch.tensor(cb.boundaries, dtype=torch.float32, device=dev),
    )


def mse_upper_bound(bits: float) -> float:
    """Paper Theorem 1 upper bound on unit-vector MSE: ``(√3 π / 2) · 4^−b``."""
    return math.sqrt(3.0) * math.pi / 2.0 * 4.0 ** (-bits)


def mse_lower_bound(bits: float) -> float:
    """Paper Theorem 3 information-theoretic lower bound: ``4^−b``."""
    return 4.0 ** (-bits)


PROD_UPPER = math.sqrt(3.0) * math.pi**2  # paper Theorem 2: d·D_prod/‖y‖² ≤ √3 π² · 4^−b


def exact_mse(config: QuantizerConfig) -> float:
    """Exact expected ``‖u − û‖²`` of a unit vector under ``config``.

    ``mse``: ``Σ_streams n_s · mse_per_coordinate(d, b_s)``; ``prod`` (``b`` bits): the residual of
    the ``b − 1``-bit stage has ``E‖r‖² = D_mse(b − 1)`` (1 for pure QJL) and the QJL reconstruction
    multiplies it by ``π/2 − 1/d`` (expectation over Gaussian ``S``).

    Example:
        >>> round(exact_mse(QuantizerConfig(dim=1536, bits=2)), 4)
        0.1174
    """
    n_hi, b_hi, n_lo, b_lo = config.bit_split
    d = config.dim
    stage = 0.0
    if n_hi:
        stage += n_hi * lloyd_max_codebook(d, b_hi).mse_per_coordinate
    stage += n_lo * (lloyd_max_codebook(d, b_lo).mse_per_coordinate if b_lo else 1.0 / d)
    if config.variant is Variant.PROD:
        stage *= math.pi / 2 - 1.0 / d
    return stage


def bounds(config: QuantizerConfig) -> tuple[float, float]:
    """Paper bounds ``(lower, upper)`` on the normalised distortion of ``config``.

    ``mse``: Theorem 3 / Theorem 1 on ``D_mse``; ``prod``: Theorem 3 / Theorem 2 on
    ``d · D_prod / ‖y‖²`` (which also upper-bounds nothing about prod's reconstruction MSE).
    """
    if config.variant is Variant.PROD:
        return mse_lower_bound(config.bits), PROD_UPPER * 4.0 ** (-config.bits)
    return mse_lower_bound(config.bits), mse_upper_bound(config.bits)
