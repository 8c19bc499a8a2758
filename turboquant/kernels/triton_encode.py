"""Triton encode kernel: TurboQuant MSE codes written straight into a preallocated cache buffer.

One program per (row, block of tokens): norm, unit vector, rotation as
``tl.dot`` with the stream's columns of ``Πᵀ`` (fp16 hi/lo split, three products ≈ fp32),
bucketize against the Lloyd-Max boundaries, LSB-first bit packing (DESIGN.md
layout, fractional rates as two streams) and the norm store. Codes match
:meth:`TurboQuantizer.quantize` except for coordinates within rounding of a
boundary (rotation by a product instead of FWHT).

The torch reference is :func:`turboquant.kernels.encode.torch_quantize_into`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..codebook import codebook_tensors
from ..codec import code_bytes
from ..config import QuantizerConfig, TurboQuantError
from ..quantizer import QuantizedVectors
from .encode import torch_quantize_into
from .layout import config_supported, device_cached, next_pow2, num_sms, stream_layout, unrotation_blocks
from .tuning import DEFAULT_TUNING, TritonTuning


@triton.jit
def _bucketize(y, bnd_ptr, W: tl.constexpr, MODE: tl.constexpr):
    """``torch.bucketize(y, boundaries)`` (count of boundaries < y) for ``2^W − 1`` sorted boundaries."""
    if MODE == 0:
        idx = tl.zeros(y.shape, tl.int32)
        for k in tl.static_range((1 << W) - 1):
            bk = tl.load(bnd_ptr + k)
            idx += (y > bk).to(tl.int32)
    elif MODE == 1:
        idx = tl.zeros(y.shape, tl.int32)
        for lvl in tl.static_range(W):
            cand = idx + (1 << (W - 1 - lvl))
            bk = tl.load(bnd_ptr + cand - 1)
            idx = tl.where(y > bk, cand, idx)
    else:
        # MODE 2 (widths 1-4; the codebook is odd-symmetric, boundary 2^(W-1) − 1 is 0): branchless
        # binary search of |y| over the positive boundaries with scalar thresholds picked by selects
        # (W − 1 compares and 2^(W−1) − 1 selects instead of 2^W − 1 compares and adds), then the sign.
        H: tl.constexpr = 1 << (W - 1)
        a = tl.abs(y)
        m = tl.zeros(y.shape, tl.int32)
        if W == 2:
            m = (a > tl.load(bnd_ptr + H)).to(tl.int32)
        elif W == 3:
            t0 = a > tl.load(bnd_ptr + H + 1)
            t1 = a > tl.where(t0, tl.load(bnd_ptr + H + 2), tl.load(bnd_ptr + H))
            m = t0.to(tl.int32) * 2 + t1.to(tl.int32)
        elif W == 4:
            t0 = a > tl.load(bnd_ptr + H + 3)
            t1 = a > tl.where(t0, tl.load(bnd_ptr + H + 5), tl.load(bnd_ptr + H + 1))
            t2 = a > tl.where(
                t0,
                tl.where(t1, tl.load(bnd_ptr + H + 6), tl.load(bnd_ptr + H + 4)),
                tl.where(t1, tl.load(bnd_ptr + H + 2), tl.load(bnd_ptr + H)),
            )
            m = t0.to(tl.int32) * 4 + t1.to(tl.int32) * 2 + t2.to(tl.int32)
        # above the middle boundary (0, compared as stored so that y = ±0 lands where MODE 0 puts it):
        # H + m; otherwise H − 1 − m (= count of boundaries below y, as torch.bucketize)
        idx = tl.where(y > tl.load(bnd_ptr + H - 1), H + m, (H - 1) - m)
    return idx


@triton.jit
def _rotation_operands(pit_ptr, DP: tl.constexpr, COLS: tl.constexpr):
    """This stream's columns of Πᵀ as fp16 hi + lo (pre-split by the wrapper): three fp16 products ≈ fp32."""
    r = tl.arange(0, DP)
    c = tl.arange(0, COLS)
    p_hi = tl.load(pit_ptr + r[:, None] * COLS + c[None, :])
    p_lo = tl.load(pit_ptr + DP * COLS + r[:, None] * COLS + c[None, :])
    return p_hi, p_lo


