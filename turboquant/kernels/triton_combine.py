"""Triton kernel that merges the split-K partials of a decode kernel (the Triton one and the CUDA one).

It rotates the compressed part back once (``acc @ Π_v``), adds the value offset, attends over
the full-precision window and writes the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import QuantizerConfig
from .layout import device_cached, next_pow2, unrotation_blocks
from .triton_device import _masked, _online_softmax

_VARYING = ["N", "TPS", "S", "M", "L", "s_m_b", "s_m_h", "s_m_l", "s_m_t"]


@device_cached(maxsize=16)
def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(16, dtype=torch.float32, device=device)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of the partials and the output (tests replace it to poison the memory)."""
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit(do_not_specialize=_VARYING + ["W", "s_fk_b", "s_fk_h", "s_fv_b", "s_fv_h"])
def triton_attention_combine_kernel(
    part_ptr,
    pv_hi, pv_lo,  # [VHI_C, DP], [VLO_C, DP] fp32 rows of Π_v (zero padded)
    voff_ptr,  # [BH, D] fp32
    qf_ptr,  # [BH, M, D] fp32: unrotated query
    scale2,
    fk_ptr, s_fk_b, s_fk_h, s_fk_w,
    fv_ptr, s_fv_b, s_fv_h, s_fv_w,
    mask_ptr, s_m_b, s_m_h, s_m_l, s_m_t,
    out_ptr,  # [BH, M, D] in the output dtype
    N, W, HKV, M, L, G, S, D,
    AC: tl.constexpr, VHI_C: tl.constexpr, VLO_C: tl.constexpr, HAS_HI: tl.constexpr,
    CK_LO: tl.constexpr, CK_HI: tl.constexpr,
    HAS_VOFF: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    DP: tl.constexpr, BM: tl.constexpr, BW: tl.constexpr,
):
    """Merge split partials, unrotate once, add value offset and the full-precision window."""
    bh = tl.program_id(0)
    mblk = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    rows = mblk * BM + tl.arange(0, BM)
    row_ok = rows < M
    cols = tl.arange(0, DP)
    col_ok = cols < D

    m_tot = tl.full([BM], float("-inf"), tl.float32)
    l_tot = tl.zeros([BM], tl.float32)
    out = tl.zeros([BM, DP], tl.float32)
    if S > 0:
        # pass 1: overall max and softmax mass of the compressed tokens
        for s in range(S):
            a_base = part_ptr + (bh * S + s) * M * (AC + 2) + rows * (AC + 2)
            m_s = tl.load(a_base + AC, mask=row_ok, other=float("-inf"))
            l_s = tl.load(a_base + AC + 1, mask=row_ok, other=0.0)
            m_new = tl.maximum(m_tot, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_tot = l_tot * tl.exp2(m_tot - m_safe) + l_s * tl.exp2(m_s - m_safe)
            m_tot = m_new
        m_ref = tl.where(m_tot == float("-inf"), 0.0, m_tot)
        # pass 2: weighted sum of the partial accumulators, rotated back CK columns at a time
        # (a [CK, DP] slice of Π_v keeps shared memory small for head_dim 256)
        for c0 in tl.static_range(0, VLO_C, CK_LO):
            acc = tl.zeros([BM, CK_LO], tl.float32)
            for s in range(S):
                a_base = part_ptr + (bh * S + s) * M * (AC + 2) + rows * (AC + 2)
                w_s = tl.exp2(tl.load(a_base + AC, mask=row_ok, other=float("-inf")) - m_ref)
                a_s = tl.load(a_base[:, None] + VHI_C + c0 + tl.arange(0, CK_LO)[None, :], mask=row_ok[:, None], other=0.0)
                acc += w_s[:, None] * a_s
            p_blk = tl.load(pv_lo + (c0 + tl.arange(0, CK_LO))[:, None] * DP + cols[None, :])
            out = tl.dot(acc, p_blk, out, input_precision="ieee")
        if HAS_HI:
            for c0 in tl.static_range(0, VHI_C, CK_HI):
                acc = tl.zeros([BM, CK_HI], tl.float32)
                for s in range(S):
                    a_base = part_ptr + (bh * S + s) * M * (AC + 2) + rows * (AC + 2)
                    w_s = tl.exp2(tl.load(a_base + AC, mask=row_ok, other=float("-inf")) - m_ref)
                    a_s = tl.load(a_base[:, None] + c0 + tl.arange(0, CK_HI)[None, :], mask=row_ok[:, None], other=0.0)
                    acc += w_s[:, None] * a_s
                p_blk = tl.load(pv_hi + (c0 + tl.arange(0, CK_HI))[:, None] * DP + cols[None, :])
                out = tl.dot(acc, p_blk, out, input_precision="ieee")
        if HAS_VOFF:
            voff = tl.load(voff_ptr + bh * D + cols, mask=col_ok, other=0.0)
            out = out + l_tot[:, None] * voff[None, :]

    if W > 0:
        q = tl.load(qf_ptr + bh * M * D + rows[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        q = q * scale2
        mrow = mask_ptr + b * s_m_b + (h * G + rows // L) * s_m_h + (rows % L) * s_m_l  # read only if HAS_MASK
        fk_base = fk_ptr + b * s_fk_b + h * s_fk_h
        fv_base = fv_ptr + b * s_fv_b + h * s_fv_h
        for w0 in range(0, W, BW):
            offs = w0 + tl.arange(0, BW)
            w_ok = offs < W
            k = tl.load(fk_base + offs[:, None] * s_fk_w + cols[None, :], mask=w_ok[:, None] & col_ok[None, :], other=0.0)
            sc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            sc = _masked(sc, mrow, N + offs, s_m_t, row_ok, w_ok, HAS_MASK, MASK_BOOL)
            m_new, alpha, p, l_tot = _online_softmax(m_tot, l_tot, sc)
            v = tl.load(fv_base + offs[:, None] * s_fv_w + cols[None, :], mask=w_ok[:, None] & col_ok[None, :], other=0.0)
            out = out * alpha[:, None]
            out = tl.dot(p, v.to(tl.float32), out, input_precision="ieee")
            m_tot = m_new

    denom = tl.where(l_tot > 0, l_tot, 1.0)
    out = out / denom[:, None]
    o_ptr = out_ptr + bh * M * D + rows[:, None] * D + cols[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def combine_partials(
    parts: torch.Tensor,
    vhi_cols: int,
    vlo_cols: int,
    has_hi: bool,
    values_config: QuantizerConfig | None,
    n: int,
    qf: torch.Tensor,
    q_len: int,
    scale2: float,
    full_keys: torch.Tensor | None,
    full_values: torch.Tensor | None,
    mask4: torch.Tensor | None,
    mask_bool: bool,
    value_offset: torch.Tensor | None,
    out_dtype: torch.dtype,
    block_m: int,
) -> torch.Tensor:
    """Launch :func:`triton_attention_combine_kernel` over the split partials of a decode kernel.

    Args:
        parts: ``[B·Hkv, splits, M, vhi_cols + vlo_cols + 2]`` partial ``(acc_hi, acc_lo, max, sum)``
            in base 2 (written by :func:`triton_quantized_attention_kernel` or the CUDA kernel).
        vhi_cols, vlo_cols, has_hi: the value streams' accumulator columns (an absent high stream
            still has 16 columns, never read).
        values_config: the values' quantizer (None when nothing is compressed, ``n = 0``).
        n: compressed tokens.
        qf: ``[B, Hkv, M, d]`` float32 queries (unrotated, ``M = G·L``) for the full-precision window.
        q_len: query length ``L``.
        mask4: the mask expanded to ``[B, Hq, L, N + W]`` or None.

    Returns:
        ``[B, Hkv, M, d]`` in ``out_dtype``.
    """
    b, hkv, m, d = qf.shape
    bh, splits = b * hkv, parts.shape[1] if n else 0
    dev = qf.device
    dummy = _dummy(dev)
    w = 0 if full_keys is None else full_keys.shape[-2]
    dp = max(16, next_pow2(d))
    pv_hi, pv_lo = unrotation_blocks(values_config, dp, dev) if values_config is not None else (dummy, dummy)
    has_voff = values_config is not None and value_offset is not None
    voff = value_offset.float().reshape(bh, d).contiguous() if has_voff else dummy  # type: ignore[union-attr]
    fk = full_keys if w else dummy.view(1, 1, 1, 16)
    fv = full_values if w else dummy.view(1, 1, 1, 16)
    if w and (fk.stride(-1) != 1 or fv.stride(-1) != 1):  # type: ignore[union-attr]
        fk, fv = fk.contiguous(), fv.contiguous()  # type: ignore[union-attr]
    mk = mask4 if mask4 is not None else dummy
    ms = mask4.stride() if mask4 is not None else (0, 0, 0, 0)
    out = _empty(b, hkv, m, d, dtype=out_dtype, device=dev)
    triton_attention_combine_kernel[(bh, triton.cdiv(m, block_m))](
        parts, pv_hi, pv_lo, voff, qf, scale2,
        fk, fk.stride(0), fk.stride(1), fk.stride(2),  # type: ignore[union-attr]
        fv, fv.stride(0), fv.stride(1), fv.stride(2),  # type: ignore[union-attr]
        mk, *ms, out,
        n, w, hkv, m, q_len, m // q_len, splits, d,
        AC=vhi_cols + vlo_cols, VHI_C=vhi_cols, VLO_C=vlo_cols, HAS_HI=has_hi,
        CK_LO=min(32, vlo_cols), CK_HI=min(32, vhi_cols),
        HAS_VOFF=has_voff, HAS_MASK=mask4 is not None, MASK_BOOL=mask_bool,
        DP=dp, BM=block_m, BW=32 if dp <= 128 else 16,
        num_warps=4,
    )  # fmt: skip
    return out


# Same signature as kernels.reference.torch_quantized_attention (the specification), plus ``tuning``.


__all__ = ["combine_partials", "triton_attention_combine_kernel"]
