"""Codes stored once: the fast scan's blocked nibbles plus a row-major plane of the bits the scan drops.

The C scan (:mod:`turboquant.kernels.cpu_scan`) keeps the top ``scan_bits`` bits of every code in
its blocked layout (64 vectors per block). Where a plan allows it (:func:`split_spec`), the index
keeps only the rest of each code beside it — the *low plane*, ``(n, low_bytes)`` uint8 — and
reassembles full code rows from the two parts for the exact re-score (in C), decoding, saving and
rebuilding. Two plans qualify:

* mode 1, the scan reads the full codes (widths 1, 2, 4 with ``scan_bits`` covering them, e.g.
  2-bit codes with a 2-bit scan): code byte ``m`` is nibbles ``2m`` and ``2m+1``; no low plane.
* modes 2 and 3, one stream of width ``w`` = 4 or 2 scanned at ``w/2`` bits (4-bit codes with the default
  2-bit scan, 2-bit codes with the 1-bit scan): nibble ``m`` holds the top half of each code of
  byte ``m`` and the low plane the bottom halves, two nibbles per byte (low nibble first), so
  code byte ``m = join[nib_m | low_m << 4]``.

Other widths (3 bits, fractional rates) keep the row-major codes beside the scan mirror.

This module also reads the blocked layout in numpy (:func:`unpack_nibbles`), for a file written
on a machine whose scan layout differs from this one's, or where no C compiler is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..codec import code_bytes, layout
from ..config import QuantizerConfig, TurboQuantError
from ..fastscan import _NibblePlan, nibble_plan

if TYPE_CHECKING:
    from .cpu_scan import ScanMirror

BV = 64  # vectors per block (BV of _cpu_scan.c)


@dataclass(frozen=True)
class SplitSpec:
    """How full code rows are rebuilt from the scan's nibbles and the low plane (module docstring)."""

    mode: int  # 1: the nibbles are the codes; 2 (4-bit codes), 3 (2-bit): nibble m + low nibble m -> code byte m
    code_bytes: int
    low_bytes: int  # bytes per vector of the low plane (0 in mode 1)
    low_of: np.ndarray  # (256,) uint8: code byte -> its low nibble (mode 2)
    join: np.ndarray  # (256,) uint8: hi | lo << 4 -> code byte (mode 2; identity table in mode 1)


