"""The TurboQuant code of a vector: where its bytes are defined, and the math that writes and reads them.

Every path — :class:`~turboquant.quantizer.TurboQuantizer`, the KV cache, the vector index, the
FAISS fast-scan mirror and the GPU kernels — reads the layout from :func:`layout` and calls the
functions here; none re-implements them.

**Bytes of one vector** (``config`` = :class:`~turboquant.config.QuantizerConfig`):

====================  ==========================================================================
``codes``             ``code_bytes`` uint8: one LSB-first bit stream per :class:`Stream` (packing.py),
                      the high-width stream first (fractional rates), each padded to a whole byte
``norm``              one scalar in ``config.norm_dtype``: ``‖x‖`` (or ``‖x‖/‖ŷ‖`` with norm correction)
``qjl`` (prod only)   ``ceil(d/8)`` bytes: the 1-bit stream ``sign(S r) ≥ 0`` of the residual
``residual_norm``     (prod only) one scalar: ``‖x‖·‖r‖``
====================  ==========================================================================

**Math** (paper Algorithm 1 and 2): ``y = Π x / ‖x‖`` (rotation applied first, then the division);
coordinate ``j`` of stream ``s`` gets the Lloyd-Max cell index ``bucketize(y_j, boundaries(d, w_s))``;
``ŷ_j = centroids(d, w_s)[code_j]``; ``x̂ = ‖x‖ · ŷ Π`` (MSE). Prod adds ``r = y − ŷ``,
``qjl = sign(S r)`` and the unbiased inner-product term ``‖x‖‖r‖·√(π/2)/d·<S Π q, qjl>``
(paper Lemma 4 / Theorem 2).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch

from .codebook import codebook_tensors
from .config import QuantizerConfig, Rotation, Variant
from .packing import pack_codes, pack_rows, packed_size, unpack_codes
from .rotation import RandomRotation, make_rotation, qjl_matrix, rotate_rows_transposed
from .threads import run_chunks

QJL_SCALE = math.sqrt(math.pi / 2.0)
"""``E|<s, r>| = √(2/π)‖r‖`` for ``s ~ N(0, I)`` (paper Lemma 4): the QJL estimator's scale."""
NORM_EPS = 1e-12
"""Smallest ``‖ŷ‖`` divided by in the norm correction (a reconstruction is never this short)."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Stream:
    """One run of equal-width codes inside a vector's code bytes.

    Attributes:
        width: bits per code (1..8).
        count: codes (rotated coordinates) in the stream.
        first: index of its first rotated coordinate.
        offset: its first byte inside the vector's code bytes.
        nbytes: ``ceil(count·width/8)``.
    """

    width: int
    count: int
    first: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class CodeLayout:
    """Byte layout of one vector's code (see the module docstring).

    Attributes:
        streams: the MSE code streams, high width first (empty for pure QJL).
        code_bytes: bytes of all streams.
        qjl_bytes: bytes of the QJL sign stream (0 for MSE).
        scalar_bytes: bytes of one stored scalar (norm, residual norm).
        bytes_per_vector: everything stored per vector.
    """

    streams: tuple[Stream, ...]
    code_bytes: int
    qjl_bytes: int
    scalar_bytes: int
    bytes_per_vector: int


@lru_cache(maxsize=512)
def layout(config: QuantizerConfig) -> CodeLayout:
    """The :class:`CodeLayout` of ``config`` (cached).

    Example:
        >>> [(s.width, s.count, s.offset) for s in layout(QuantizerConfig(128, 2.5)).streams]
        [(3, 64, 0), (2, 64, 24)]
    """
    n_hi, b_hi, n_lo, b_lo = config.bit_split
    streams = []
    offset = first = 0
    for count, width in ((n_hi, b_hi), (n_lo, b_lo)):
        if count and width:
            nb = packed_size(count, width)
            streams.append(Stream(width, count, first, offset, nb))
            offset += nb
        first += count
    scalar = torch.empty(0, dtype=getattr(torch, config.norm_dtype)).element_size()
    prod = config.variant is Variant.PROD
    qjl = packed_size(config.dim, 1) if prod else 0
    total = offset + scalar + (qjl + scalar if prod else 0)
    return CodeLayout(tuple(streams), offset, qjl, scalar, total)


def code_bytes(config: QuantizerConfig) -> int:
    """Bytes of Lloyd-Max codes per vector (all streams)."""
    return layout(config).code_bytes


def bytes_per_vector(config: QuantizerConfig) -> int:
    """Exact stored bytes per vector: codes + QJL bits + per-vector scalars."""
    return layout(config).bytes_per_vector


# --------------------------------------------------------------------------- bucketize (code of a coordinate)

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
    """Lloyd-Max cell indices of ``y`` in the ``(dim, bits)`` codebook, as uint8 (paper Alg. 1 line 5).

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


# --------------------------------------------------------------------------- MSE codes <-> rotated coordinates


