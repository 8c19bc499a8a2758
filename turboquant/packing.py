"""True bit packing of b-bit codes, b = 1..8.

Layout (the contract shared with the Triton kernels, see docs/DESIGN.md): the
codes of one vector form an LSB-first bit stream. Code ``j`` of width ``w``
occupies stream bits ``[j·w, (j+1)·w)``, and stream bit ``k`` is bit ``k % 8``
of byte ``k // 8``. ``n`` codes take exactly ``ceil(n·w/8)`` bytes; pad bits are 0.

Widths 1, 2, 4 and 8 pack whole codes into a byte with shifts on uint8. Other
widths work on groups of 8 codes, which span exactly ``w`` bytes: the group is
assembled into one 64-bit word and split into bytes.
"""

from __future__ import annotations

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
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(*lead, (n + pad) // 8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * width
    # disjoint bit ranges, so the sum is a bitwise OR (wrap-around keeps the bits)
    word = (c << shifts).sum(dim=-1, keepdim=True)
    byte_shifts = torch.arange(width, device=codes.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8)
    return out.reshape(*lead, out.shape[-2] * width)[..., :out_bytes]


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
    b = packed.to(torch.int64)
    pad = groups * width - expected
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.view(*lead, groups, width)
    byte_shifts = torch.arange(width, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * width
    codes = ((word >> shifts) & mask).to(torch.uint8)
    return codes.reshape(*lead, groups * 8)[..., :n]
