"""Seeded random rotations (paper Algorithm 1, line 2: ``y = Π x``).

Two kinds, both deterministic functions of ``(dim, seed)`` on every process and
device (random numbers come from NumPy's PCG64 on the CPU in float64):

* ``haar``: QR of a standard Gaussian matrix with the signs of ``R``'s diagonal
  moved into ``Q`` — an exactly Haar-distributed orthogonal matrix. O(d²) per vector.
* ``hadamard``: random sign flips followed by orthonormal fast Walsh-Hadamard
  transforms (FWHT) on power-of-two blocks. O(d log d) per vector.

Non-power-of-two ``d`` with ``hadamard``: let ``p`` be the largest power of two
≤ d. We apply three (signs → FWHT) stages on the overlapping blocks
``[0, p)``, ``[d−p, d)``, ``[0, p)``; the overlap ``2p − d ≥ 1`` couples the
blocks, so every output coordinate depends on every input coordinate, the map is
orthogonal and no padding is stored (codes stay ``ceil(b·d/8)`` bytes). For
power-of-two ``d`` we use two full stages ``H D₂ H D₁``; the second stage makes
sparse or one-hot inputs (for which a single stage gives equal-magnitude
coordinates) follow the sphere's coordinate law closely. The resulting
distortion versus Haar is measured in ``benchmarks/distortion.py``.

Rotations act on row vectors: ``rotate(x) = x @ Π.T`` and ``unrotate(y) = y @ Π``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import Rotation, TurboQuantError

_SEED_STREAM_ROTATION = 0x5EED_0001
_SEED_STREAM_QJL = 0x5EED_0002


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([stream, seed]))


def hadamard_blocks(dim: int) -> tuple[tuple[int, int], ...]:
    """``(start, size)`` of each FWHT stage for ``dim`` (see the module docstring)."""
    p = 1 << (dim.bit_length() - 1)
    if p == dim:
        return ((0, p), (0, p))
    return ((0, p), (dim - p, p), (0, p))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two).

    Args:
        x: ``(..., n)`` floating tensor, ``n`` a power of two.

    Returns:
        ``(..., n)``: ``x @ H / sqrt(n)`` with ``H`` the Sylvester Hadamard matrix.
    """
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x.reshape(-1, n)
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n)) * (n**-0.5)


@dataclass(frozen=True, eq=False)
class RandomRotation:
    """An orthogonal ``Π`` of size ``dim × dim`` determined by ``(kind, dim, seed)``.

    Use :func:`make_rotation` (cached) rather than the constructor.
    """

    kind: Rotation
    dim: int
    seed: int
    signs: np.ndarray | None  # (stages, dim) ±1 for hadamard
    dense: np.ndarray | None  # (dim, dim) float64 for haar

    # Arrays are not hashable; a rotation's identity is (kind, dim, seed).
    def __hash__(self) -> int:
        return hash((self.kind, self.dim, self.seed))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RandomRotation) and (self.kind, self.dim, self.seed) == (other.kind, other.dim, other.seed)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Π.T`` over the last dim; ``x``: ``(..., dim)`` floating tensor."""
        if self.kind is Rotation.HAAR:
            return x @ self._dense_t(x, transpose=True)
        y = x
        for stage, (start, size) in enumerate(hadamard_blocks(self.dim)):
            y = y * self._signs(x, stage)
            if size == self.dim:
                y = fwht(y)
            else:
                y = torch.cat((y[..., :start], fwht(y[..., start : start + size]), y[..., start + size :]), dim=-1)
        return y

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """``y @ Π`` (the inverse, since Π is orthogonal); ``y``: ``(..., dim)``."""
        if self.kind is Rotation.HAAR:
            return y @ self._dense_t(y, transpose=False)
        x = y
        for stage in reversed(range(len(hadamard_blocks(self.dim)))):
            start, size = hadamard_blocks(self.dim)[stage]
            if size == self.dim:
                x = fwht(x)
            else:
                x = torch.cat((x[..., :start], fwht(x[..., start : start + size]), x[..., start + size :]), dim=-1)
            x = x * self._signs(y, stage)
        return x

    def matrix(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Π`` as a dense ``(dim, dim)`` tensor (row ``i`` = output coordinate ``i``)."""
        return _dense_matrix(self, torch.device(device), dtype)

    def _dense_t(self, ref: torch.Tensor, transpose: bool) -> torch.Tensor:
        m = self.matrix(ref.device, ref.dtype)
        return m.T if transpose else m

    def _signs(self, ref: torch.Tensor, stage: int) -> torch.Tensor:
        return _sign_tensor(self, stage, ref.device, ref.dtype)


@lru_cache(maxsize=256)
def _sign_tensor(rot: RandomRotation, stage: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    assert rot.signs is not None
    row = rot.signs[stage]
    start, size = hadamard_blocks(rot.dim)[stage]
    # Signs only act inside the block; outside it they are +1 so the stage stays orthogonal.
    masked = np.ones(rot.dim)
    masked[start : start + size] = row[start : start + size]
    return torch.tensor(masked, dtype=dtype, device=device)


@lru_cache(maxsize=256)
def _dense_matrix(rot: RandomRotation, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if rot.dense is not None:
        return torch.tensor(rot.dense, dtype=dtype, device=device)
    eye = torch.eye(rot.dim, dtype=torch.float64)
    # rotate(e_j) is column j of Π, i.e. row j of Π.T
    return rot.rotate(eye).T.contiguous().to(device=device, dtype=dtype)


@lru_cache(maxsize=128)
def make_rotation(kind: Rotation | str, dim: int, seed: int = 0) -> RandomRotation:
    """Build (once, then cached) the rotation for ``(kind, dim, seed)``.

    Example:
        >>> rot = make_rotation("hadamard", 80, seed=1)
        >>> x = torch.randn(4, 80)
        >>> torch.allclose(rot.unrotate(rot.rotate(x)), x, atol=1e-5)
        True
    """
    try:
        kind = Rotation(kind)
    except ValueError:
        raise TurboQuantError(f"rotation={kind!r} is not supported; choose 'hadamard' or 'haar'") from None
    if dim < 2:
        raise TurboQuantError(f"rotation dim must be >= 2, got {dim}")
    rng = _rng(seed, _SEED_STREAM_ROTATION)
    if kind is Rotation.HAAR:
        gauss = rng.standard_normal((dim, dim))
        q, r = np.linalg.qr(gauss)
        q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[None, :]
        q.setflags(write=False)
        return RandomRotation(kind, dim, seed, None, q)
    stages = len(hadamard_blocks(dim))
    signs = np.where(rng.random((stages, dim)) < 0.5, -1.0, 1.0)
    signs.setflags(write=False)
    return RandomRotation(kind, dim, seed, signs, None)


@lru_cache(maxsize=64)
def qjl_matrix(dim: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The QJL projection ``S`` (paper Definition 1): ``(dim, dim)`` i.i.d. N(0, 1), float32."""
    gauss = _rng(seed, _SEED_STREAM_QJL).standard_normal((dim, dim))
    return torch.tensor(gauss, dtype=torch.float32, device=torch.device(device))