@triton.jit
def _encode_stream(
    u_hi, u_lo, p_hi, p_lo, bnd_ptr, out_rows, row_ok,
    DP: tl.constexpr, W: tl.constexpr, N: tl.constexpr, NB: tl.constexpr, COLS: tl.constexpr,
    MODE: tl.constexpr, BT: tl.constexpr, DOTS: tl.constexpr,
):
    """Rotate (products with this stream's columns of Πᵀ), bucketize, pack and store one stream."""
    c = tl.arange(0, COLS)
    y = tl.dot(u_hi, p_hi)
    if DOTS >= 3:
        y = tl.dot(u_hi, p_lo, y)
    if DOTS >= 2:
        y = tl.dot(u_lo, p_hi, y)
    idx = _bucketize(y, bnd_ptr, W, MODE)
    idx = tl.where(c[None, :] < N, idx, 0)  # pad bits are zero
    if 8 % W == 0:
        SLOTS: tl.constexpr = 8 // W
        NBP: tl.constexpr = COLS // SLOTS
        codes = tl.reshape(idx, (BT, NBP, SLOTS))
        slot = tl.arange(0, SLOTS)
        packed = tl.sum(codes << (slot * W)[None, None, :], axis=2)
        bcol = tl.arange(0, NBP)
        tl.store(out_rows[:, None] + bcol[None, :], packed.to(tl.uint8), mask=row_ok[:, None] & (bcol[None, :] < NB))
    else:
        NGP: tl.constexpr = COLS // 8
        codes = tl.reshape(idx, (BT, NGP, 8))
        slot = tl.arange(0, 8)
        word = tl.sum(codes << (slot * W)[None, None, :], axis=2)
        k = tl.arange(0, 4)
        g = tl.arange(0, NGP)
        bytes_ = (word[:, :, None] >> (k * 8)[None, None, :]) & 255
        byte_idx = g[:, None] * W + k[None, :]
        ok = (k[None, :] < W) & (byte_idx < NB)
        tl.store(out_rows[:, None, None] + byte_idx[None, :, :], bytes_.to(tl.uint8), mask=row_ok[:, None, None] & ok[None, :, :])


@triton.jit(do_not_specialize=["T", "START"])
def triton_quantize_kernel(
    x_ptr, s_x_r, s_x_t,  # [R, T, d]
    codes_ptr, s_c_r, s_c_t,  # [R, S_cap, code_bytes]
    norms_ptr, s_n_r, s_n_t,  # [R, S_cap]
    pit_hi, pit_lo, bnd_hi, bnd_lo,
    T, START, D,
    DP: tl.constexpr,
    HI_W: tl.constexpr, HI_N: tl.constexpr, HI_NB: tl.constexpr, HI_C: tl.constexpr,
    LO_W: tl.constexpr, LO_N: tl.constexpr, LO_NB: tl.constexpr, LO_OFF: tl.constexpr, LO_C: tl.constexpr,
    MODE_HI: tl.constexpr, MODE_LO: tl.constexpr, BT: tl.constexpr, NPT: tl.constexpr, DOTS: tl.constexpr,
):
    """One (row, every NPT-th block of BT tokens): norm, rotation, Lloyd-Max codes, packing, stores at START + t.

    Persistent over token blocks (grid ``(rows, NPT)``), so the ``Πᵀ`` operands are read once per program.
    """
    r = tl.program_id(0)
    tb0 = tl.program_id(1)
    cols = tl.arange(0, DP)
    # Πᵀ operands loaded once per program (the stores in the loop keep the compiler from hoisting them)
    if HI_W > 0:
        ph_hi, ph_lo = _rotation_operands(pit_hi, DP, HI_C)
    pl_hi, pl_lo = _rotation_operands(pit_lo, DP, LO_C)
    for tb in range(tb0, tl.cdiv(T, BT), NPT):
        t = tb * BT + tl.arange(0, BT)
        t_ok = t < T
        x = tl.load(x_ptr + r * s_x_r + t[:, None] * s_x_t + cols[None, :], mask=t_ok[:, None] & (cols[None, :] < D), other=0.0)
        x = x.to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        unit = x / tl.where(norm > 0, norm, 1.0)[:, None]
        u_hi = unit.to(tl.float16)
        u_lo = (unit - u_hi.to(tl.float32)).to(tl.float16)
        pos = START + t
        tl.store(norms_ptr + r * s_n_r + pos * s_n_t, norm.to(norms_ptr.dtype.element_ty), mask=t_ok)
        out_rows = codes_ptr + r * s_c_r + pos * s_c_t
        if HI_W > 0:
            _encode_stream(u_hi, u_lo, ph_hi, ph_lo, bnd_hi, out_rows, t_ok, DP, HI_W, HI_N, HI_NB, HI_C, MODE_HI, BT, DOTS)
        _encode_stream(u_hi, u_lo, pl_hi, pl_lo, bnd_lo, out_rows + LO_OFF, t_ok, DP, LO_W, LO_N, LO_NB, LO_C, MODE_LO, BT, DOTS)


