"""Triton device functions shared by the kernels: loading and decoding code streams, masks, online softmax.

Layouts follow :mod:`turboquant.kernels.layout`; the register decoders' PTX comes from
:mod:`turboquant.kernels.ptx` (``ASM == ""`` runs the shift/mask emulation, as under the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_codes(
    row_ptr,  # [BN] pointers to each token's first byte of this stream
    row_ok,  # [BN] token mask
    W: tl.constexpr,
    NB: tl.constexpr,
    COLS: tl.constexpr,
    LUT: tl.constexpr,
):
    """Raw packed codes of BN tokens.

    LUT 2: int32 words ``[BN, COLS·W/32]`` (widths 2, 4) or ``[BN, COLS/8, 2]`` (width 3: for each 3-byte
    group the word holding its first byte and the next word); otherwise bytes ``[BN, NB]`` or byte
    groups ``[BN, G, 4]``.
    """
    if LUT == 2:
        wptr = row_ptr.to(tl.pointer_type(tl.int32))
        if W == 3:
            # per 3-byte group g: the aligned word holding its first byte and the next one
            NG: tl.constexpr = COLS // 8
            widx = tl.arange(0, NG) * 3 // 4
            wa = tl.load(wptr[:, None] + widx[None, :], mask=row_ok[:, None] & (widx < NB // 4)[None, :], other=0)
            wb = tl.load(wptr[:, None] + widx[None, :] + 1, mask=row_ok[:, None] & (widx + 1 < NB // 4)[None, :], other=0)
            raw = tl.join(wa, wb)  # the pair axis lives in registers, so the decoder's split is free
        else:
            NWP: tl.constexpr = COLS * W // 32
            wi = tl.arange(0, NWP)
            if NB // 4 == NWP:  # no column mask: lets the compiler vectorise the word loads
                raw = tl.load(wptr[:, None] + wi[None, :], mask=row_ok[:, None], other=0)
            else:
                raw = tl.load(wptr[:, None] + wi[None, :], mask=row_ok[:, None] & (wi[None, :] < NB // 4), other=0)
    elif 8 % W == 0:
        NBP: tl.constexpr = COLS // (8 // W)
        b = tl.arange(0, NBP)
        raw = tl.load(row_ptr[:, None] + b[None, :], mask=row_ok[:, None] & (b[None, :] < NB), other=0)
    else:
        NGP: tl.constexpr = COLS // 8
        g = tl.arange(0, NGP)
        k = tl.arange(0, 4)
        byte_idx = g[:, None] * W + k[None, :]
        ok = (k[None, :] < W) & (byte_idx < NB)
        raw = tl.load(row_ptr[:, None, None] + byte_idx[None, :, :], mask=row_ok[:, None, None] & ok[None, :, :], other=0)
    return raw


# Column joins: _treeN(x_0, ..., x_{N-1}) has a new trailing axis of N (as [2, 2, ...]) whose row-major
# flattening puts x_k at position k (tl.join appends its axis last, so the outermost join is bit 0).
@triton.jit
def _tree4(x0, x1, x2, x3):
    return tl.join(tl.join(x0, x2), tl.join(x1, x3))


@triton.jit
def _tree8(x0, x1, x2, x3, x4, x5, x6, x7):
    return tl.join(_tree4(x0, x2, x4, x6), _tree4(x1, x3, x5, x7))


@triton.jit
def _tree16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    return tl.join(_tree8(x0, x2, x4, x6, x8, x10, x12, x14), _tree8(x1, x3, x5, x7, x9, x11, x13, x15))


@triton.jit
def _code(w, W: tl.constexpr, K: tl.constexpr):
    """Code ``K`` of a word of ``32/W`` codes (emulation of the register decoders)."""
    return (w >> (K * W)) & ((1 << W) - 1)


@triton.jit
def _decode_codes(
    raw,
    tab_ptr,
    W: tl.constexpr,
    COLS: tl.constexpr,
    LUT: tl.constexpr,
    BN: tl.constexpr,
    ASM: tl.constexpr,
):
    """Raw codes from :func:`_load_codes` → ``[BN, COLS]`` fp16 centroids in natural coordinate order."""
    MASK: tl.constexpr = (1 << W) - 1
    if LUT == 2:
        # register decoders: column (32/W)·word + k ← output k of the word (width 3: 32·unit + k)
        if W == 3:
            wa, wb = tl.split(raw)
            NG: tl.constexpr = COLS // 8
            sh = ((tl.arange(0, NG) * 3 % 4) * 8)[None, :]  # bit offset of group g in its first word
            if ASM == "":
                x = (wa.to(tl.uint32, bitcast=True) >> sh) | tl.where(sh > 0, wb.to(tl.uint32, bitcast=True) << (32 - sh), 0)
                idx = _tree8(_code(x, 3, 0), _code(x, 3, 1), _code(x, 3, 2), _code(x, 3, 3), _code(x, 3, 4), _code(x, 3, 5), _code(x, 3, 6), _code(x, 3, 7))
                y = tl.load(tab_ptr + tl.reshape(idx, (BN, COLS)).to(tl.int32))
            else:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                    ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [wa, wb, sh + tl.zeros_like(wa)], dtype=(tl.float16,) * 8, is_pure=True, pack=1
                )
                y = tl.reshape(_tree8(o0, o1, o2, o3, o4, o5, o6, o7), (BN, COLS))
        elif W == 2:
            if ASM == "":
                w = raw.to(tl.uint32, bitcast=True)
                idx = _tree16(
                    _code(w, 2, 0), _code(w, 2, 1), _code(w, 2, 2), _code(w, 2, 3), _code(w, 2, 4), _code(w, 2, 5),
                    _code(w, 2, 6), _code(w, 2, 7), _code(w, 2, 8), _code(w, 2, 9), _code(w, 2, 10), _code(w, 2, 11),
                    _code(w, 2, 12), _code(w, 2, 13), _code(w, 2, 14), _code(w, 2, 15),
                )  # fmt: skip
                y = tl.load(tab_ptr + tl.reshape(idx, (BN, COLS)).to(tl.int32))
            else:
                o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = tl.inline_asm_elementwise(
                    ASM, "=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,=h,r", [raw], dtype=(tl.float16,) * 16, is_pure=True, pack=1
                )
                y = tl.reshape(_tree16(o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15), (BN, COLS))
        else:
            # 4-bit: 32-bit words of 8 codes decoded in registers by byte permutes (see _prmt4_asm)
            if ASM == "":
                w = raw.to(tl.uint32, bitcast=True)
                idx = _tree8(_code(w, 4, 0), _code(w, 4, 1), _code(w, 4, 2), _code(w, 4, 3), _code(w, 4, 4), _code(w, 4, 5), _code(w, 4, 6), _code(w, 4, 7))
                y = tl.load(tab_ptr + tl.reshape(idx, (BN, COLS)).to(tl.int32))
            else:
                o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                    ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [raw], dtype=(tl.float16,) * 8, is_pure=True, pack=1
                )
                y = tl.reshape(_tree8(o0, o1, o2, o3, o4, o5, o6, o7), (BN, COLS))
    elif 8 % W == 0:
        SLOTS: tl.constexpr = 8 // W
        r32 = raw.to(tl.int32)
        slot = tl.arange(0, SLOTS)
        if LUT == 1:
            idx = r32[:, :, None] + (slot * 256)[None, None, :]
        else:
            idx = (r32[:, :, None] >> (slot * W)[None, None, :]) & MASK
        y = tl.reshape(tl.load(tab_ptr + idx), (BN, COLS))
    else:
        k = tl.arange(0, 4)
        word = tl.sum(raw.to(tl.int32) << (k * 8)[None, None, :], axis=2)
        slot = tl.arange(0, 8)
        idx = (word[:, :, None] >> (slot * W)[None, None, :]) & MASK
        y = tl.reshape(tl.load(tab_ptr + idx), (BN, COLS))
    return y


@triton.jit
def _dotk_scores(raw, tab_ptr, q0, q1, q2, q3, q4, q5, q6, q7, ASM: tl.constexpr):
    """``Σ_k q_k @ ŷ_kᵀ`` for 4-bit key words: ``ŷ_k [BN, words]`` holds code ``k`` of every word.

    Each product has K = words (16 for d = 128), so the decoded values feed the mma operand layout
    straight from the decoder's registers (Triton moves the raw words, not a decoded tile, through
    its layout conversion) and the decoded keys never touch shared memory.
    """
    if ASM == "":
        w = raw.to(tl.uint32, bitcast=True)
        k0 = tl.load(tab_ptr + _code(w, 4, 0).to(tl.int32))
        k1 = tl.load(tab_ptr + _code(w, 4, 1).to(tl.int32))
        k2 = tl.load(tab_ptr + _code(w, 4, 2).to(tl.int32))
        k3 = tl.load(tab_ptr + _code(w, 4, 3).to(tl.int32))
        k4 = tl.load(tab_ptr + _code(w, 4, 4).to(tl.int32))
        k5 = tl.load(tab_ptr + _code(w, 4, 5).to(tl.int32))
        k6 = tl.load(tab_ptr + _code(w, 4, 6).to(tl.int32))
        k7 = tl.load(tab_ptr + _code(w, 4, 7).to(tl.int32))
    else:
        k0, k1, k2, k3, k4, k5, k6, k7 = tl.inline_asm_elementwise(
            ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [raw], dtype=(tl.float16,) * 8, is_pure=True, pack=1
        )
    s = tl.dot(q0, tl.trans(k0))
    s = tl.dot(q1, tl.trans(k1), s)
    s = tl.dot(q2, tl.trans(k2), s)
    s = tl.dot(q3, tl.trans(k3), s)
    s = tl.dot(q4, tl.trans(k4), s)
    s = tl.dot(q5, tl.trans(k5), s)
    s = tl.dot(q6, tl.trans(k6), s)
    s = tl.dot(q7, tl.trans(k7), s)
    return s


@triton.jit
def _masked(s, mrow, cols, s_m_t, row_ok, col_ok, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Scores (base 2) with mask columns ``cols`` applied: bool masks to −inf, additive masks × log2 e; invalid columns −inf."""
    if HAS_MASK:
        mv = tl.load(mrow[:, None] + cols[None, :] * s_m_t, mask=row_ok[:, None] & col_ok[None, :], other=0)
        if MASK_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634  # log2(e)
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _online_softmax(m_i, l_i, s):
    """One online-softmax step in base 2: ``(new max, rescale of the old state, p, new sum)``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


# Integers that change from one decode step to the next must not be specialised
# (Triton would recompile whenever their divisibility by 16 changes).
