"""True bit packing of b-bit codes, b = 1..8.

Layout (the contract shared with the Triton kernels, see docs/DESIGN.md): the
codes of one vector form an LSB-first bit stream. Code ``j`` of width ``w``
occupies stream bits ``[j·w, (j+1)·w)``, and stream bit ``k`` is bit ``k % 8``
of byte ``k // 8``. ``n`` codes take exactly ``ceil(n·w/8)`` bytes; pad bits are 0.

Widths 1, 2, 4 and 8 pack whole codes into a byte with shifts on uint8. Other
widths work on groups of 8 codes, which span exactly ``w`` bytes: the group's 8
code bytes are read as one int64 and their bits squeezed together with masks and
shifts in three steps (and spread back out the same way when unpacking).
"""

from __future__ import annotations

import sys

import torch

from .config import MAX_BITS, MIN_BITS, TurboQuantError


def packed_size(n: int, width: int) -> int:
    """Bytes needed for ``n`` codes of ``width`` bits: ``ceil(n·width/8)``."""
    return (n * width + 7) // 8


def _check_width(width: int) -> None:
    if not (MIN_BITS <= width <= MAX_BITS):
        raise TurboQuantError(f"bit width {width} is not supported; widths are {MIN_BITS}..{MAX_BITS}")


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack integer codes into an LSB-first bit stream along the last dim.

    Args:
        codes: ``(..., n)`` integer tensor with values in ``[0, 2**width)``.
        width: bits per code, 1..8.

    Returns:
        ``(..., ceil(n·width/8))`` uint8.

    Example:
        >>> pack_codes(torch.tensor([1, 2, 3]), 2)
        tensor([57], dtype=torch.uint8)
    """
    _check_width(width)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    out_bytes = packed_size(n, width)
    if width == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // width
    if 8 % width == 0:
        c = codes.to(torch.uint8)
        pad = (-n) % per_byte
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.view(*lead, (n + pad) // per_byte, per_byte)
        out = c[..., 0].clone()
        for j in range(1, per_byte):
            out |= c[..., j] << (j * width)
        return out
    pad = (-n) % 8
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    groups = (n + pad) // 8
    c = c.contiguous()
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        return _pack_groups_bytewise(c.view(*lead, groups, 8), width)[..., :out_bytes]
    if c.storage_offset() % 8:  # the int64 view needs 8-byte alignment
        c = c.clone()
    # A group of 8 codes is one little-endian int64 with code j in byte j. Squeeze the bytes
    # together in three steps (byte pairs, then 16-bit and 32-bit halves); the low 8·width bits
    # of the word are then the group's bit stream. The top bit of every lane stays 0 (codes
    # have < 8 bits), so arithmetic shifts act like logical ones.
    word = c.view(*lead, groups * 8).view(torch.int64)
    for lane in (8, 16, 32):
        filled = width * lane // 8  # payload bits per lane after the previous step
        low, high = _LANE_MASKS[lane]
        word = (word & low) | ((word & high) >> (lane - filled))
    out = word.view(torch.uint8).view(*lead, groups, 8)[..., :width]
    return out.reshape(*lead, groups * width)[..., :out_bytes]


# (low half, high half) masks of the 2·lane-bit units, as signed int64
_LANE_MASKS = {
    8: (0x00FF00FF00FF00FF, -0x00FF00FF00FF0100),  # 0xFF00FF00FF00FF00
    16: (0x0000FFFF0000FFFF, -0x0000FFFF00010000),  # 0xFFFF0000FFFF0000
    32: (0x00000000FFFFFFFF, -0x0000000100000000),  # 0xFFFFFFFF00000000
}


def _pack_groups_bytewise(c: torch.Tensor, width: int) -> torch.Tensor:  # pragma: no cover - big-endian hosts
    out = torch.empty(*c.shape[:-1], width, dtype=torch.uint8, device=c.device)
    for k in range(width):
        acc = out[..., k]
        acc.zero_()
        for j in range(8):
            lo = j * width
            if lo < 8 * k + 8 and lo + width > 8 * k:
                shift = lo - 8 * k
                acc |= c[..., j] << shift if shift >= 0 else c[..., j] >> -shift
    return out.reshape(*c.shape[:-2], -1)


def pack_rows(codes: torch.Tensor, width: int) -> torch.Tensor:
    """:func:`pack_codes` along dim 0: the same bytes, transposed.

    ``pack_rows(c, w) == pack_codes(c.movedim(0, -1), w).movedim(-1, 0)``. For codes held
    coordinate-major (``(n, m)``, one row per coordinate, as the CPU encode produces them), every
    step is a shift/OR of whole contiguous rows.

    Args:
        codes: ``(n, ...)`` integer codes in ``[0, 2**width)``.
        width: bits per code, 1..8.

    Returns:
        ``(ceil(n·width/8), ...)`` uint8.
    """
    _check_width(width)
    n = codes.shape[0]
    rest = codes.shape[1:]
    c = codes.to(torch.uint8)
    if width == 8:
        return c
    per_byte = 8 // width
    group = per_byte if 8 % width == 0 else 8  # codes per whole number of bytes
    pad = (-n) % group
    if pad:
        c = torch.cat((c, c.new_zeros(pad, *rest)))
    groups = (n + pad) // group
    c = c.contiguous().view(groups, group, *rest)
    if 8 % width == 0:
        out = c[:, 0].clone()
        for j in range(1, per_byte):
            out |= c[:, j] << (j * width)
        return out
    out = torch.empty(groups, width, *rest, dtype=torch.uint8, device=codes.device)
    for k in range(width):
        acc = out[:, k]
        first = True
        for j in range(8):
            lo = j * width
            if lo < 8 * k + 8 and lo + width > 8 * k:
                shift = lo - 8 * k
                part = c[:, j] << shift if shift >= 0 else c[:, j] >> -shift
                if first:
                    acc.copy_(part)
                    first = False
                else:
                    acc |= part
    return out.view(groups * width, *rest)[: packed_size(n, width)]


def unpack_codes(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: ``(..., ceil(n·width/8))`` uint8.
        width: bits per code, 1..8.
        n: number of codes per vector.

    Returns:
        ``(..., n)`` uint8 codes.
    """
    _check_width(width)
    if packed.dtype != torch.uint8:
        raise TurboQuantError(f"packed codes must be uint8, got {packed.dtype}")
    expected = packed_size(n, width)
    if packed.shape[-1] != expected:
        raise TurboQuantError(f"packed codes have {packed.shape[-1]} bytes per vector, expected {expected} for {n} codes of {width} bits")
    lead = packed.shape[:-1]
    if width == 8:
        return packed.clone()
    mask = (1 << width) - 1
    if 8 % width == 0:
        per_byte = 8 // width
        parts = [(packed >> (j * width)) & mask for j in range(per_byte)]
        return torch.stack(parts, dim=-1).reshape(*lead, expected * per_byte)[..., :n]
    groups = (n + 7) // 8
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        return _unpack_groups_bytewise(packed, width, n, groups, expected)
    # inverse of pack_codes: put each group's ``width`` bytes in the low bytes of an int64,
    # then spread the bit stream back out to one code per byte (32-, 16-, then 8-bit lanes)
    buf = torch.zeros(*lead, groups, 8, dtype=torch.uint8, device=packed.device)
    full = expected // width  # groups whose bytes are all present
    if full:
        buf[..., :full, :width] = packed[..., : full * width].reshape(*lead, full, width)
    if full < groups:
        buf[..., full, : expected - full * width] = packed[..., full * width :]
    word = buf.view(*lead, groups * 8).view(torch.int64)
    for lane in (32, 16, 8):
        filled = width * lane // 8
        low = _LANE_MASKS[lane][0] & _repeat_mask(filled, 2 * lane)
        word = (word & low) | ((word << (lane - filled)) & (low << lane))
    return word.view(torch.uint8).view(*lead, groups * 8)[..., :n]


def _repeat_mask(bits: int, period: int) -> int:
    """``(1 << bits) − 1`` repeated every ``period`` bits over 64 bits, as a signed int64."""
    mask = 0
    for start in range(0, 64, period):
        mask |= ((1 << bits) - 1) << start
    return mask - (1 << 64) if mask >= 1 << 63 else mask


def _unpack_groups_bytewise(packed: torch.Tensor, width: int, n: int, groups: int, expected: int) -> torch.Tensor:  # pragma: no cover
    lead = packed.shape[:-1]
    b = torch.nn.functional.pad(packed, (0, groups * width - expected)).contiguous().view(*lead, groups, width)
    codes = torch.empty(*lead, groups, 8, dtype=torch.uint8, device=packed.device)
    for j in range(8):
        k, s = divmod(j * width, 8)
        part = codes[..., j]
        torch.bitwise_right_shift(b[..., k], s, out=part)
        if s + width > 8:
            part |= b[..., k + 1] << (8 - s)
        part &= (1 << width) - 1
    return codes.reshape(*lead, groups * 8)[..., :n]