@device_cached(maxsize=64)
def _rotation_columns(config: QuantizerConfig, dp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of ``Πᵀ`` for each stream, zero-padded, as fp16 ``(hi, lo)``: ``[2, dp, cols_hi]``, ``[2, dp, cols_lo]``."""

    def split(m: torch.Tensor) -> torch.Tensor:
        m_hi = m.to(torch.float16)
        return torch.stack((m_hi, (m - m_hi.float()).to(torch.float16))).contiguous()

    hi, lo = unrotation_blocks(config, dp, device)
    return split(hi.T), split(lo.T)


@device_cached(maxsize=64)
def _boundaries(dim: int, width: int, device: torch.device) -> torch.Tensor:
    if width == 0:
        return torch.zeros(1, dtype=torch.float32, device=device)
    return codebook_tensors(dim, width, device)[1].contiguous()


def encode_supported(config: QuantizerConfig, x: torch.Tensor) -> bool:
    """Whether :func:`triton_quantize_into` runs its kernel for this config and input."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return config_supported(config)


_ENCODE_BLOCK: dict[tuple[int, torch.dtype, int | None, int], int] = {}
"""Token block that fits shared memory, per (dim, input dtype, device, tuned block), learned on first launch."""


def triton_quantize_into(
    x: torch.Tensor,
    config: QuantizerConfig,
    codes: torch.Tensor,
    norms: torch.Tensor,
    start: int,
    *,
    tuning: TritonTuning = DEFAULT_TUNING,
) -> QuantizedVectors:
    """Quantize ``x`` and write the codes and norms into preallocated buffers at ``start``.

    One fused kernel (norm, rotation by one product with ``Πᵀ``, bucketize, pack,
    store); no temporary of the rotated vectors and no reallocation of the buffers.

    Args:
        x: ``[*R, T, d]`` new vectors (float16, bfloat16 or float32).
        config: MSE quantizer config (see :func:`encode_supported`; otherwise the torch path runs).
        codes: ``[*R, S_cap, code_bytes(config)]`` uint8 buffer (last dim contiguous).
        norms: ``[*R, S_cap]`` buffer in ``config.norm_dtype``.
        start: first position to write; ``start + T <= S_cap``.
        tuning: launch parameters (``encode_*`` fields).

    Returns:
        :class:`QuantizedVectors` views of the written slice, batch shape ``[*R, T]``.
    """
    d = config.dim
    t = x.shape[-2]
    if x.shape[-1] != d or codes.shape[-1] != code_bytes(config):
        raise TurboQuantError(f"x {tuple(x.shape)} / codes {tuple(codes.shape)} do not match {config}")
    if start < 0 or start + t > codes.shape[-2]:
        raise TurboQuantError(f"writing {t} tokens at {start} overflows a buffer of {codes.shape[-2]}")
    if not encode_supported(config, x) or t == 0:
        return torch_quantize_into(x, config, codes, norms, start)
    lead = x.shape[:-2]
    r = math.prod(lead)
    x3 = x.reshape(r, t, d)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    c3 = codes.view(r, codes.shape[-2], codes.shape[-1])
    n2 = norms.view(r, norms.shape[-1])
    dev = x.device
    dp = max(16, next_pow2(d))
    hi, lo = stream_layout(config)
    pit_hi, pit_lo = _rotation_columns(config, dp, dev)
    bt = tuning.encode_block_t
    mode = tuning.encode_bucket

    def stream_mode(w: int) -> int:
        if w > 4:
            return 1
        return 0 if (mode == 2 and w == 1) else mode  # mode 2 (symmetric search) covers widths 2-4

    # The tuned block (128 tokens) was timed on 16-bit inputs; fp32 inputs at d=128 need more shared
    # memory than an H200 has (262 KB > 227 KB), so halve the block until the kernel fits.
    key = (d, x.dtype, dev.index, tuning.encode_block_t)
    bt = _ENCODE_BLOCK.get(key, bt)
    while True:
        blocks = triton.cdiv(t, bt)
        per_sm = tuning.encode_programs_per_sm
        npt = blocks if per_sm <= 0 else max(1, min(blocks, triton.cdiv(num_sms(dev) * per_sm, r)))
        try:
            triton_quantize_kernel[(r, npt)](
                x3, x3.stride(0), x3.stride(1),
                c3, c3.stride(0), c3.stride(1),
                n2, n2.stride(0), n2.stride(1),
                pit_hi, pit_lo, _boundaries(d, hi[0], dev), _boundaries(d, lo[0], dev),
                t, start, d,
                DP=dp,
                HI_W=hi[0], HI_N=hi[1], HI_NB=hi[2], HI_C=hi[4],
                LO_W=lo[0], LO_N=lo[1], LO_NB=lo[2], LO_OFF=lo[3], LO_C=lo[4],
                MODE_HI=stream_mode(hi[0]), MODE_LO=stream_mode(lo[0]),
                BT=bt, NPT=npt, DOTS=tuning.encode_dots, num_warps=tuning.encode_num_warps,
            )  # fmt: skip
            break
        except triton.runtime.errors.OutOfResources:
            if bt <= 16:
                raise
            bt //= 2
    _ENCODE_BLOCK[key] = bt
    return QuantizedVectors(config, codes[..., start : start + t, :], norms[..., start : start + t])


__all__ = ["encode_supported", "triton_quantize_into", "triton_quantize_kernel"]