def split_spec(config: QuantizerConfig, plan: _NibblePlan) -> SplitSpec | None:
    """The split of ``config``'s codes under the scan ``plan``, or None (codes stay row-major beside the scan)."""
    streams = layout(config).streams
    nbytes, M = code_bytes(config), len(plan.coords)
    if plan.identity:
        if M < 2 * nbytes:
            return None
        return SplitSpec(1, nbytes, 0, np.zeros(256, np.uint8), np.arange(256, dtype=np.uint8))
    if len(streams) != 1 or streams[0].width not in (2, 4):
        return None
    w = streams[0].width
    cw, per = w // 2, 8 // w
    if M < nbytes or not np.all(plan.drop == w - cw):
        return None
    # nibble m must hold exactly the codes of byte m, each at shift j * cw
    want = np.arange(M)[:, None] * per + np.arange(per)[None, :]
    want = np.where(want < config.dim, want, -1)
    if plan.coords.shape[1] != per or not np.array_equal(plan.coords, want):
        return None
    if not np.array_equal(plan.shifts[plan.coords >= 0], (np.broadcast_to(np.arange(per) * cw, want.shape))[want >= 0]):
        return None
    b = np.arange(256)
    vals = [(b >> (w * j)) & ((1 << w) - 1) for j in range(per)]
    hi = sum((v >> cw) << (j * cw) for j, v in enumerate(vals))
    lo = sum((v & ((1 << cw) - 1)) << (j * cw) for j, v in enumerate(vals))
    join = np.zeros(256, np.uint8)
    join[hi | (lo << 4)] = b
    return SplitSpec(2 if w == 4 else 3, nbytes, -(-nbytes // 2), lo.astype(np.uint8), join)


def low_plane(codes: np.ndarray, spec: SplitSpec) -> np.ndarray:
    """The low plane ``(r, low_bytes)`` of stored code rows ``(r, code_bytes)`` (modes 2, 3).

    Bit operations on uint8 (``np.take`` of ``spec.low_of`` would widen the indices to int64: 8x the codes).
    """
    if spec.mode == 2:  # low 2 bits of the two 4-bit codes of a byte
        nib = (codes & 3) | ((codes >> 2) & 12)
    else:  # low bit of each of the four 2-bit codes of a byte
        nib = (codes & 1) | ((codes >> 1) & 2) | ((codes >> 2) & 4) | ((codes >> 3) & 8)
    if nib.shape[1] % 2:
        nib = np.concatenate([nib, np.zeros((len(nib), 1), np.uint8)], axis=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


@lru_cache(maxsize=16)
def block_offsets(Mp: int, vnni: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(offset, high)``: byte of a block holding nibble ``m`` of vector ``v``, ``(64, Mp)`` int64, and
    whether it is that byte's high nibble, ``(Mp,)`` bool — the two layouts of ``_cpu_scan.c``."""
    v = np.arange(BV)[:, None]
    m = np.arange(Mp)[None, :]
    if vnni:  # 16-vector sub-blocks of Mp/8 rows; byte 4i + t of a row: nibbles 8r + t (low), 8r + t + 4 (high)
        off = (v // 16) * (Mp // 8) * 64 + (m // 8) * 64 + 4 * (v % 16) + (m % 8) % 4
        high = (np.arange(Mp) % 8) >= 4
    else:  # row p: nibbles 2p (low), 2p + 1 (high) of the 64 vectors at slot_of(v)
        q, h, i = v >> 4, (v >> 3) & 1, v & 7
        slot = 16 * (2 * (q >> 1) + h) + 8 * (q & 1) + i
        off = (m // 2) * BV + slot
        high = (np.arange(Mp) % 2) == 1
    return np.ascontiguousarray(off, dtype=np.int64), high


def unpack_nibbles(blocks: np.ndarray, Mp: int, vnni: bool, first: int, rows: int) -> np.ndarray:
    """Nibbles ``(rows, Mp)`` uint8 (one per byte) of vectors ``first..first+rows`` of a blocked layout."""
    off, high = block_offsets(Mp, vnni)
    g = np.arange(first, first + rows)
    flat = blocks.reshape(-1)
    byte = np.take(flat, (g // BV)[:, None] * (Mp // 2 * BV) + off[g % BV])
    return np.where(high[None, :], byte >> 4, byte & 15).astype(np.uint8)


def join_codes(nib: np.ndarray, low: np.ndarray | None, spec: SplitSpec) -> np.ndarray:
    """Full code rows ``(r, code_bytes)`` from nibbles ``(r, Mp)`` (one per byte) and low-plane rows."""
    cb = spec.code_bytes
    if spec.mode == 1:
        return (nib[:, 0 : 2 * cb : 2] | (nib[:, 1 : 2 * cb : 2] << 4)).astype(np.uint8)
    assert low is not None
    lo = np.empty((len(low), 2 * low.shape[1]), np.uint8)
    lo[:, 0::2], lo[:, 1::2] = low & 15, low >> 4
    return np.take(spec.join, nib[:, :cb] | (lo[:, :cb] << 4))


def split_tensors(mirror: ScanMirror) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The index file's tensors (``scan_blocks``, ``low_bits`` when the scan drops bits) and its
    ``codes_layout`` header field for a mirror holding the codes (:mod:`turboquant.index_file`)."""
    from .cpu_scan import scan_layout

    blocks, low = mirror.parts()
    tensors = {"scan_blocks": torch.from_numpy(blocks)}
    if low.shape[1]:
        tensors["low_bits"] = torch.from_numpy(low)
    vnni, mpad = scan_layout(mirror.lib)
    return tensors, {"bits": mirror.width, "vnni": vnni, "mpad": mpad}


def load_split(
    path: Any, config: QuantizerConfig, l2: bool, scan: dict[str, Any], tensors: dict[str, torch.Tensor], count: int,
    lib: Any, mapped: bool = False,
) -> tuple[ScanMirror | None, torch.Tensor | None]:  # fmt: skip
    """An index file's split storage -> ``(mirror, None)`` over the tensors themselves (no copy; ``mapped``:
    they are read-only memory maps) when ``lib`` (the scan library, or None) has the file's layout
    ``scan`` (``bits``, ``vnni``, ``mpad``); else ``(None, rows)``, the full code rows ``(count,
    code_bytes)`` rebuilt in numpy (a converted load: one copy of the codes in RAM). ``scan`` and the
    shapes were checked by :func:`turboquant.index_file.read_index_file`.
    """
    from .cpu_scan import ScanMirror, scan_layout

    blocks = tensors["scan_blocks"].numpy()
    low = tensors["low_bits"].numpy() if "low_bits" in tensors else None
    plan = nibble_plan(config, int(scan["bits"]))
    spec = None if plan is None else split_spec(config, plan)
    if plan is None or spec is None or bool(spec.low_bytes) != (low is not None):
        raise TurboQuantError(f"{path}: codes of {config.bits} bits have no split storage for a {scan['bits']}-bit scan")
    if lib is not None and scan_layout(lib) == (bool(scan["vnni"]), int(scan["mpad"])):
        mirror = ScanMirror.from_parts(config, plan, l2, lib, blocks, np.zeros((0, 0), np.uint8) if low is None else low,
                                       count, mapped)  # fmt: skip
        mirror.width = int(scan["bits"])
        return mirror, None
    Mp = blocks.shape[1] * 2 // BV
    rows = np.empty((count, spec.code_bytes), np.uint8)
    for s0 in range(0, count, 1 << 16):
        s1 = min(count, s0 + (1 << 16))
        nib = unpack_nibbles(blocks, Mp, bool(scan["vnni"]), s0, s1 - s0)
        rows[s0:s1] = join_codes(nib, None if low is None else low[s0:s1], spec)
    return None, torch.from_numpy(rows)


__all__ = ["SplitSpec", "block_offsets", "join_codes", "load_split", "low_plane", "split_spec", "split_tensors", "unpack_nibbles"]
