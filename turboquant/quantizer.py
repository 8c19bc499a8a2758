"""TurboQuant quantizers: ``TurboQuantMSE``, ``TurboQuantProd`` and ``QJL``.

The math lives in module-level functions that work in the *rotated unit domain*
(``y = Π x/‖x‖``); the KV cache, the Triton kernels and the index call the same
functions, so nothing is written twice:

* :func:`encode_mse` / :func:`decode_mse` — Lloyd-Max codes ↔ rotated coordinates
  (paper Algorithm 1, lines 5 and 9).
* :func:`encode_qjl` — sign bits of the Gaussian projection of the residual
  (paper Algorithm 2, line 7 / Definition 1).

The classes only hold a config, a rotation and codebooks, and handle input
checking, numpy/torch conversion and batching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Union

import numpy as np
import torch

from .codebook import bucketize_codes, codebook_tensors
from .config import QuantizerConfig, Rotation, TurboQuantError, Variant
from .packing import pack_codes, pack_rows, packed_size, unpack_codes
from .rotation import RandomRotation, make_rotation, qjl_matrix, rotate_rows_transposed

ArrayLike = Union[torch.Tensor, np.ndarray]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_QJL_SCALE = math.sqrt(math.pi / 2.0)  # E|<s, r>| = sqrt(2/π)‖r‖ for s ~ N(0, I): paper Lemma 4
_SCORE_CHUNK = 8192  # stored vectors decoded at a time when scoring: bounds the temporary memory


# --------------------------------------------------------------------------- codes container


@dataclass
class QuantizedVectors:
    """Packed TurboQuant codes of a batch of vectors with leading shape ``B``.

    Attributes:
        config: the quantizer config that produced the codes.
        codes: ``(*B, code_bytes)`` uint8 Lloyd-Max codes (bit stream, docs/DESIGN.md);
            ``code_bytes`` is 0 for pure QJL.
        norms: ``(*B,)`` vector norms ``‖x‖`` in ``config.norm_dtype``.
        qjl: ``(*B, ceil(dim/8))`` uint8 residual sign bits (prod only).
        residual_norms: ``(*B,)`` ``‖x − x̂_mse‖`` in ``config.norm_dtype`` (prod only).
        numpy_io: whether the input was a numpy array (then outputs are numpy too).
    """

    config: QuantizerConfig
    codes: torch.Tensor
    norms: torch.Tensor
    qjl: torch.Tensor | None = None
    residual_norms: torch.Tensor | None = None
    numpy_io: bool = False

    @property
    def shape(self) -> torch.Size:
        """Leading (batch) shape ``B``."""
        return self.norms.shape

    def __len__(self) -> int:
        return self.norms.shape[0] if self.norms.dim() else 1

    @property
    def nbytes(self) -> int:
        """Exact storage of the codes and per-vector scalars, in bytes."""
        tensors = [self.codes, self.norms, self.qjl, self.residual_norms]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def device(self) -> torch.device:
        return self.norms.device

    def _map(self, fn: Any) -> "QuantizedVectors":
        return replace(
            self,
            codes=fn(self.codes),
            norms=fn(self.norms),
            qjl=None if self.qjl is None else fn(self.qjl),
            residual_norms=None if self.residual_norms is None else fn(self.residual_norms),
        )

    def __getitem__(self, index: Any) -> "QuantizedVectors":
        """Index the batch dims, e.g. ``codes[3:7]`` or ``codes[mask]``."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> "QuantizedVectors":
        return self._map(lambda t: t.to(device))

    def reshape(self, *shape: int) -> "QuantizedVectors":
        """Reshape the batch dims."""

        batch = torch.empty(self.shape, device="meta").reshape(*shape).shape  # resolves -1

        def fn(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch) if t.dim() == len(self.shape) else t.reshape(*batch, t.shape[-1])

        return self._map(fn)

    def flatten(self) -> "QuantizedVectors":
        return self.reshape(-1)

    @staticmethod
    def cat(parts: list["QuantizedVectors"], dim: int = 0) -> "QuantizedVectors":
        """Concatenate along batch dim ``dim`` (all parts from the same config)."""
        if not parts:
            raise TurboQuantError("cannot concatenate an empty list of QuantizedVectors")
        first = parts[0]
        if any(p.config != first.config for p in parts):
            raise TurboQuantError("cannot concatenate codes from different quantizer configs")

        def cat(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts, dim=dim)

        return QuantizedVectors(first.config, cat("codes"), cat("norms"), cat("qjl"), cat("residual_norms"), first.numpy_io)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- pure functions


