"""CUDA C++ encode: TurboQuant MSE codes and norms written straight into a preallocated buffer (issue 9).

:func:`cuda_quantize_into` has the signature and result of
:func:`~turboquant.kernels.triton_encode.triton_quantize_into`, plus an optional fused
pre-transform (``(x − offset) · inv_scale`` per row, as the KV cache applies before quantizing) and
the norm correction ``‖x‖/‖ŷ‖`` (:func:`turboquant.codec.reconstruction_norms`) computed in the
kernel. The kernel (``cuda_encode.cu``; design in its header comment and docs/kernel_notes.md) is
compiled at first use like the decode kernel (:mod:`~turboquant.kernels.cuda_build`).

Covered: MSE codes of one integer width 2, 3 or 4, head_dim 64 or 128, fp32/fp16/bf16 inputs
whose last dim is contiguous, fp16/fp32 norms, code rows contiguous. Anything else, a GPU older
than sm_80 or a failed build (one warning) goes to the Triton encode.

The rotation's fragment order (:func:`rotation_fragments`) and the coordinate maps
(:func:`input_order`, :func:`output_order`) are plain torch, so CPU tests check them against
the dense rotation without a GPU.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..codebook import codebook_tensors
from ..codec import code_bytes, layout
from ..config import QuantizerConfig, TurboQuantError, Variant
from ..quantizer import QuantizedVectors
from ..rotation import make_rotation
from .cuda_build import CudaExtension
from .layout import device_cached, num_sms

_HERE = Path(__file__).resolve().parent
_DIMS = (64, 128)
_WIDTHS = (2, 3, 4)
_KINDS = {torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
MAX_CELLS = 576  # kMaxCells in cuda_encode.cu

_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda_encode.cuh"

cudaError_t tq_encode_dispatch(const tqe::Params& p, int d, int w, int xp, int pp, bool corr, const int* variant,
                               int cps, int sms, cudaStream_t s, int* info);

// x [R, T, D] (last dim contiguous), codes [R, S, bytes] uint8, norms [R, S] fp16/fp32, frag uint8 (fragments),
// cells int32 [ncells, 2], off / inv_scale / roff (Pi @ off, xp = 3 only) [R, D] fp32 or empty;
// tab = {pb[8], c2[16]}; v = {d, w, xp, pp, start, correct, ctas_per_sm, sms, cell_base8, variant[4]}
void encode(torch::Tensor x, torch::Tensor codes, torch::Tensor norms, torch::Tensor frag, torch::Tensor cells,
            c10::optional<torch::Tensor> off, c10::optional<torch::Tensor> inv_scale, c10::optional<torch::Tensor> roff,
            std::vector<double> tab, std::vector<int64_t> v) {
  const c10::cuda::CUDAGuard guard(x.device());
  tqe::Params p{};
  p.x = x.data_ptr();
  p.x_sr = x.stride(0); p.x_st = x.stride(1);
  p.x_kind = x.scalar_type() == at::kFloat ? 2 : (x.scalar_type() == at::kHalf ? 3 : 4);
  p.codes = codes.data_ptr<uint8_t>();
  p.c_sr = codes.stride(0); p.c_st = codes.stride(1);
  p.norms = norms.data_ptr();
  p.n_sr = norms.stride(0); p.n_st = norms.stride(1);
  p.n_kind = norms.scalar_type() == at::kHalf ? 3 : 2;
  p.off = off.has_value() ? off->data_ptr<float>() : nullptr;
  p.off_sr = off.has_value() ? off->stride(0) : 0;
  p.inv_scale = inv_scale.has_value() ? inv_scale->data_ptr<float>() : nullptr;
  p.sc_sr = inv_scale.has_value() ? inv_scale->stride(0) : 0;
  p.roff = roff.has_value() ? roff->data_ptr<float>() : nullptr;
  p.roff_sr = roff.has_value() ? roff->stride(0) : 0;
  TORCH_CHECK(roff.has_value() == (v[2] == 3) && (!roff.has_value() || off.has_value()),
              "turboquant CUDA encode: roff goes with off and xp = 3");
  p.frag = frag.data_ptr();
  p.cells = cells.data_ptr();
  p.ncells = (int)cells.size(0);
  p.cell_base8 = (int)v[8];
  p.rows = (int)x.size(0);
  p.tokens = (int)x.size(1);
  p.start = (int)v[4];
  TORCH_CHECK(tab.size() == 24, "turboquant CUDA encode: table size");
  for (int i = 0; i < 8; ++i) p.pb[i] = (float)tab[i];
  for (int i = 0; i < 16; ++i) p.c2[i] = (float)tab[8 + i];
  const int variant[4] = {(int)v[9], (int)v[10], (int)v[11], (int)v[12]};
  cudaError_t err = tq_encode_dispatch(p, (int)v[0], (int)v[1], (int)v[2], (int)v[3], v[5] != 0, variant, (int)v[6],
                                       (int)v[7], c10::cuda::getCurrentCUDAStream().stream(), nullptr);
  TORCH_CHECK(err == cudaSuccess, "turboquant CUDA encode: ", cudaGetErrorString(err));
}

// {registers, spill bytes, CTAs per SM, shared-memory bytes} of one kernel; v as above, ncells
std::vector<int64_t> encode_info(std::vector<int64_t> v, int64_t ncells) {
  tqe::Params p{};
  p.ncells = (int)ncells;
  int info[4] = {0, 0, 0, 0};
  const int variant[4] = {(int)v[9], (int)v[10], (int)v[11], (int)v[12]};
  cudaError_t err = tq_encode_dispatch(p, (int)v[0], (int)v[1], (int)v[2], (int)v[3], v[5] != 0, variant, 0, 1,
                                       nullptr, info);
  TORCH_CHECK(err == cudaSuccess, "turboquant CUDA encode variant: ", cudaGetErrorString(err));
  return {info[0], info[1], info[2], info[3]};
}
"""

