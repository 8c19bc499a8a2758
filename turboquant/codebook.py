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
import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import MAX_BITS, MIN_BITS, TurboQuantError

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


_KEY_BITS = 20  # table key: sign, exponent and 11 mantissa bits of a float32 (1 MiB uint8 table)
_AMBIGUOUS = 0x100  # table flag (above every code): the key's float range straddles a boundary
_BUCKETIZE_CHUNK = 1 << 18
_FLAG_WORD_MASKS = {torch.uint8: -0x7F7F7F7F7F7F7F80, torch.int16: 0x0100010001000100}  # 0x8080808080808080


@lru_cache(maxsize=64)
def _float_key_table(dim: int, bits: int) -> torch.Tensor:
    """``(2**_KEY_BITS,)``: the bucket of every float32 whose top bits are the key.

    Key ``i`` covers the float32 bit patterns ``(i − 2**(K−1)) << (32 − K)`` plus any low bits,
    an interval of floats; if every float of it has the same bucket the entry is that bucket,
    otherwise (a boundary inside, or NaN/inf) the entry is flagged ``>= 2**bits``: uint8 ``0x80``
    for ``bits < 8``, int16 :data:`_AMBIGUOUS` for 8 bits.
    """
    _, bounds = codebook_tensors(dim, bits)
    b = bounds.numpy().astype(np.float32)
    shift = 32 - _KEY_BITS
    signed = np.arange(1 << _KEY_BITS, dtype=np.int64) - (1 << (_KEY_BITS - 1))
    first = (signed << shift).astype(np.int32)
    last = (first.astype(np.int64) | ((1 << shift) - 1)).astype(np.int32)
    a, z = first.view(np.float32), last.view(np.float32)
    lo, hi = np.minimum(a, z), np.maximum(a, z)  # negative floats order in reverse of their bits
    with np.errstate(invalid="ignore"):
        c_lo, c_hi = np.searchsorted(b, lo, side="left"), np.searchsorted(b, hi, side="left")
    exact = np.isfinite(lo) & np.isfinite(hi) & (c_lo == c_hi)
    if bits < 8:
        return torch.from_numpy(np.where(exact, c_lo, 0x80).astype(np.uint8))
    return torch.from_numpy(np.where(exact, c_lo, _AMBIGUOUS).astype(np.int16))


def bucketize_codes(y: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Bucket indices of ``y`` in the ``(dim, bits)`` codebook, as uint8.

    Bit-identical to ``torch.bucketize(y, codebook_tensors(dim, bits)[1])`` (the number of
    boundaries strictly below each value), but on CPU float32 it is one lookup in a table keyed
    by the float's top 20 bits; the few values whose key straddles a boundary are resolved by
    ``torch.bucketize`` (< 0.1% of them up to 4 bits, about 1% at 8 bits).

    Args:
        y: ``(..., n)`` rotated coordinates.
        dim, bits: the codebook.

    Returns:
        ``(..., n)`` uint8 in ``[0, 2**bits)``.
    """
    _, bounds = codebook_tensors(dim, bits, y.device)
    if y.device.type != "cpu" or y.dtype != torch.float32 or sys.byteorder != "little":
        return torch.bucketize(y, bounds).to(torch.uint8)
    flat = y.contiguous().view(-1)
    table = _float_key_table(dim, bits)
    codes = torch.empty(flat.numel(), dtype=table.dtype)
    key = torch.empty(min(flat.numel(), _BUCKETIZE_CHUNK), dtype=torch.int32)
    per_word = 8 // table.element_size()
    flag_mask = _FLAG_WORD_MASKS[table.dtype]
    for first in range(0, flat.numel(), _BUCKETIZE_CHUNK):  # chunks keep the temporaries in cache
        part = flat[first : first + _BUCKETIZE_CHUNK]
        k = key[: part.numel()]
        torch.bitwise_right_shift(part.view(torch.int32), 32 - _KEY_BITS, out=k)
        k += 1 << (_KEY_BITS - 1)
        out = codes[first : first + part.numel()]
        torch.index_select(table, 0, k, out=out)
        # flagged entries have the top bit of their byte (uint8) or bit 8 (int16) set: find them
        # a word (8 bytes) at a time, then re-run the exact search on those words' values
        whole = out.numel() - out.numel() % per_word
        words = ((out[:whole].view(torch.int64) & flag_mask) != 0).nonzero().squeeze(1)
        idx = (words.unsqueeze(1) * per_word + torch.arange(per_word)).view(-1)
        tail = torch.arange(whole, out.numel())
        idx = torch.cat((idx, tail[out[tail] >= (1 << bits)])) if tail.numel() else idx
        if idx.numel():
            out[idx] = torch.bucketize(part[idx], bounds).to(out.dtype)
    return codes.to(torch.uint8).view(y.shape)


def mse_upper_bound(bits: float) -> float:
    """Paper Theorem 1 upper bound on unit-vector MSE: ``(√3 π / 2) · 4^−b``."""
    return math.sqrt(3.0) * math.pi / 2.0 * 4.0 ** (-bits)


def mse_lower_bound(bits: float) -> float:
    """Paper Theorem 3 information-theoretic lower bound: ``4^−b``."""
    return 4.0 ** (-bits)