def encode_mse(y: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """Packed Lloyd-Max codes of rotated unit-domain coordinates (paper Alg. 1 line 5).

    Args:
        y: ``(..., dim)`` float32, ``Π x/‖x‖``.
        config: gives the streams (:func:`layout`).

    Returns:
        ``(..., code_bytes(config))`` uint8.
    """
    parts = [pack_codes(bucketize_codes(y[..., s.first : s.first + s.count], config.dim, s.width), s.width) for s in layout(config).streams]
    if not parts:
        return torch.empty(*y.shape[:-1], 0, dtype=torch.uint8, device=y.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


@lru_cache(maxsize=256)
def byte_table(dim: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(256, 8 // width)``: the centroids of the codes packed in every possible byte (widths 1, 2, 4, 8).

    One gather per code byte decodes ``8 // width`` coordinates at once; the CPU decode, the index's
    re-ranking and the GPU kernels' byte-indexed tables all read this table.
    """
    device = torch.device(device)
    centroids, _ = codebook_tensors(dim, width, device)
    every_byte = torch.arange(256, device=device, dtype=torch.uint8).unsqueeze(-1)
    return centroids.to(dtype)[unpack_codes(every_byte, width, 8 // width).long()].contiguous()


def decode_mse(codes: torch.Tensor, config: QuantizerConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotated unit-domain reconstruction ``ŷ`` from packed codes (paper Alg. 1 line 9).

    Args:
        codes: ``(..., code_bytes(config))`` uint8.

    Returns:
        ``(..., dim)`` centroids in ``dtype`` (zeros for pure QJL).
    """
    streams = layout(config).streams
    lead = codes.shape[:-1]
    if not streams:
        return torch.zeros(*lead, config.dim, dtype=dtype, device=codes.device)
    parts = []
    for s in streams:
        packed = codes[..., s.offset : s.offset + s.nbytes]
        if 8 % s.width == 0:
            table = byte_table(config.dim, s.width, packed.device, dtype)
            out = torch.nn.functional.embedding(packed.reshape(-1, s.nbytes).int(), table)
            parts.append(out.reshape(*lead, s.nbytes * table.shape[-1])[..., : s.count])
        else:
            centroids, _ = codebook_tensors(config.dim, s.width, packed.device)
            parts.append(centroids.to(dtype)[unpack_codes(packed, s.width, s.count).long()])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def decode_mse_numpy(codes: np.ndarray, config: QuantizerConfig) -> np.ndarray:
    """:func:`decode_mse` for a few numpy rows (float32), without torch's per-call overhead.

    The same byte tables as :func:`decode_mse`; widths that do not divide 8 go through it.
    """
    streams = layout(config).streams
    if not streams or any(8 % s.width for s in streams):
        return decode_mse(torch.from_numpy(np.ascontiguousarray(codes)), config).numpy()
    parts = [
        np.take(_byte_table_numpy(config.dim, s.width), codes[:, s.offset : s.offset + s.nbytes], axis=0).reshape(len(codes), -1)[:, : s.count]
        for s in streams
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


@lru_cache(maxsize=64)
def _byte_table_numpy(dim: int, width: int) -> np.ndarray:
    return byte_table(dim, width).numpy()


def reconstruction_norms(y_hat: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """``max(‖ŷ‖, NORM_EPS)`` over the last dim, the divisor of the norm correction.

    A Lloyd-Max reconstruction is shorter than the unit vector it encodes (``E‖ŷ‖² = 1 − D_mse``,
    paper Thm. 1), by a factor that varies from vector to vector. Dividing the stored norm by
    ``‖ŷ‖`` gives every reconstruction its exact norm: no stored byte, no calibration.
    """
    if isinstance(y_hat, np.ndarray):
        return np.maximum(np.sqrt(np.square(y_hat).sum(-1)), np.float32(NORM_EPS))
    return torch.linalg.vector_norm(y_hat, dim=-1).clamp_min(NORM_EPS)


# --------------------------------------------------------------------------- QJL (paper Definition 1)


def encode_qjl(residual: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """1-bit QJL of a rotated-domain residual: ``pack(S r ≥ 0)``; ``residual``: ``(..., dim)``."""
    s = qjl_matrix(config.dim, config.seed, residual.device)
    return pack_codes(residual @ s.T >= 0, 1)


def decode_qjl_signs(qjl: torch.Tensor, config: QuantizerConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(..., dim)`` ±1 signs from packed QJL bits."""
    return unpack_codes(qjl, 1, config.dim).to(dtype) * 2 - 1


def qjl_weights(residual_norms: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """Per-vector factor ``γ = ‖x‖‖r‖·√(π/2)/d`` of the QJL term (float32, shape of ``residual_norms``)."""
    return residual_norms.float() * (QJL_SCALE / config.dim)


def qjl_scores(q_proj: torch.Tensor, qjl: torch.Tensor, residual_norms: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """The prod estimator's residual term ``γ_i <S Π q, sign_i>`` (paper Alg. 2 / Thm. 2).

    Args:
        q_proj: ``(..., M, d)`` projected rotated queries ``S Π q``.
        qjl: ``(..., n, ceil(d/8))`` packed signs; residual_norms: ``(..., n)``.

    Returns:
        ``(..., M, n)`` float32.
    """
    signs = decode_qjl_signs(qjl, config)
    return (q_proj @ signs.transpose(-1, -2)) * qjl_weights(residual_norms, config).unsqueeze(-2)


def qjl_residual(qjl: torch.Tensor, residual_norms: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """Reconstructed residual in the rotated domain, ``γ · sign Sᵀ`` scaled back by ``‖x‖``: ``(..., d)``."""
    s = qjl_matrix(config.dim, config.seed, qjl.device)
    return (decode_qjl_signs(qjl, config) @ s) * qjl_weights(residual_norms, config).unsqueeze(-1)


# --------------------------------------------------------------------------- the whole encode


class Encoded(NamedTuple):
    """Output of :func:`encode` (float32 scalars; the caller casts them to ``config.norm_dtype``)."""

    codes: torch.Tensor
    norms: torch.Tensor
    qjl: torch.Tensor | None
    residual_norms: torch.Tensor | None


_ENCODE_CHUNK_ELEMENTS = 1 << 18  # floats per row chunk of the CPU encode (1 MiB: stays in cache)


def encode(x: torch.Tensor, config: QuantizerConfig, *, norm_correction: bool = False) -> Encoded:
    """Quantize vectors of any norm: rotate, divide by the norm, bucketize, pack (+ QJL for prod).

    Args:
        x: ``(..., dim)`` float32, finite.
        config: the quantizer.
        norm_correction: return ``‖x‖/‖ŷ‖`` instead of ``‖x‖`` as the norm (MSE only; see
            :func:`reconstruction_norms`).

    Returns:
        :class:`Encoded` with ``codes (..., code_bytes)`` and ``norms (...)``.
    """
    rotation = make_rotation(config.rotation, config.dim, config.seed)
    norms = torch.linalg.vector_norm(x, dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(-1)
    y = None
    if config.variant is Variant.MSE and _encode_in_chunks(x, rotation):
        codes = _encode_mse_chunked(x, safe, rotation, config)
    else:
        y = rotation.rotate(x).div_(safe)
        codes = encode_mse(y, config)
    if norm_correction and config.variant is Variant.MSE:
        norms = norms / reconstruction_norms(decode_mse(codes, config))
    if config.variant is not Variant.PROD:
        return Encoded(codes, norms, None, None)
    assert y is not None
    residual = y - decode_mse(codes, config)
    return Encoded(codes, norms, encode_qjl(residual, config), norms * torch.linalg.vector_norm(residual, dim=-1))


def _encode_in_chunks(x: torch.Tensor, rotation: RandomRotation) -> bool:
    # Only where chunking cannot change a bit: every step of the Hadamard path (sign flips,
    # butterflies, division by the norm, table lookup, packing) is computed per row, whereas a
    # matmul (Haar) may round differently for a different number of rows.
    return x.device.type == "cpu" and rotation.kind is Rotation.HADAMARD and x.numel() > 2 * _ENCODE_CHUNK_ELEMENTS


def _encode_mse_chunked(x: torch.Tensor, safe_norms: torch.Tensor, rotation: RandomRotation, config: QuantizerConfig) -> torch.Tensor:
    """``encode_mse(rotation.rotate(x) / safe_norms, config)``, the same bytes, faster on CPU.

    Cache-sized row chunks, and the rotated coordinates stay coordinate-major (``(dim, m)``) from
    the Hadamard transform through the table lookup and the packing (:func:`pack_rows`); only the
    packed bytes are transposed back.
    """
    flat, div = x.reshape(-1, config.dim), safe_norms.reshape(-1)
    rows = max(1, _ENCODE_CHUNK_ELEMENTS // config.dim)
    out = torch.empty(flat.shape[0], code_bytes(config), dtype=torch.uint8)

    def one(first: int) -> None:
        yt = rotate_rows_transposed(rotation, flat[first : first + rows], div[first : first + rows])
        dest = out[first : first + rows]
        for s in layout(config).streams:
            dest[:, s.offset : s.offset + s.nbytes] = pack_rows(bucketize_codes(yt[s.first : s.first + s.count], config.dim, s.width), s.width).T

    run_chunks(one, range(0, flat.shape[0], rows))  # row chunks in parallel, each single-threaded (threads.py)
    return out.reshape(*x.shape[:-1], out.shape[-1])


__all__ = [
    "NORM_EPS",
    "QJL_SCALE",
    "CodeLayout",
    "Encoded",
    "Stream",
    "bucketize_codes",
    "byte_table",
    "bytes_per_vector",
    "code_bytes",
    "decode_mse",
    "decode_mse_numpy",
    "decode_qjl_signs",
    "encode",
    "encode_mse",
    "encode_qjl",
    "layout",
    "qjl_residual",
    "qjl_scores",
    "qjl_weights",
    "reconstruction_norms",
]