_EXTENSION = CudaExtension("turboquant_cuda_encode", _HERE / "cuda_encode.cu", [_HERE / "cuda_encode.cuh"], _BINDING,
                           ["encode", "encode_info"], "CUDA encode kernel", "the Triton encode")  # fmt: skip


def load_extension(device: torch.device | None = None, tune: bool = False) -> Any:
    """Compile (first use) and load the extension; raise on failure (``tune``: with the benchmark's variants)."""
    return _EXTENSION.load(device, tune)


# ---------------------------------------------------------------- coordinate maps and fragments


def input_order(dim: int) -> torch.Tensor:
    """``[dim]`` input coordinate of each logical K index of the product.

    Lane t's B words ``w`` (k-chunk ``w // 2``, upper half ``w % 2``) are read 8 coordinates (one 16-byte load)
    at a time from ``32 c + 8 t`` (``cuda_encode.cu``'s ``lane_coord``): the four lanes of a token read 64
    contiguous bytes per load instruction.
    """
    k = torch.arange(dim)
    kk, j = k // 16, k % 16
    t, e, upper = (j % 8) // 2, j % 2, j // 8
    w = 2 * kk + upper  # the lane's B word
    return 32 * (w // 4) + 8 * t + 2 * (w % 4) + e


def output_order(dim: int) -> torch.Tensor:
    """``[dim]`` output coordinate of each logical M index (lane group g receives ``dim/8`` contiguous ones)."""
    cog = dim // 8
    m = torch.arange(dim)
    mt, r = m // 16, m % 16
    return cog * (r % 8) + 2 * mt + r // 8


def _fragment_index(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, k)`` logical indices of every bf16 of the fragment array ``[D/16 mt, D/16 kk, 32 lanes, 8]``.

    Register ``i`` of lane ``(g, t)`` of the m16n8k16 A operand: ``a0`` = (row g, k 2t..2t+1),
    ``a1`` = (row g+8, ...), ``a2`` = (row g, k 2t+8..2t+9), ``a3`` = (row g+8, k 2t+8..).
    """
    nt = dim // 16
    mt = torch.arange(nt).view(nt, 1, 1, 1)
    kk = torch.arange(nt).view(1, nt, 1, 1)
    lane = torch.arange(32).view(1, 1, 32, 1)
    h = torch.arange(8).view(1, 1, 1, 8)  # bf16 index inside the 4 registers
    g, t = lane // 4, lane % 4
    reg, half = h // 2, h % 2
    m = 16 * mt + g + 8 * (reg % 2)
    k = 16 * kk + 2 * t + half + 8 * (reg // 2)
    return m.expand(nt, nt, 32, 8), k.expand(nt, nt, 32, 8)


def rotation_parts(config: QuantizerConfig) -> list[torch.Tensor]:
    """``Π`` as one or two bf16 matrices whose sum is ``Π`` to 16 significant bits.

    One when bf16 holds ``Π`` to float32 precision: the Hadamard rotation at power-of-two ``d``
    (``H D₂ H D₁ / d`` has entries ``k/(d/2)``, ``|k| < 64``; the float64 matrix differs from them
    only by the rounding of its construction).
    """
    pi = make_rotation(config.rotation, config.dim, config.seed).matrix("cpu", torch.float64)
    hi = pi.to(torch.bfloat16)
    lo = pi - hi.double()
    if float(lo.abs().max()) <= 2.0**-30 * float(pi.abs().max()):
        return [hi]
    return [hi, lo.to(torch.bfloat16)]


def rotation_fragments(config: QuantizerConfig) -> torch.Tensor:
    """``[parts, D/16, D/16, 32, 8]`` bf16 (CPU): ``Π`` (permuted to the kernel's orders) in A-fragment order."""
    d = config.dim
    m, k = _fragment_index(d)
    rows, cols = output_order(d)[m], input_order(d)[k]
    return torch.stack([p[rows, cols] for p in rotation_parts(config)]).contiguous()


def fragments_to_matrix(frag: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`rotation_fragments` for one part: the dense ``[dim, dim]`` matrix (tests)."""
    m, k = _fragment_index(dim)
    out = torch.zeros(dim, dim, dtype=frag.dtype)
    out[output_order(dim)[m], input_order(dim)[k]] = frag
    return out


@lru_cache(maxsize=64)
def _rotation_part_count(config: QuantizerConfig) -> int:
    return len(rotation_parts(config))


# Token-rows from which a bf16 input with an offset (no scale) takes the one-product path (XP = 3): below, the
# host's Π μ (a few small launches, ~20 µs) costs more than the second product saves (~0.1 ns per token-row on
# an H200), and a CUDA-graphed decode step (one token per row) keeps its launch count.
ROFF_MIN_TOKEN_ROWS = 1 << 17


def _operand_parts(config: QuantizerConfig, dtype: torch.dtype, offset: bool, scaled: bool,
                   token_rows: int) -> tuple[int, int]:  # fmt: skip
    """``(XP, PP)`` of the kernel: the input as it is (XP = 1: bf16, no transform), as one bf16 part with the
    offset subtracted after the rotation (3) or as two bf16 parts (2: the general transform); parts of ``Π``."""
    if dtype != torch.bfloat16 or scaled or (offset and token_rows < ROFF_MIN_TOKEN_ROWS):
        xp = 1 if dtype == torch.bfloat16 and not (offset or scaled) else 2
    else:
        xp = 3 if offset else 1
    return xp, _rotation_part_count(config)


@device_cached(maxsize=64)
def _rotation_matrix(config: QuantizerConfig, device: torch.device) -> torch.Tensor:
    """``Π`` as a float64 ``[d, d]`` tensor on ``device`` (``y = Π x``)."""
    return make_rotation(config.rotation, config.dim, config.seed).matrix(device, torch.float64)


def rotated_offset(offset: torch.Tensor, config: QuantizerConfig) -> torch.Tensor:
    """``Π μ`` of each offset row ``μ`` (``[R, d]`` float32, computed in float64): the kernel's ``y = Π x − Π μ``."""
    return (offset.double() @ _rotation_matrix(config, offset.device).T).float().contiguous()


@device_cached(maxsize=64)
def _fragments(config: QuantizerConfig, device: torch.device) -> torch.Tensor:
    return rotation_fragments(config).view(torch.uint8).reshape(-1).to(device)


@lru_cache(maxsize=64)
def bucket_tables(config: QuantizerConfig) -> tuple[float, ...]:
    """``pb[8]`` (the positive boundaries, ``pb[7]``: the middle one) and ``c2[16]`` (the squared
    centroid of each code), as cuda_encode.cuh's ``Params`` holds them."""
    w = int(config.bits)
    centroids, bounds = codebook_tensors(config.dim, w, "cpu")
    h = 1 << (w - 1)
    mid = float(bounds[h - 1])
    if not torch.equal(bounds[h:], -bounds[: h - 1].flip(0)) or abs(mid) > 1e-12:
        raise TurboQuantError(f"CUDA encode needs an odd-symmetric codebook ({config})")
    pb = bounds[h:].tolist()
    c2 = centroids.double().square().tolist()
    return tuple((pb + [0.0] * 8)[:7] + [mid] + (c2 + [0.0] * 16)[:16])


def cell_key(y: np.ndarray) -> np.ndarray:
    """The kernel's cell key of float32 values: exponent·4 + the top two mantissa bits of ``|y|``."""
    return (np.asarray(y, dtype=np.float32).view(np.uint32) >> 21) & 0x3FF


def _key_cells(config: QuantizerConfig, first: int) -> tuple[np.ndarray, np.ndarray]:
    """For the cell keys ``first..1023``: the float32 magnitude where the code steps inside each cell (the middle
    boundary or a positive one; +inf if none) and the code of the cell's lowest value (+1 above that step).

    Raises :class:`TurboQuantError` if a cell holds two boundaries.
    """
    w = int(config.bits)
    h = 1 << (w - 1)
    tab = bucket_tables(config)
    pb = np.asarray(tab[: h - 1], dtype=np.float32)
    mid = np.float32(abs(tab[7]))
    keys = np.arange(first, 1024, dtype=np.uint32)
    lo = (keys << 21).view(np.float32)
    hi = np.where(keys < 1023, ((keys + 1) << 21).view(np.float32), np.float32(np.inf))
    bounds = np.concatenate([[mid], pb])  # magnitudes where the code steps: the middle boundary, then pb
    inside = (bounds[None, :] >= lo[:, None]) & (bounds[None, :] < hi[:, None])
    if (inside.sum(1) > 1).any():
        raise TurboQuantError(f"CUDA encode: a bucketize cell holds two boundaries ({config})")
    step = np.where(inside.any(1), bounds[np.argmax(inside, 1)], np.float32(np.inf)).astype(np.float32)
    code = np.where(mid < lo, h + (pb[None, :] < lo[:, None]).sum(1), h - 1)
    code[keys >= 1020] = 2 * h - 1  # infinities and NaN
    return step, code


def cell_table(config: QuantizerConfig) -> tuple[int, np.ndarray]:
    """``(base8, cells [n, 2] int32)`` of the table bucketize (``code_table`` in cuda_encode.cu).

    Cell ``i`` covers the float32 values with key ``base + i`` (cell 0 also every smaller one):
    ``(bits(boundary inside it) or +inf, code of its lowest value)``; the code of ``|y|`` is that code,
    +1 above the boundary. Raises :class:`TurboQuantError` if a cell holds two boundaries.
    """
    h = 1 << (int(config.bits) - 1)
    tab = bucket_tables(config)
    base = int(cell_key(np.float32(tab[0]))) - 5  # at least one octave below the first positive boundary
    if 1024 - base > MAX_CELLS:
        raise TurboQuantError(f"CUDA encode: too many bucketize cells ({config})")
    thr, code = _key_cells(config, base)
    thr[0], code[0] = np.float32(tab[7]), h - 1  # cell 0 down to 0: the middle boundary decides
    cells = np.stack([thr.view(np.int32), code.astype(np.int32)], 1)
    return base * 8, np.ascontiguousarray(cells)


NO_BOUNDARY = 0x1FFFFF  # a word's low 21 bits when its cell holds no boundary (no |y| bits compare above it)


def cell_words(config: QuantizerConfig) -> np.ndarray:
    """``words [1024] uint32`` of the word-table bucketize (``code_word`` in cuda_encode.cu, METHOD 2).

    Word ``k`` covers the float32 magnitudes with key ``k`` (:func:`cell_key`): bits 24-27 the code of its
    lowest value, bits 0-20 the low 21 bits of the boundary inside it (the middle one or a positive one;
    :data:`NO_BOUNDARY` if none). The same codes as :func:`cell_table` without its clamp below the first cells.
    """
    step, code = _key_cells(config, 0)
    low = np.where(np.isfinite(step), step.view(np.uint32) & NO_BOUNDARY, NO_BOUNDARY)
    return ((code.astype(np.uint32) << 24) | low.astype(np.uint32)).astype(np.uint32)


@device_cached(maxsize=64)
def _words(config: QuantizerConfig, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(cell_words(config).view(np.int32)).to(device)


@device_cached(maxsize=64)
def _cells(config: QuantizerConfig, device: torch.device) -> tuple[int, torch.Tensor]:
    base8, cells = cell_table(config)
    return base8, torch.from_numpy(cells).to(device)


# ---------------------------------------------------------------- dispatch


def _width(config: QuantizerConfig) -> int | None:
    streams = layout(config).streams
    if config.variant is not Variant.MSE or len(streams) != 1 or streams[0].width not in _WIDTHS:
        return None
    return streams[0].width


@lru_cache(maxsize=64)
def _tables_ok(config: QuantizerConfig) -> bool:
    try:
        cell_table(config)
    except TurboQuantError:
        return False
    return True


def cuda_encode_supports(x: torch.Tensor, config: QuantizerConfig, codes: torch.Tensor, norms: torch.Tensor) -> bool:
    """Whether :func:`cuda_quantize_into` runs its own kernel (else the Triton encode)."""
    if not x.is_cuda or config.dim not in _DIMS or _width(config) is None or x.dtype not in _KINDS:
        return False
    if not _tables_ok(config):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if norms.dtype not in (torch.float16, torch.float32) or codes.stride(-1) != 1 or codes.stride(-2) != code_bytes(config):
        return False
    nb = code_bytes(config) // 8  # bytes of a lane's slice of a code row: w * d / 64
    align = next(a for a in (8, 4, 2, 1) if nb % a == 0)
    return codes.data_ptr() % align == 0 and all(s % align == 0 for s in codes.stride()[:-1])


def cuda_quantize_into(
    x: torch.Tensor,
    config: QuantizerConfig,
    codes: torch.Tensor,
    norms: torch.Tensor,
    start: int,
    *,
    offset: torch.Tensor | None = None,
    inv_scale: torch.Tensor | None = None,
    norm_correction: bool = False,
    variant: tuple[int, int, int, int] | None = None,
    ctas_per_sm: int = 0,
) -> QuantizedVectors:
    """Quantize ``(x − offset) · inv_scale`` and write codes and norms into preallocated buffers at ``start``.

    Args:
        x: ``[*R, T, d]`` new vectors (float32, float16 or bfloat16).
        config: MSE quantizer config (see :func:`cuda_encode_supports`; otherwise the Triton/torch path).
        codes: ``[*R, S_cap, code_bytes(config)]`` uint8 buffer (rows contiguous).
        norms: ``[*R, S_cap]`` buffer in ``config.norm_dtype``.
        start: first position to write; ``start + T <= S_cap``.
        offset: optional ``[*R, d]`` float32, subtracted from every vector of its row before quantizing.
        inv_scale: optional ``[*R, d]`` float32, multiplied in after the offset.
        norm_correction: store ``‖x‖/‖ŷ‖`` (paper Thm. 1: ``E‖ŷ‖² = 1 − D``; see
            :func:`turboquant.codec.reconstruction_norms`) instead of ``‖x‖``.
        variant: ``(groups of 8 tokens per warp, bucketize method, warps, min CTAs/SM)`` of a ``-DTQ_TUNE``
            build (benchmarks; method 0 search, 1 cell table, 2 word table); None = the default kernel.
        ctas_per_sm: cap on resident CTAs per SM (0 = as many as fit).

    Returns:
        :class:`QuantizedVectors` views of the written slice, batch shape ``[*R, T]``.
    """
    d, t = config.dim, x.shape[-2]
    if x.shape[-1] != d or codes.shape[-1] != code_bytes(config):
        raise TurboQuantError(f"x {tuple(x.shape)} / codes {tuple(codes.shape)} do not match {config}")
    if start < 0 or start + t > codes.shape[-2]:
        raise TurboQuantError(f"writing {t} tokens at {start} overflows a buffer of {codes.shape[-2]}")
    lead = x.shape[:-2]
    for name, a in (("offset", offset), ("inv_scale", inv_scale)):
        if a is not None and tuple(a.shape) != (*lead, d):
            raise TurboQuantError(f"{name} {tuple(a.shape)} must be {(*lead, d)}")
    mod = _EXTENSION.load_or_warn(x.device, variant is not None) if t > 0 and cuda_encode_supports(x, config, codes, norms) else None
    if mod is None:
        return _fallback(x, config, codes, norms, start, offset, inv_scale, norm_correction)
    r = math.prod(lead)
    x3 = x.reshape(r, t, d)
    if x3.stride(-1) != 1 or x3.data_ptr() % 16 or any(s % 8 for s in x3.stride()[:-1]):
        x3 = x3.contiguous()
    c3 = codes.view(r, codes.shape[-2], codes.shape[-1])
    n2 = norms.view(r, norms.shape[-1])
    off2 = None if offset is None else offset.reshape(r, d).float().contiguous()
    sc2 = None if inv_scale is None else inv_scale.reshape(r, d).float().contiguous()
    frag = _fragments(config, x.device)
    xp, pp = _operand_parts(config, x.dtype, off2 is not None, sc2 is not None, r * t)
    roff = rotated_offset(off2, config) if xp == 3 else None
    v = variant or (0, 0, 0, 0)
    base8, cells = (0, _words(config, x.device)) if v[1] == 2 else _cells(config, x.device)
    w = _width(config)
    args = [d, w, xp, pp, start, int(norm_correction), ctas_per_sm, num_sms(x.device), base8, *v]
    mod.encode(x3, c3, n2, frag, cells, off2, sc2, roff, list(bucket_tables(config)), args)
    return QuantizedVectors(config, codes[..., start : start + t, :], norms[..., start : start + t])


def _fallback(
    x: torch.Tensor,
    config: QuantizerConfig,
    codes: torch.Tensor,
    norms: torch.Tensor,
    start: int,
    offset: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    norm_correction: bool,
) -> QuantizedVectors:
    from . import quantize_into

    if offset is not None or inv_scale is not None:
        x = x.float()
        if offset is not None:
            x = x - offset.float().unsqueeze(-2)
        if inv_scale is not None:
            x = x * inv_scale.float().unsqueeze(-2)
    return quantize_into(x, config, codes, norms, start, backend="triton" if x.is_cuda else "torch", norm_correction=norm_correction)


def encode_kernel_info(config: QuantizerConfig, dtype: torch.dtype, device: torch.device,
                       variant: tuple[int, int, int, int] | None = None, offset: bool = False, scaled: bool = False,
                       norm_correction: bool = False) -> tuple[int, int, int, int]:  # fmt: skip
    """``(registers, spill bytes, CTAs per SM, shared bytes)`` of the kernel that these arguments launch."""
    mod = _EXTENSION.load_or_warn(device, variant is not None)
    if mod is None or _width(config) is None:
        raise TurboQuantError(f"no CUDA encode kernel for {config}")
    xp, pp = _operand_parts(config, dtype, offset, scaled, ROFF_MIN_TOKEN_ROWS)
    ncells = cell_table(config)[1].shape[0]
    args = [config.dim, _width(config), xp, pp, 0, int(norm_correction), 0, 1, 0, *(variant or (0, 0, 0, 0))]
    return tuple(mod.encode_info(args, ncells))  # type: ignore[return-value]


__all__ = [
    "bucket_tables",
    "cell_key",
    "cell_table",
    "cell_words",
    "cuda_encode_supports",
    "cuda_quantize_into",
    "encode_kernel_info",
    "fragments_to_matrix",
    "input_order",
    "load_extension",
    "output_order",
    "rotation_fragments",
]
