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

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .config import Rotation, TurboQuantError
from .threads import run_chunks

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
        if _use_fast_path(x):
            return _hadamard_transposed(self, x, inverse=False)
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
        if self.kind is Rotation.HAAR or (y.device.type == "cpu" and self.dim <= _DENSE_UNROTATE_MAX_DIM):
            # Small d on CPU: one BLAS product beats the butterflies (d=128, 100k rows, 1 thread:
            # 56 ms vs 175 ms). Decoding only: codes never depend on this rounding.
            return y @ self._dense_t(y, transpose=False)
        if _use_fast_path(y):
            return _hadamard_transposed(self, y, inverse=True)
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


# --------------------------------------------------------------------------- fast CPU Hadamard path
#
# The reference loop above (sign flips, then ``fwht`` on each block) is the specification.
# On the CPU its butterflies on the last dim run on tiny strided inner loops (h = 1, 2, 4)
# and allocate a ``torch.stack`` per stage, which makes it ~10x slower than memory speed.
# The fast path below computes *bit-identical* results: it transposes a chunk of rows to a
# ``(dim, m)`` buffer, so that every butterfly stage is two contiguous vectorised ops
# (``a + b`` and ``a - b``, same operands and order as ``fwht``), and it folds each stage's
# ``1/sqrt(size)`` scale into the next stage's ±1 sign multiplier: ``(z·c)·s == z·(c·s)``
# exactly because multiplying by ±1 is exact and IEEE rounding is sign-symmetric.

_DENSE_UNROTATE_MAX_DIM = 256  # CPU unrotate uses the dense Π up to this d (measured faster; see unrotate)
_FAST_CHUNK_ELEMENTS = 1 << 18  # elements of one (dim, m) work buffer (1 MiB in float32)


