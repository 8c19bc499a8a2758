"""Triton kernels: decode attention straight from packed TurboQuant codes, and fused encode.

This is the only module that imports Triton (``turboquant.kernels`` imports it
lazily), so ``import turboquant`` works without it. Under ``TRITON_INTERPRET=1``
the same kernels run on CPU tensors (slowly), which is how CI tests them.

Attention (:func:`triton_quantized_attention`, same signature and semantics as
:func:`~turboquant.kernels.reference.torch_quantized_attention`):

1. the wrapper rotates the query once (``q @ Π_kᵀ``), folds ``scaling · log2 e``
   into it and splits it into fp16 ``hi + lo`` parts (two tensor-core products
   with fp32 accumulation give ~fp32 accuracy for the query side);
2. :func:`triton_quantized_attention_kernel` runs on a grid
   ``(B·Hkv, splits, M-blocks)``: every program streams ``BLOCK_N`` tokens at a
   time of one KV head's packed key and value codes, unpacks them in registers
   (shift/mask or a byte-indexed lookup table to fp16 centroids), scores all
   ``G·L`` query rows of the group with ``tl.dot``, applies the mask, keeps an
   online softmax in base 2 and accumulates ``p·‖v‖ @ ŷ_v`` in the rotated domain;
   it writes one partial ``(max, sum, acc)`` per split (flash-decoding);
3. :func:`triton_attention_combine_kernel` merges the splits (log-sum-exp),
   rotates the compressed part back with one ``acc @ Π_v``, adds the value
   offset, attends over the full-precision window and writes the output.

Codes are read in the DESIGN.md layout (LSB-first bit streams, fractional rates
as a high-width stream followed by a low-width stream); a stream of width ``w``
is unpacked into columns in natural coordinate order: widths dividing 8 as
``[bytes, codes per byte]`` and width 3 as ``[groups of 3 bytes, 8 codes]``.
Supported here: MSE keys and values, widths 1, 2, 3, 4 and 8 per stream (so
integer bits 1-4 and 8 and fractional splits between them), any ``dim`` ≥ 16.
Everything else (prod keys, widths 5-7) falls back to the torch reference; see
:func:`triton_supports`.

Layout helpers are in :mod:`turboquant.kernels.layout`, the code decoders in
:mod:`turboquant.kernels.triton_decoders` (PTX in :mod:`turboquant.kernels.ptx`), launch parameters
in :mod:`turboquant.kernels.tuning`; the encode kernel is in :mod:`turboquant.kernels.triton_encode`.
"""


from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..quantizer import QuantizedVectors
from .layout import (
    KernelStream,
    config_supported,
    expand_mask,
    next_pow2,
    num_sms,
    query_rotation,
    stream_layout,
    stream_table,
)
from .ptx import REG_WIDTHS, reg_asm
from .reference import DEFAULT_CHUNK, attention_shapes, torch_quantized_attention
from .triton_combine import _VARYING, _dummy, _empty, combine_partials
from .triton_device import _decode_codes, _dotk_scores, _load_codes, _masked, _online_softmax
from .tuning import DEFAULT_TUNING, TritonTuning

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None = None,
    full_values: torch.Tensor | None = None,
) -> bool:
    """Whether :func:`triton_quantized_attention` runs its kernels for these inputs.

    False for prod keys, code widths 5-7, ``dim < 16``, or tensors that are on CPU
    outside ``TRITON_interpret()=1``; the caller (or the wrapper itself) then uses
    the torch reference.
    """
    if query.dim() != 4:
        return False
    if query.device.type != "cuda" and not _interpret():
        return False
    d = query.shape[-1]
    if d < 16:
        return False
    for qv in (keys, values):
        if qv is not None and qv.shape[-1] > 0:
            if qv.config.dim != d or not config_supported(qv.config):
                return False
            if qv.codes.stride(-1) != 1:
                return False
    return True


