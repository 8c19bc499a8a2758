"""PTX of the register code decoders: one 32-bit word of packed codes to fp16 centroids with ``prmt``.

Pure string builders (no Triton import). The centroids' fp16 bytes are baked into the PTX as
immediates, so a decoder needs no memory access; tests/test_kernels.py interprets each PTX on the
CPU and checks it bit-exactly against the fp16 centroid table.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from ..codebook import lloyd_max_codebook

REG_WIDTHS = (2, 3, 4)
"""Widths with a byte-permute register decoder."""


def reg_asm(dim: int, width: int) -> str:
    """PTX of the register decoder for ``width`` (``""`` under the interpreter, which emulates it)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ""
    return {4: prmt4_asm, 2: prmt2_asm, 3: prmt3_asm}[width](dim)


def _fp16_bytes(dim: int, width: int) -> tuple[list[int], list[int]]:
    """Low and high bytes of the fp16 centroids of the ``(dim, width)`` codebook."""
    c = np.asarray(lloyd_max_codebook(dim, width).centroids, dtype=np.float16).view(np.uint16).astype(np.uint32)
    return [int(v) & 0xFF for v in c], [int(v) >> 8 for v in c]


def _pack_bytes(bs: list[int]) -> str:
    return hex(sum(b << (8 * i) for i, b in enumerate(bs)))


@lru_cache(maxsize=16)
def prmt2_asm(dim: int) -> str:
    """PTX decoding one 32-bit word of sixteen 2-bit codes into sixteen fp16 centroids (23 instructions).

    ``v_j = (w >> 2j) & 0x03030303`` puts codes ``j, 4+j, 8+j, 12+j`` in its four bytes; one multiply-add
    turns each byte ``c`` into the ``prmt`` selector nibbles ``(c, c + 4)``, which pick the low byte of
    centroid ``c`` from one table register and its high byte from the other: one ``prmt`` yields two
    finished fp16 values.
    """
    lo, hi = _fp16_bytes(dim, 2)
    lines = [".reg .b32 tl, th, t, v, s, o;", f"mov.b32 tl, {_pack_bytes(lo)};", f"mov.b32 th, {_pack_bytes(hi)};"]
    for j in range(4):
        if j == 0:
            lines.append("and.b32 v, $16, 0x03030303;")
        else:
            lines += [f"shr.u32 t, $16, {2 * j};", "and.b32 v, t, 0x03030303;"]
        lines += [
            "mad.lo.u32 s, v, 0x11, 0x40404040;",
            "prmt.b32 o, tl, th, s;",
            f"mov.b32 {{${j}, ${4 + j}}}, o;",
            "shr.u32 t, s, 16;",
            "prmt.b32 o, tl, th, t;",
            f"mov.b32 {{${8 + j}, ${12 + j}}}, o;",
        ]
    return "{\n" + "\n".join(lines) + "\n}"


@lru_cache(maxsize=16)
def prmt3_asm(dim: int) -> str:
    """PTX decoding one 3-byte group of eight 3-bit codes into eight fp16 centroids (~20 instructions).

    Inputs: the aligned word holding the group's first byte, the next word and the group's bit offset
    in the first (0, 8, 16 or 24); a funnel shift aligns the group. Three shift/mask/or steps spread
    the eight codes to one per nibble; the nibbles index the 8-entry low-byte and high-byte tables
    with ``prmt`` and two more ``prmt`` per four codes interleave the bytes into fp16 pairs.
    """
    lo, hi = _fp16_bytes(dim, 3)
    lines = [
        ".reg .b32 l0, l1, h0, h1, x, y, z, u, t, a, b, o;",
        f"mov.b32 l0, {_pack_bytes(lo[:4])};",
        f"mov.b32 l1, {_pack_bytes(lo[4:])};",
        f"mov.b32 h0, {_pack_bytes(hi[:4])};",
        f"mov.b32 h1, {_pack_bytes(hi[4:])};",
        "shf.r.wrap.b32 x, $8, $9, $10;",
        "shl.b32 t, x, 4;",
        "and.b32 t, t, 0x0FFF0000;",
        "and.b32 y, x, 0x00000FFF;",
        "or.b32 y, y, t;",
        "shl.b32 t, y, 2;",
        "and.b32 t, t, 0x3F003F00;",
        "and.b32 z, y, 0x003F003F;",
        "or.b32 z, z, t;",
        "shl.b32 t, z, 1;",
        "and.b32 t, t, 0x70707070;",
        "and.b32 u, z, 0x07070707;",
        "or.b32 u, u, t;",
    ]
    for half in range(2):
        k = 4 * half
        if half:
            lines.append("shr.u32 u, u, 16;")
        lines += [
            "prmt.b32 a, l0, l1, u;",
            "prmt.b32 b, h0, h1, u;",
            "prmt.b32 o, a, b, 0x5140;",
            f"mov.b32 {{${k}, ${k + 1}}}, o;",
            "prmt.b32 o, a, b, 0x7362;",
            f"mov.b32 {{${k + 2}, ${k + 3}}}, o;",
        ]
    return "{\n" + "\n".join(lines) + "\n}"