def code_bytes(config: QuantizerConfig) -> int:
    """Bytes of Lloyd-Max codes per vector (both groups of a fractional rate)."""
    n_hi, b_hi, n_lo, b_lo = config.bit_split
    return (packed_size(n_hi, b_hi) if n_hi else 0) + (packed_size(n_lo, b_lo) if b_lo else 0)


def bytes_per_vector(config: QuantizerConfig) -> int:
    """Exact stored bytes per vector: codes + QJL bits + per-vector scalars."""
    scalar = torch.empty(0, dtype=getattr(torch, config.norm_dtype)).element_size()
    total = code_bytes(config) + scalar
    if config.variant is Variant.PROD:
        total += packed_size(config.dim, 1) + scalar
    return total


def encode_mse(y: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """Lloyd-Max codes of rotated unit-domain coordinates (paper Alg. 1 line 5).

    Args:
        y: ``(..., dim)`` float32, ``Π x/‖x‖``.
        config: gives the bit split; the first ``n_hi`` coordinates use the wider codebook.

    Returns:
        ``(..., code_bytes(config))`` uint8 packed codes.
    """
    n_hi, b_hi, n_lo, b_lo = config.bit_split
    parts = []
    # bucketize_codes == torch.bucketize against the boundaries, bit for bit (a table lookup on CPU)
    if n_hi:
        parts.append(pack_codes(bucketize_codes(y[..., :n_hi], config.dim, b_hi), b_hi))
    if b_lo:
        parts.append(pack_codes(bucketize_codes(y[..., n_hi:], config.dim, b_lo), b_lo))
    if not parts:
        return torch.empty(*y.shape[:-1], 0, dtype=torch.uint8, device=y.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def decode_mse(codes: torch.Tensor, config: QuantizerConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotated unit-domain reconstruction ``ŷ`` from packed codes (paper Alg. 1 line 9).

    Args:
        codes: ``(..., code_bytes(config))`` uint8.

    Returns:
        ``(..., dim)`` centroids in ``dtype`` (zeros for pure QJL).
    """
    n_hi, b_hi, n_lo, b_lo = config.bit_split
    lead = codes.shape[:-1]
    if not b_lo and not n_hi:
        return torch.zeros(*lead, config.dim, dtype=dtype, device=codes.device)
    parts = []
    offset = 0
    if n_hi:
        nb = packed_size(n_hi, b_hi)
        parts.append(_decode_group(codes[..., :nb], config.dim, b_hi, n_hi, dtype))
        offset = nb
    parts.append(_decode_group(codes[..., offset:], config.dim, b_lo, n_lo, dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _decode_group(packed: torch.Tensor, dim: int, bits: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    if 8 % bits == 0:
        # Widths 1, 2, 4, 8: one table lookup per byte yields all of its centroids at once
        # (fuses unpacking and the centroid gather; the hot path of decode attention on CPU).
        table = _byte_table(dim, bits, packed.device, dtype)
        lead = packed.shape[:-1]
        out = torch.nn.functional.embedding(packed.reshape(-1, packed.shape[-1]).int(), table)
        return out.reshape(*lead, packed.shape[-1] * table.shape[-1])[..., :n]
    centroids, _ = codebook_tensors(dim, bits, packed.device)
    return centroids.to(dtype)[unpack_codes(packed, bits, n).long()]


@lru_cache(maxsize=256)
def _byte_table(dim: int, bits: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(256, 8 // bits)``: the centroids of the codes packed in each possible byte."""
    centroids, _ = codebook_tensors(dim, bits, device)
    every_byte = torch.arange(256, device=device, dtype=torch.uint8).unsqueeze(-1)
    return centroids.to(dtype)[unpack_codes(every_byte, bits, 8 // bits).long()]


def encode_qjl(residual: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """1-bit QJL of a rotated-domain residual: ``pack(sign(S r) ≥ 0)``; ``residual``: ``(..., dim)``."""
    s = qjl_matrix(config.dim, config.seed, residual.device)
    return pack_codes(residual @ s.T >= 0, 1)


def decode_qjl_signs(qjl: torch.Tensor, config: QuantizerConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(..., dim)`` ±1 signs from packed QJL bits."""
    bits = unpack_codes(qjl, 1, config.dim)
    return bits.to(dtype) * 2 - 1


# --------------------------------------------------------------------------- input handling


def _as_tensor(x: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"{name} has unsupported numpy dtype {x.dtype}; use float16, float32 or float64")
        return torch.from_numpy(np.ascontiguousarray(x)), True
    if isinstance(x, torch.Tensor):
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {x.dtype}; use float16, bfloat16, float32 or float64")
        return x, False
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_vectors(x: torch.Tensor, dim: int, name: str) -> None:
    if x.dim() == 0 or x.shape[-1] != dim:
        raise TurboQuantError(f"{name} must have last dimension {dim}, got shape {tuple(x.shape)}")
    # A NaN/Inf element makes the sum non-finite, so a finite sum (one fast reduction) proves
    # every element finite; only a sum that overflows needs the elementwise check.
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise TurboQuantError(f"{name} contains NaN or Inf")


def _output(t: torch.Tensor, like_dtype: torch.dtype, numpy_io: bool) -> ArrayLike:
    t = t.to(like_dtype)
    return t.cpu().numpy() if numpy_io else t


_ENCODE_CHUNK_ELEMENTS = 1 << 18  # floats per row chunk of the CPU encode (1 MiB: stays in cache)


def _encode_in_chunks(xf: torch.Tensor, rotation: RandomRotation) -> bool:
    # Only where chunking cannot change a bit: every step of the Hadamard path (division by the
    # norm, sign flips, butterflies, table lookup, packing) is computed per row, whereas a
    # matmul (Haar, QJL) may round differently for a different number of rows.
    return xf.device.type == "cpu" and rotation.kind is Rotation.HADAMARD and xf.numel() > 2 * _ENCODE_CHUNK_ELEMENTS


def _encode_mse_chunked(xf: torch.Tensor, safe_norms: torch.Tensor, rotation: RandomRotation, config: QuantizerConfig) -> torch.Tensor:
    """``encode_mse(rotation.rotate(xf / safe_norms), config)``, the same bytes, faster on CPU.

    Cache-sized row chunks, and the rotated coordinates stay coordinate-major (``(dim, m)``) from
    the Hadamard transform through the table lookup and the packing (:func:`pack_rows`); only the
    packed bytes are transposed back.
    """
    n_hi, b_hi, _, b_lo = config.bit_split
    flat, div = xf.reshape(-1, config.dim), safe_norms.reshape(-1)
    rows = max(1, _ENCODE_CHUNK_ELEMENTS // config.dim)
    out = torch.empty(flat.shape[0], code_bytes(config), dtype=torch.uint8)
    split = packed_size(n_hi, b_hi) if n_hi else 0
    for first in range(0, flat.shape[0], rows):
        yt = rotate_rows_transposed(rotation, flat[first : first + rows], div[first : first + rows])
        dest = out[first : first + rows]
        if n_hi:
            dest[:, :split] = pack_rows(bucketize_codes(yt[:n_hi], config.dim, b_hi), b_hi).T
        dest[:, split:] = pack_rows(bucketize_codes(yt[n_hi:], config.dim, b_lo), b_lo).T
    return out.reshape(*xf.shape[:-1], out.shape[-1])


# --------------------------------------------------------------------------- quantizers


class TurboQuantizer:
    """Base class: holds a :class:`QuantizerConfig`, its rotation and codebooks.

    Use :class:`TurboQuantMSE`, :class:`TurboQuantProd` or :class:`QJL`, or
    :meth:`from_config`.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        self.config = config
        self.rotation: RandomRotation = make_rotation(config.rotation, config.dim, config.seed)
        self._norm_dtype = getattr(torch, config.norm_dtype)

    @staticmethod
    def from_config(config: QuantizerConfig) -> "TurboQuantizer":
        """Build the quantizer class matching ``config.variant``."""
        if config.variant is Variant.PROD:
            return TurboQuantProd.__new__(TurboQuantProd)._init_from(config)
        return TurboQuantMSE.__new__(TurboQuantMSE)._init_from(config)

    def _init_from(self, config: QuantizerConfig) -> "TurboQuantizer":
        TurboQuantizer.__init__(self, config)
        return self

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def bits(self) -> float:
        return self.config.bits

    def __repr__(self) -> str:
        c = self.config
        return f"{type(self).__name__}(dim={c.dim}, bits={c.bits}, rotation={c.rotation.value!r}, seed={c.seed})"

    def rotate(self, x: ArrayLike) -> torch.Tensor:
        """Queries in the rotated domain, ``Π q`` (float32), for repeated scoring."""
        t, _ = _as_tensor(x, "query")
        _check_vectors(t, self.dim, "query")
        return self.rotation.rotate(t.float())

    def quantize(self, x: ArrayLike) -> QuantizedVectors:
        """Quantize vectors of any norm.

        Args:
            x: ``(*B, dim)`` torch tensor (CPU/CUDA; float16, bfloat16, float32, float64)
                or numpy array.

        Returns:
            :class:`QuantizedVectors` with batch shape ``B``.
        """
        t, numpy_io = _as_tensor(x, "x")
        _check_vectors(t, self.dim, "x")
        xf = t.float()
        norms = torch.linalg.vector_norm(xf, dim=-1)
        stored_norms = norms.to(self._norm_dtype)
        if not bool(torch.isfinite(stored_norms).all()):
            raise TurboQuantError(f"a vector norm overflows norm_dtype={self.config.norm_dtype}")
        safe_norms = torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
        if self.config.variant is Variant.MSE and _encode_in_chunks(xf, self.rotation):
            codes = _encode_mse_chunked(xf, safe_norms, self.rotation, self.config)
        else:
            y = self.rotation.rotate(xf / safe_norms)
            codes = encode_mse(y, self.config)
        qjl = residual_norms = None
        if self.config.variant is Variant.PROD:
            residual = y - decode_mse(codes, self.config)
            qjl = encode_qjl(residual, self.config)
            residual_norms = (norms * torch.linalg.vector_norm(residual, dim=-1)).to(self._norm_dtype)
        return QuantizedVectors(self.config, codes, stored_norms, qjl, residual_norms, numpy_io)

    def _check_codes(self, codes: QuantizedVectors) -> None:
        if not isinstance(codes, QuantizedVectors):
            raise TypeError(f"expected QuantizedVectors, got {type(codes).__name__}")
        if codes.config != self.config:
            raise TurboQuantError(f"codes were made by {codes.config}, not by this quantizer's {self.config}")

    def dequantize_rotated(self, codes: QuantizedVectors) -> torch.Tensor:
        """Reconstruction in the rotated domain, ``Π x̂`` (float32, ``(*B, dim)``)."""
        self._check_codes(codes)
        y = decode_mse(codes.codes, self.config) * codes.norms.float().unsqueeze(-1)
        if self.config.variant is Variant.PROD:
            assert codes.qjl is not None and codes.residual_norms is not None
            s = qjl_matrix(self.dim, self.config.seed, codes.device)
            signs = decode_qjl_signs(codes.qjl, self.config)
            scale = codes.residual_norms.float() * (_QJL_SCALE / self.dim)
            y = y + (signs @ s) * scale.unsqueeze(-1)
        return y

    def dequantize(self, codes: QuantizedVectors, dtype: torch.dtype = torch.float32) -> ArrayLike:
        """Reconstruct ``x̂`` (``(*B, dim)``; numpy if the codes came from numpy)."""
        return _output(self.rotation.unrotate(self.dequantize_rotated(codes)), dtype, codes.numpy_io)

    def inner_product(self, query: ArrayLike, codes: QuantizedVectors) -> ArrayLike:
        """Asymmetric estimate of ``<q, x>`` for every (query, stored vector) pair.

        The query is rotated once; stored vectors are never unrotated. For ``mse``
        this is ``‖x‖·<Πq, ŷ>`` (biased low by the codebook's shrinkage); for
        ``prod`` the QJL term makes it unbiased (paper Theorem 2).

        Args:
            query: ``(*Q, dim)``.
            codes: batch shape ``B``.

        Returns:
            ``(*Q, *B)`` float32 scores.
        """
        self._check_codes(codes)
        t, numpy_io = _as_tensor(query, "query")
        _check_vectors(t, self.dim, "query")
        q_rot = self.rotation.rotate(t.float().to(codes.device)).reshape(-1, self.dim)
        flat = codes.flatten()
        n = flat.norms.shape[0]
        out = torch.empty(q_rot.shape[0], n, dtype=torch.float32, device=q_rot.device)
        q_proj = None
        if self.config.variant is Variant.PROD:
            q_proj = q_rot @ qjl_matrix(self.dim, self.config.seed, q_rot.device).T
        for start in range(0, n, _SCORE_CHUNK):
            part = flat[start : start + _SCORE_CHUNK]
            scores = (q_rot @ decode_mse(part.codes, self.config).T) * part.norms.float()
            if q_proj is not None:
                assert part.qjl is not None and part.residual_norms is not None
                signs = decode_qjl_signs(part.qjl, self.config)
                scores += (q_proj @ signs.T) * (part.residual_norms.float() * (_QJL_SCALE / self.dim))
            out[:, start : start + part.norms.shape[0]] = scores
        out = out.reshape(*t.shape[:-1], *codes.shape)
        return out.cpu().numpy() if numpy_io else out


class TurboQuantMSE(TurboQuantizer):
    """TurboQuant_mse (paper Algorithm 1): rotation + per-coordinate Lloyd-Max codes.

    Example:
        >>> q = TurboQuantMSE(dim=128, bits=4)
        >>> x = torch.randn(10, 128)
        >>> codes = q.quantize(x)
        >>> codes.nbytes  # 10 × (64 code bytes + 4-byte norm)
        680
        >>> x_hat = q.dequantize(codes)
    """

    def __init__(
        self,
        dim: int,
        bits: float,
        rotation: Rotation | str = Rotation.HADAMARD,
        seed: int = 0,
        norm_dtype: str = "float32",
    ) -> None:
        super().__init__(QuantizerConfig(dim, bits, Variant.MSE, rotation, seed, norm_dtype))  # type: ignore[arg-type]


class TurboQuantProd(TurboQuantizer):
    """TurboQuant_prod (paper Algorithm 2): ``bits−1`` MSE bits + 1-bit QJL on the residual.

    ``inner_product`` is an unbiased estimator of ``<q, x>``. ``bits=1`` is pure QJL.
    """

    def __init__(
        self,
        dim: int,
        bits: float,
        rotation: Rotation | str = Rotation.HADAMARD,
        seed: int = 0,
        norm_dtype: str = "float32",
    ) -> None:
        super().__init__(QuantizerConfig(dim, bits, Variant.PROD, rotation, seed, norm_dtype))  # type: ignore[arg-type]


class QJL(TurboQuantProd):
    """Quantized Johnson-Lindenstrauss (paper Definition 1): ``sign(S x)`` plus ``‖x‖``, 1 bit per coordinate."""

    def __init__(self, dim: int, seed: int = 0, norm_dtype: str = "float32") -> None:
        super().__init__(dim, 1, Rotation.HADAMARD, seed, norm_dtype)