def _stream_lut(stream: KernelStream, codes: torch.Tensor, tuning: TritonTuning) -> int:
    """Decode method of one stream: 2 (register byte-permute decoder, widths 2/3/4, word aligned), else tuning.lut or 0.

    Under ``TRITON_interpret()=1`` method 2 runs an emulation (shift/mask + gather) through the same
    word loads and column joins, so CI covers its layout logic; the PTX itself is checked bit-exactly
    by tests/test_kernels.py.
    """
    w, _, nb, offset, _ = stream
    lut = tuning.lut
    if lut == 2:
        aligned = nb % 4 == 0 and offset % 4 == 0 and codes.stride(-2) % 4 == 0 and codes.data_ptr() % 4 == 0
        if w in REG_WIDTHS and aligned:
            return 2
        lut = 1
    return lut if w and 8 % w == 0 else 0




# --------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=_VARYING)
def triton_quantized_attention_kernel(
    q_ptr,  # [BH, M, QC] fp32: rotated query in stream column order
    qoff_ptr,  # [BH, M] fp32: <q, μ_k> (read only if HAS_QOFF)
    scale2,  # softmax scale · log2(e)
    kc_ptr, kn_ptr, vc_ptr, vn_ptr,
    s_kc_b, s_kc_h, s_kc_n,
    s_kn_b, s_kn_h, s_kn_n,
    s_vc_b, s_vc_h, s_vc_n,
    s_vn_b, s_vn_h, s_vn_n,
    mask_ptr, s_m_b, s_m_h, s_m_l, s_m_t,
    tab_khi, tab_klo, tab_vhi, tab_vlo,
    part_ptr,  # [BH, S, M, AC + 2] fp32: acc columns, then max, then sum
    N, HKV, M, L, G, TPS, S,
    QC: tl.constexpr, AC: tl.constexpr,
    KHI_W: tl.constexpr, KHI_NB: tl.constexpr, KHI_C: tl.constexpr,
    KLO_W: tl.constexpr, KLO_NB: tl.constexpr, KLO_OFF: tl.constexpr, KLO_C: tl.constexpr,
    VHI_W: tl.constexpr, VHI_NB: tl.constexpr, VHI_C: tl.constexpr,
    VLO_W: tl.constexpr, VLO_NB: tl.constexpr, VLO_OFF: tl.constexpr, VLO_C: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_QOFF: tl.constexpr,
    LUT_K: tl.constexpr, LUT_KHI: tl.constexpr, LUT_V: tl.constexpr, LUT_VHI: tl.constexpr,
    ASM_KLO: tl.constexpr, ASM_KHI: tl.constexpr, ASM_VLO: tl.constexpr, ASM_VHI: tl.constexpr,
    PRECISE: tl.constexpr, PREFETCH: tl.constexpr, DOTK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """One (batch·kv-head, split, row-block): online softmax over a token range of packed codes."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    mblk = tl.program_id(2)
    b = bh // HKV
    h = bh % HKV
    rows = mblk * BM + tl.arange(0, BM)
    row_ok = rows < M

    # scaled query split into fp16 hi + lo for each key stream (two fp16 products ≈ one fp32 product)
    q_base = q_ptr + bh * M * QC + rows[:, None] * QC
    c_lo = tl.arange(0, KLO_C)
    q = tl.load(q_base + KHI_C + c_lo[None, :], mask=row_ok[:, None], other=0.0) * scale2
    q_lo_h = q.to(tl.float16)
    q_lo_l = (q - q_lo_h.to(tl.float32)).to(tl.float16)
    if KHI_W > 0:
        c_hi = tl.arange(0, KHI_C)
        q = tl.load(q_base + c_hi[None, :], mask=row_ok[:, None], other=0.0) * scale2
        q_hi_h = q.to(tl.float16)
        q_hi_l = (q - q_hi_h.to(tl.float32)).to(tl.float16)
    if DOTK:
        # query columns k, 8 + k, 16 + k, ...: the K dimension of the k-th product (see _dotk_scores)
        wq = q_base + KHI_C + tl.arange(0, KLO_C // 8)[None, :] * 8
        qk0 = (tl.load(wq + 0, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk1 = (tl.load(wq + 1, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk2 = (tl.load(wq + 2, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk3 = (tl.load(wq + 3, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk4 = (tl.load(wq + 4, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk5 = (tl.load(wq + 5, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk6 = (tl.load(wq + 6, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
        qk7 = (tl.load(wq + 7, mask=row_ok[:, None], other=0.0) * scale2).to(tl.float16)
    if HAS_QOFF:
        qoff = tl.load(qoff_ptr + bh * M + rows, mask=row_ok, other=0.0) * scale2
    mrow = mask_ptr + b * s_m_b + (h * G + rows // L) * s_m_h + (rows % L) * s_m_l  # read only if HAS_MASK

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc_lo = tl.zeros([BM, VLO_C], tl.float32)
    acc_hi = tl.zeros([BM, VHI_C], tl.float32)

    start = split * TPS
    stop = tl.minimum(start + TPS, N)
    kc_base = kc_ptr + b * s_kc_b + h * s_kc_h
    vc_base = vc_ptr + b * s_vc_b + h * s_vc_h
    kn_base = kn_ptr + b * s_kn_b + h * s_kn_h
    vn_base = vn_ptr + b * s_vn_b + h * s_vn_h
    # raw codes and norms of the first tile; inside the loop the next tile is loaded before
    # this one is decoded (PREFETCH), so its memory latency overlaps the decode and the products
    offs = start + tl.arange(0, BN)
    tok_ok = offs < stop
    raw_k = _load_codes(kc_base + offs * s_kc_n + KLO_OFF, tok_ok, KLO_W, KLO_NB, KLO_C, LUT_K)
    raw_v = _load_codes(vc_base + offs * s_vc_n + VLO_OFF, tok_ok, VLO_W, VLO_NB, VLO_C, LUT_V)
    knorm = tl.load(kn_base + offs * s_kn_n, mask=tok_ok, other=0.0)
    vnorm = tl.load(vn_base + offs * s_vn_n, mask=tok_ok, other=0.0)
    for n0 in range(start, stop, BN):
        offs = n0 + tl.arange(0, BN)
        tok_ok = offs < stop
        if PREFETCH:
            nxt = offs + BN
            nxt_ok = nxt < stop
            raw_k_next = _load_codes(kc_base + nxt * s_kc_n + KLO_OFF, nxt_ok, KLO_W, KLO_NB, KLO_C, LUT_K)
            raw_v_next = _load_codes(vc_base + nxt * s_vc_n + VLO_OFF, nxt_ok, VLO_W, VLO_NB, VLO_C, LUT_V)
            knorm_next = tl.load(kn_base + nxt * s_kn_n, mask=nxt_ok, other=0.0)
            vnorm_next = tl.load(vn_base + nxt * s_vn_n, mask=nxt_ok, other=0.0)
        else:
            raw_k = _load_codes(kc_base + offs * s_kc_n + KLO_OFF, tok_ok, KLO_W, KLO_NB, KLO_C, LUT_K)
            raw_v = _load_codes(vc_base + offs * s_vc_n + VLO_OFF, tok_ok, VLO_W, VLO_NB, VLO_C, LUT_V)
            knorm = tl.load(kn_base + offs * s_kn_n, mask=tok_ok, other=0.0)
            vnorm = tl.load(vn_base + offs * s_vn_n, mask=tok_ok, other=0.0)
        # ---- scores from key codes
        if DOTK:
            s = _dotk_scores(raw_k, tab_klo, qk0, qk1, qk2, qk3, qk4, qk5, qk6, qk7, ASM_KLO)
        else:
            yk = _decode_codes(raw_k, tab_klo, KLO_W, KLO_C, LUT_K, BN, ASM_KLO)
            ykt = tl.trans(yk)
            s = tl.dot(q_lo_h, ykt)
            if PRECISE:
                s = tl.dot(q_lo_l, ykt, s)
        if KHI_W > 0:
            raw_k2 = _load_codes(kc_base + offs * s_kc_n, tok_ok, KHI_W, KHI_NB, KHI_C, LUT_KHI)
            yk2t = tl.trans(_decode_codes(raw_k2, tab_khi, KHI_W, KHI_C, LUT_KHI, BN, ASM_KHI))
            s = tl.dot(q_hi_h, yk2t, s)
            if PRECISE:
                s = tl.dot(q_hi_l, yk2t, s)
        s = s * knorm.to(tl.float32)[None, :]
        if HAS_QOFF:
            s = s + qoff[:, None]
        s = _masked(s, mrow, offs, s_m_t, row_ok, tok_ok, HAS_MASK, MASK_BOOL)
        m_i, alpha, p, l_i = _online_softmax(m_i, l_i, s)
        # ---- values, rotated domain; ‖v‖ folded into p
        pv = p * vnorm.to(tl.float32)[None, :]
        pv_h = pv.to(tl.float16)
        if PRECISE:
            pv_l = (pv - pv_h.to(tl.float32)).to(tl.float16)
        yv = _decode_codes(raw_v, tab_vlo, VLO_W, VLO_C, LUT_V, BN, ASM_VLO)
        acc_lo = acc_lo * alpha[:, None]
        acc_lo = tl.dot(pv_h, yv, acc_lo)
        if PRECISE:
            acc_lo = tl.dot(pv_l, yv, acc_lo)
        if VHI_W > 0:
            raw_v2 = _load_codes(vc_base + offs * s_vc_n, tok_ok, VHI_W, VHI_NB, VHI_C, LUT_VHI)
            yv2 = _decode_codes(raw_v2, tab_vhi, VHI_W, VHI_C, LUT_VHI, BN, ASM_VHI)
            acc_hi = acc_hi * alpha[:, None]
            acc_hi = tl.dot(pv_h, yv2, acc_hi)
            if PRECISE:
                acc_hi = tl.dot(pv_l, yv2, acc_hi)
        if PREFETCH:
            raw_k = raw_k_next
            raw_v = raw_v_next
            knorm = knorm_next
            vnorm = vnorm_next

    part = bh * S + split
    a_base = part_ptr + part * M * (AC + 2) + rows[:, None] * (AC + 2)
    tl.store(a_base + AC, m_i[:, None], mask=row_ok[:, None])
    tl.store(a_base + AC + 1, l_i[:, None], mask=row_ok[:, None])
    tl.store(a_base + tl.arange(0, VLO_C)[None, :] + VHI_C, acc_lo, mask=row_ok[:, None])
    if VHI_W > 0:
        tl.store(a_base + tl.arange(0, VHI_C)[None, :], acc_hi, mask=row_ok[:, None])


# --------------------------------------------------------------------------- wrappers


def _num_splits(bh: int, m_blocks: int, n: int, block_n: int, device: torch.device, tuning: TritonTuning) -> int:
    target = num_sms(device) * tuning.programs_per_sm
    splits = max(1, target // max(1, bh * m_blocks))
    splits = min(splits, max(1, triton.cdiv(n, block_n)))
    return splits


def triton_quantized_attention(
    query: torch.Tensor,
    keys: QuantizedVectors | None,
    values: QuantizedVectors | None,
    full_keys: torch.Tensor | None,
    full_values: torch.Tensor | None,
    scaling: float,
    mask: torch.Tensor | None = None,
    key_offset: torch.Tensor | None = None,
    value_offset: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    *,
    tuning: TritonTuning = DEFAULT_TUNING,
) -> torch.Tensor:
    """Attention over compressed tokens then full-precision tokens, with fused Triton kernels.

    Arguments, shapes and result as :func:`~turboquant.kernels.reference.torch_quantized_attention`
    (``chunk`` is ignored: the kernel picks its own block size and split count), plus ``tuning``
    (:class:`~turboquant.kernels.tuning.TritonTuning`). Inputs the kernels do not cover (see
    :func:`triton_supports`) go to the torch reference.

    Example:
        >>> # on a CUDA device: q [1, 32, 1, 128]; keys/values from TurboQuantMSE(128, 4).quantize(k [1, 8, N, 128])
        >>> # out = triton_quantized_attention(q, keys, values, None, None, 128 ** -0.5)
    """
    if not triton_supports(query, keys, values, full_keys, full_values):
        return torch_quantized_attention(
            query, keys, values, full_keys, full_values, scaling, mask, key_offset, value_offset, chunk
        )
    b, hq, l, d, n, w, hkv = attention_shapes(query, keys, values, full_keys, None)
    g = hq // hkv
    m = g * l
    bh = b * hkv
    dev = query.device
    scale2 = float(scaling) * LOG2E

    mask4 = None
    if mask is not None:
        mask4 = expand_mask(mask, b, hq, l, n + w)
    mk = mask4 if mask4 is not None else _dummy(dev)
    ms = mask4.stride() if mask4 is not None else (0, 0, 0, 0)
    dummy = _dummy(dev)
    qf = query.reshape(b, hkv, m, d).float()  # head h·G + g, row g·L + l of kv head h
    if not qf.is_contiguous():
        qf = qf.contiguous()

    block_m = min(max(16, next_pow2(m)), tuning.max_block_m)
    m_blocks = triton.cdiv(m, block_m)
    splits = 0
    parts = dummy
    vhi = vlo = KernelStream(0, 0, 0, 0, 16)
    if n:
        assert keys is not None and values is not None
        kcfg, vcfg = keys.config, values.config
        khi, klo = stream_layout(kcfg)
        vhi, vlo = stream_layout(vcfg)
        q_cols = qf @ query_rotation(kcfg, dev)  # [B, Hkv, M, QC]: one product rotates and orders columns
        qoff = dummy
        if key_offset is not None:
            qoff = (qf @ key_offset.float().unsqueeze(-1)).squeeze(-1).contiguous()
        block_n = tuning.block_n
        splits = _num_splits(bh, m_blocks, n, block_n, dev, tuning)
        tps = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
        splits = triton.cdiv(n, tps)
        ac = vhi[4] + vlo[4]
        parts = _empty(bh, splits, m, ac + 2, dtype=torch.float32, device=dev)
        kc, kn, vc, vn = keys.codes, keys.norms, values.codes, values.norms
        streams = ((kcfg, khi, kc), (kcfg, klo, kc), (vcfg, vhi, vc), (vcfg, vlo, vc))
        luts = [_stream_lut(st, codes, tuning) for _, st, codes in streams]
        tabs = [stream_table(cfg, st, lut, dev) for (cfg, st, _), lut in zip(streams, luts)]
        asms = [reg_asm(cfg.dim, st[0]) if lut == 2 else "" for (cfg, st, _), lut in zip(streams, luts)]
        # 4-bit keys straight into the mma operand layout: one K = 16 product per code slot of a word
        dotk = tuning.dotk and luts[1] == 2 and klo[0] == 4 and klo[4] // 8 >= 16 and not tuning.precise
        tune = tuning.for_width3() if 3 in (khi[0], klo[0], vhi[0], vlo[0]) else tuning
        # the cap is tuned for head_dim ≤ 128 (d = 256 would spill under it)
        extra = {"maxnreg": tune.maxnreg} if tune.maxnreg and d <= 128 else {}
        triton_quantized_attention_kernel[(bh, splits, m_blocks)](
            q_cols, qoff, scale2, kc, kn, vc, vn,
            kc.stride(0), kc.stride(1), kc.stride(2),
            kn.stride(0), kn.stride(1), kn.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2),
            vn.stride(0), vn.stride(1), vn.stride(2),
            mk, *ms,
            *tabs,
            parts,
            n, hkv, m, l, g, tps, splits,
            QC=q_cols.shape[-1], AC=ac,
            KHI_W=khi[0], KHI_NB=khi[2], KHI_C=khi[4],
            KLO_W=klo[0], KLO_NB=klo[2], KLO_OFF=klo[3], KLO_C=klo[4],
            VHI_W=vhi[0], VHI_NB=vhi[2], VHI_C=vhi[4],
            VLO_W=vlo[0], VLO_NB=vlo[2], VLO_OFF=vlo[3], VLO_C=vlo[4],
            HAS_MASK=mask4 is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
            HAS_QOFF=key_offset is not None,
            LUT_K=luts[1], LUT_KHI=luts[0], LUT_V=luts[3], LUT_VHI=luts[2],
            ASM_KLO=asms[1], ASM_KHI=asms[0], ASM_VLO=asms[3], ASM_VHI=asms[2],
            PRECISE=tuning.precise, PREFETCH=tuning.prefetch, DOTK=dotk,
            BM=block_m, BN=block_n,
            num_warps=tune.num_warps, num_stages=tune.num_stages, **extra,
        )  # fmt: skip
    out = combine_partials(
        parts, vhi.cols, vlo.cols, vhi.width > 0, values.config if n else None, n, qf, l, scale2, full_keys, full_values,  # type: ignore[union-attr]
        mask4, mask is not None and mask.dtype == torch.bool, value_offset, query.dtype, block_m,
    )  # fmt: skip
    return out.reshape(b, hq, l, d)


__all__ = [
    "triton_quantized_attention",
    "triton_quantized_attention_kernel",
    "triton_supports",
]