@lru_cache(maxsize=16)
def prmt4_asm(dim: int) -> str:
    """PTX decoding one 32-bit word of eight 4-bit codes into eight fp16 centroids.

    The codebook is odd-symmetric (``c[15 − i] = −c[i]``, exact in fp16), so a
    magnitude index ``r`` (``c − 8`` or ``7 − c``) picks the low and high bytes of
    ``|c|`` from two 8-byte tables with ``prmt``; the sign bit is OR-ed into the
    high byte from a per-byte mask that ``prmt``'s sign-replicate mode builds from
    bit 3 of each code. About 18 instructions per 8 codes; tests/test_kernels.py
    interprets this PTX on the CPU and checks it bit-exactly against the fp16 table.
    """
    c = np.asarray(lloyd_max_codebook(dim, 4).centroids, dtype=np.float16)
    assert all(c[15 - i] == -c[i] for i in range(16))
    mag = c[8:].view(np.uint16).astype(np.uint32)
    lo = [int(v) & 0xFF for v in mag]
    hi = [int(v) >> 8 for v in mag]

    def pack(bs: list[int]) -> str:
        return hex(sum(b << (8 * i) for i, b in enumerate(bs)))

    return f"""{{
.reg .b32 t, n7, r, rh, y, p0, p1, l0, l1, h0, h1, lo, hi, lo2, hi2, o0, o1, o2, o3;
mov.b32 l0, {pack(lo[:4])};
mov.b32 l1, {pack(lo[4:])};
mov.b32 h0, {pack(hi[:4])};
mov.b32 h1, {pack(hi[4:])};
not.b32 t, $8;
shr.u32 t, t, 3;
and.b32 t, t, 0x11111111;
mul.lo.u32 n7, t, 7;
xor.b32 r, $8, n7;
and.b32 r, r, 0x77777777;
shr.u32 rh, r, 16;
shl.b32 y, $8, 4;
prmt.b32 p0, y, $8, 0xD9C8;
prmt.b32 p1, y, $8, 0xFBEA;
prmt.b32 lo, l0, l1, r;
prmt.b32 hi, h0, h1, r;
not.b32 p0, p0;
and.b32 p0, p0, 0x80808080;
or.b32 hi, hi, p0;
prmt.b32 o0, lo, hi, 0x5140;
prmt.b32 o1, lo, hi, 0x7362;
prmt.b32 lo2, l0, l1, rh;
prmt.b32 hi2, h0, h1, rh;
not.b32 p1, p1;
and.b32 p1, p1, 0x80808080;
or.b32 hi2, hi2, p1;
prmt.b32 o2, lo2, hi2, 0x5140;
prmt.b32 o3, lo2, hi2, 0x7362;
mov.b32 {{$0, $1}}, o0;
mov.b32 {{$2, $3}}, o1;
mov.b32 {{$4, $5}}, o2;
mov.b32 {{$6, $7}}, o3;
}}"""


__all__ = ["REG_WIDTHS", "prmt2_asm", "prmt3_asm", "prmt4_asm", "reg_asm"]