def _use_fast_path(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() >= 1 and x.shape[-1] >= 2


@lru_cache(maxsize=256)
def _stage_multipliers(
    rot: RandomRotation, inverse: bool, dtype: torch.dtype
) -> tuple[tuple[tuple[int, int], ...], tuple[torch.Tensor | None, ...], torch.Tensor]:
    """Blocks in application order, the per-row multiplier applied before each block's
    butterflies (``None`` = all ones) and the final per-row multiplier, each ``(dim,)``.

    Forward stage k: ``y ← y ⊙ s_k`` then butterflies and ``·c_k`` on block k. Inverse stage k
    (blocks reversed): butterflies and ``·c_k`` on block k, then ``y ← y ⊙ s_k``.
    """
    assert rot.signs is not None
    dim = rot.dim
    blocks = hadamard_blocks(dim)
    order = list(reversed(range(len(blocks)))) if inverse else list(range(len(blocks)))

    def sign_row(stage: int) -> np.ndarray:
        start, size = blocks[stage]
        row = np.ones(dim)
        row[start : start + size] = rot.signs[stage][start : start + size]
        return row

    def scale_row(stage: int) -> torch.Tensor:
        start, size = blocks[stage]
        # the scalar exactly as ``fwht`` applies it: size**-0.5 rounded to the tensor's dtype
        c = torch.tensor(size**-0.5, dtype=dtype)
        row = torch.ones(dim, dtype=dtype)
        row[start : start + size] = c
        return row

    pre: list[torch.Tensor | None] = []
    carry = torch.ones(dim, dtype=dtype)  # scale of the previous block still to be applied
    for i, stage in enumerate(order):
        mult = carry.clone()
        if not inverse:
            mult = mult * torch.tensor(sign_row(stage), dtype=dtype)
        elif i > 0:
            mult = mult * torch.tensor(sign_row(order[i - 1]), dtype=dtype)
        pre.append(None if bool((mult == 1).all()) else mult)
        carry = scale_row(stage)
    final = carry.clone()
    if inverse:
        final = final * torch.tensor(sign_row(order[-1]), dtype=dtype)
    return tuple(blocks[s] for s in order), tuple(pre), final


def _butterfly_views(a: torch.Tensor, b: torch.Tensor, start: int, size: int) -> list[tuple[torch.Tensor, ...]]:
    """Per stage ``(src_low, src_high, dst_low, dst_high)`` views for Walsh-Hadamard butterflies over
    rows ``[start, start+size)``, ping-ponging between the ``(dim, m)`` buffers ``a`` and ``b``."""
    src, dst = a[start : start + size], b[start : start + size]
    m = a.shape[1]
    views = []
    h = 1
    while h < size:
        s = src.view(size // (2 * h), 2, h, m)
        d = dst.view(size // (2 * h), 2, h, m)
        views.append((s[:, 0], s[:, 1], d[:, 0], d[:, 1]))
        src, dst = dst, src
        h *= 2
    return views


_PLANS = threading.local()  # per-thread work buffers: concurrent calls must not share them


def _work_plan(dim: int, m: int, dtype: torch.dtype, blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[torch.Tensor, torch.Tensor], list]:
    """Two ``(dim, m)`` buffers and their butterfly views for ``blocks`` (both ping-pong directions),
    cached per thread so that repeated calls (row chunks of one big batch) skip the setup."""
    cache = getattr(_PLANS, "cache", None)
    if cache is None:
        cache = _PLANS.cache = {}
    key = (dim, m, dtype, blocks)
    plan = cache.get(key)
    if plan is None:
        if len(cache) >= 4:
            cache.clear()
        with torch.inference_mode(False):  # normal tensors: reused in and out of inference mode
            a, b = torch.empty(dim, m, dtype=dtype), torch.empty(dim, m, dtype=dtype)
        plan = cache[key] = ((a, b), [(_butterfly_views(a, b, st, sz), _butterfly_views(b, a, st, sz)) for st, sz in blocks])
    return plan


def _transform_chunk(
    rot: RandomRotation, part: torch.Tensor, inverse: bool, divisor: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate (or unrotate) the rows of ``part`` (``(m, dim)``), optionally divided by ``divisor``
    (``(m,)``) afterwards, into a ``(dim, m)`` per-thread scratch buffer (valid until the next call)."""
    dim, m = rot.dim, part.shape[0]
    blocks, pre, final = _stage_multipliers(rot, inverse, part.dtype)
    (a, b), views = _work_plan(dim, m, part.dtype, blocks)
    a.copy_(part.T)  # aten's blocked transpose copy; the scalings below run on contiguous rows
    if pre[0] is not None:
        a.mul_(pre[0].unsqueeze(-1))
    cur, other = a, b
    for i, (start, size) in enumerate(blocks):
        if i and pre[i] is not None:
            cur.mul_(pre[i].unsqueeze(-1))
        for lo, hi, dlo, dhi in views[i][0 if cur is a else 1]:
            torch.add(lo, hi, out=dlo)
            torch.sub(lo, hi, out=dhi)
        if len(views[i][0]) % 2:
            if size != dim:  # rows outside the block stay where they were
                other[:start] = cur[:start]
                other[start + size :] = cur[start + size :]
            cur, other = other, cur
    if bool((final == final[0]).all()):
        cur.mul_(float(final[0]))
    else:
        cur.mul_(final.unsqueeze(-1))
    if divisor is not None:
        cur.div_(divisor.unsqueeze(0))  # the same IEEE division as ``rotate(part) / divisor[:, None]``
    return cur


def _hadamard_transposed(rot: RandomRotation, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Bit-identical fast version of :meth:`RandomRotation.rotate` / ``unrotate`` (hadamard, CPU)."""
    dim = rot.dim
    lead = x.shape[:-1]
    rows = x.reshape(-1, dim)
    n = rows.shape[0]
    out = torch.empty(n, dim, dtype=x.dtype)
    chunk = max(16, _FAST_CHUNK_ELEMENTS // dim)

    def one(first: int) -> None:
        part = rows[first : first + chunk]
        out[first : first + part.shape[0]].copy_(_transform_chunk(rot, part, inverse).T)

    run_chunks(one, range(0, n, chunk))
    return out.reshape(*lead, dim)


def rotate_rows_transposed(rot: RandomRotation, rows: torch.Tensor, divisor: torch.Tensor | None = None) -> torch.Tensor:
    """``(rows @ Π.T) / divisor[:, None]``, transposed: ``(dim, m)``, bit-identical to ``rotate(rows) / divisor``.

    For the CPU encode path, which bucketizes and packs the rotated coordinates row by row without
    transposing them back. Hadamard rotations of CPU float32/float64 rows only.

    Args:
        rot: a Hadamard :class:`RandomRotation`.
        rows: ``(m, dim)``.
        divisor: ``(m,)`` or None.

    Returns:
        ``(dim, m)``, a per-thread scratch buffer that the next call overwrites (copy it to keep it).
    """
    if rot.kind is not Rotation.HADAMARD or not _use_fast_path(rows) or rows.dim() != 2:
        raise TurboQuantError("rotate_rows_transposed needs a hadamard rotation and (m, dim) CPU float rows")
    return _transform_chunk(rot, rows, inverse=False, divisor=divisor)


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
