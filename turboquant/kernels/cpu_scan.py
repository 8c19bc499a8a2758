"""The index's fast scan in C: 8-bit lookup tables over 4-bit nibbles, the per-vector norm applied in the scan.

:class:`ScanMirror` holds the nibbles of :func:`turboquant.fastscan.nibble_plan` (the top
``scan_bits`` bits of every stored code, or the codes themselves) in blocks of 64 vectors with
the nibbles of one position adjacent (``_cpu_scan.c`` documents the layout), plus one float
``alpha_i`` (and ``beta_i`` for L2) per vector. A query's tables
``LUT[m][v] = Σ_s (Πq)[coords[m,s]]·centroids[m,v,s]`` are quantized to uint8 with one scale per
query; one byte shuffle then looks up 32-128 entries, and the score
``alpha_i·(Σ_m LUT[m][nibble_im]) + beta_i`` is formed inside the scan, so vectors of any norm
are ranked in one pass per query (no norm groups, one table build per query). The result is a
shortlist that the index re-scores exactly from the stored codes.

Threads (the library's policy, :mod:`turboquant.threads`): a batch is split into chunks of
queries over ``threads`` workers (``ctypes`` releases the GIL), each chunk scanning the vectors
block range by block range so that a range stays in cache for all its queries; a single query
(fewer queries than threads) splits the vectors into ``threads`` ranges whose shortlists merge
(ties go to the smaller position, so any split gives the same result).

Built at first use with the system C compiler (:mod:`turboquant.kernels.cbuild`; AVX-512BW,
AVX2 or portable scalar code, whatever ``-march=native`` offers). Without a compiler
(or with ``TURBOQUANT_NO_CEXT=1``) :func:`load_scan_library` returns None and the index falls
back to the FAISS mirror (:mod:`turboquant.fastscan`).
"""

from __future__ import annotations

import array
import ctypes
import functools
import math
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..codec import decode_mse_numpy, layout, reconstruction_norms
from ..config import QuantizerConfig, TurboQuantError
from ..fastscan import _NibblePlan, nibble_plan, nibble_source, thread_pool
from .cbuild import build_error, load_c_library
from .scan_split import SplitSpec, split_spec

_SOURCE = Path(__file__).with_name("_cpu_scan.c")
_FLAGS = ("-ffp-contract=off",)  # plain IEEE float ops: SIMD, scalar and numpy give identical scores
#: builds of the kernel: what ``-march=native`` offers, and (for tests) AVX2 only or no intrinsics
_VARIANTS = {"native": _FLAGS, "avx512bw": (*_FLAGS, "-DTQ_NO_VNNI"), "avx2": (*_FLAGS, "-mno-avx512f"),
             "scalar": (*_FLAGS, "-DTQ_SCALAR")}
_CTX_FIELDS = 18  # the C_* enums of _cpu_scan.c and _cpu_scan_split.h
_BV = 64  # vectors per block (BV of _cpu_scan.c)
# A single query's scan splits over threads only above this many scanned bytes: on the shared
# 2-core test machine a 5-20 MB scan split over 2 threads was 10-35% slower than on one
# (benchmarks/ann.py grid, d = 384..1024), the second core being busy with other work.
_SPLIT_BYTES = 1 << 25
_LUT_BYTES = 1 << 18  # tables of one query chunk: with the scanned block range they stay in L2
_PACK_ROWS = 1 << 16  # rows per thread at least when the mirror packs in parallel
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _declare(lib: ctypes.CDLL) -> None:
    lib.tq_scan_isa.argtypes, lib.tq_scan_isa.restype = [], ctypes.c_int
    lib.tq_scan_mpad.argtypes, lib.tq_scan_mpad.restype = [], ctypes.c_int
    lib.tq_scan_pack.argtypes, lib.tq_scan_pack.restype = [_P, _I, _I, _I, _I, _I, _P, _P], None
    lib.tq_scan_luts.argtypes = [_P, _I, _I, _P, _P, _I, _I, _I, _P, _P, _P]
    lib.tq_scan_luts.restype = ctypes.c_int
    lib.tq_scan_sums.argtypes, lib.tq_scan_sums.restype = [_P, _I, _I, _P, _I, _P], None
    lib.tq_scan_search.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _P, _P, _I]
    lib.tq_scan_search.restype = ctypes.c_int
    lib.tq_rescore.argtypes = [_P, _I, _P, _P, _I, _I, _P, _I, _I, _P, _I, _P, _P, _P]
    lib.tq_rescore.restype = ctypes.c_int
    lib.tq_scan_topl.argtypes = [_P, _P, _I, _I, _I, _I, _P, _I, _P, _P, _P, _I]
    lib.tq_scan_topl.restype = ctypes.c_int
    lib.tq_rotate.argtypes, lib.tq_rotate.restype = [_P, _I, _I, _P, _P], None
    lib.tq_scan_codes.argtypes = [_P, _I, _I, _P, _P, _I, _I, _P, _I, _I, _P]
    lib.tq_scan_codes.restype = ctypes.c_int
    lib.tq_rescore_split.argtypes, lib.tq_rescore_split.restype = [_P, _P, _I, _I, _P, _I, _P], ctypes.c_int
    lib.tq_scan_low.argtypes, lib.tq_scan_low.restype = [_P, _I, _I, _I, _P, _I], None


_WeakArray = Callable[[], "np.ndarray | None"]

#: pass as ``codes`` to :class:`ScanMirror`'s searches: re-score from the mirror's own split storage
OWN_CODES = np.zeros((0, 0), np.uint8)


def scan_layout(lib: ctypes.CDLL) -> tuple[bool, int]:
    """``(vnni, mpad)`` of a scan library's blocked layout (``_cpu_scan.c``): the 16-vector VNNI
    sub-blocks or the 64-vector rows, and the multiple the positions are padded to."""
    return int(lib.tq_scan_isa()) == 513, int(lib.tq_scan_mpad())


def _weak(a: np.ndarray | None) -> _WeakArray:
    """A weak reference to ``a`` (or a callable returning None for None)."""
    return (lambda: None) if a is None else weakref.ref(a)


def _check(rc: int) -> None:
    """Raise for a non-zero return code of the scan library (3: a query not finite; else out of memory)."""
    if rc == 3:
        raise TurboQuantError("queries contain NaN or Inf (or values whose norm overflows float32)")
    if rc:
        raise MemoryError("turboquant fast scan: out of memory")


def load_scan_library(variant: str = "native") -> ctypes.CDLL | None:
    """The compiled scan kernel, or None (no compiler, ``TURBOQUANT_NO_CEXT=1``).

    ``variant``: ``"native"`` (the index's), ``"avx512bw"`` (AVX-512 without the VBMI/VNNI
    layout), ``"avx2"`` (AVX-512 disabled) or ``"scalar"`` (the portable path without
    intrinsics); tests check that all give identical results.
    """
    return load_c_library(_SOURCE, _declare, _VARIANTS[variant], what="C fast-scan kernel")


def scan_library_error(variant: str = "native") -> str | None:
    """Why :func:`load_scan_library` returned None (None when loaded or not tried yet)."""
    return build_error(_SOURCE, _VARIANTS[variant])


@functools.lru_cache(maxsize=1024)  # pure, and on every single-query search
def default_shortlist(k: int, exact_scan: bool, n: int, dim: int, l2: bool = False, scan_width: int = 2) -> int:
    """Candidates the scan passes to the exact re-score for a top-``k`` over ``n`` vectors of ``dim``.

    Full codes in the scan (2-bit codes, ``scan_bits=4``): only the uint8 rounding of the tables
    separates scan and exact scores; 12 candidates held the exact top-10 (agreement ≥ 0.991) on
    Brown/MiniLM (d=384) and synthetic sets at d=96..1536, and ``k + max(8, k/2)`` is kept.
    A coarse 2-bit scan of 3/4-bit codes errs more at small ``d`` (fewer coordinates average out
    the dropped bits): agreement ≥ 0.995 took 64 candidates at d=96, 30 at d=256, 40 on Brown,
    20-30 on synthetic d=384 and 15 at d=1536, hence ``k + 3k·sqrt(384/d) + 8``. More vectors
    crowd the coarse scores near the top, so the shortlist grows with ``sqrt(n)`` past 65,536 from
    at least ``4k + 24`` (at 1M, d=384, 4 bits: 64 candidates gave R10@10 0.864, 188 gave 0.888 and
    256 gave 0.907 of the exact 0.909; FAISS RaBitQ 0.889). L2
    doubles it: its key ``2‖x‖<q, ŷ> − ‖x‖²`` carries twice the scan error of the inner product
    while its top differences are not larger (docs/index_notes.md).

    ``scan_width=1``: a 1-bit (sign) scan of 2-bit codes errs about 3x more; agreement ≥ 0.997
    took 192 candidates at d=96, 128 at d=128 and on Brown (d=384), 48 at d=256 and 32 at
    d ≥ 768 (synthetic sets), hence ``k + 11k·sqrt(384/d) + 8``.
    """
    spread = 11 if scan_width == 1 else 3
    base = k + max(8, k // 2) if exact_scan else k + spread * k * math.sqrt(384 / max(dim, 1)) + 8
    crowd = max(1.0, math.sqrt(n / 65536))
    if crowd > 1 and not exact_scan:  # the growth was calibrated from 4k + 24 (R10@10 0.907 at 1M, above RaBitQ's 0.889)
        base = max(base, 4 * k + 24)
    return int(base * crowd * (2 if l2 else 1))


# Cost model of auto_scan_bits, measured on the 2-core test machine (AVX-512 VNNI build, 50k
# vectors): a batch scan costs ~22 ps per scanned byte and query, each extra shortlisted
# candidate ~0.2 µs (selection + exact re-score); docs/index_notes.md.
_BYTES_PER_CANDIDATE = 9000


def auto_scan_bits(config: QuantizerConfig, n: int) -> int:
    """Scan width for ``scan_bits=None``: 1 for 2-bit codes when it pays, else 2.

    A 1-bit scan of 2-bit codes reads half the bytes of the full 2-bit scan but needs a longer
    shortlist (:func:`default_shortlist`, ``scan_width=1``); it is chosen when the scan bytes it
    saves over ``n`` vectors outweigh the extra candidates (k = 10): at 50k vectors from d ≈ 200.
    Wider codes keep the 2-bit coarse scan, narrower ones are scanned whole either way.
    """
    if max(s.width for s in layout(config).streams) != 2:
        return 2
    extra = default_shortlist(10, False, n, config.dim, scan_width=1) - default_shortlist(10, True, n, config.dim)
    return 1 if n * config.dim / 8 > extra * _BYTES_PER_CANDIDATE else 2


def scan_width(config: QuantizerConfig, scan_bits: int | None, n: int) -> int:
    """Bits per coordinate the fast scan reads: ``scan_bits`` (``None``: :func:`auto_scan_bits` for ``n`` vectors)."""
    return auto_scan_bits(config, n) if scan_bits is None else scan_bits


def scan_plan(config: QuantizerConfig, scan_bits: int | None, n: int) -> _NibblePlan | None:
    """The nibble plan of the fast scan: ``scan_bits`` (``None``: :func:`auto_scan_bits` for ``n`` vectors)."""
    return nibble_plan(config, scan_width(config, scan_bits, n))


def top_k(keys: np.ndarray, cand: np.ndarray, k: int, negate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest ``keys`` ``(nq, L)`` per row in order (negated for L2 distances) and their ``cand``."""
    if len(keys) == 1:  # a single query: 1-D sorts skip the row bookkeeping (µs per query)
        order = np.argsort(-keys[0], kind="stable")[:k]
        top = keys[0, order][None]
        return (-top if negate else top), cand[0, order][None]
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(keys))[:, None]
    top = keys[rows, order]
    return (-top if negate else top), cand[rows, order]


def _ptr(a: np.ndarray | None) -> int | None:
    """Address of a contiguous array's data (``ndarray.ctypes`` costs ~2 µs a call, this ~0.4 µs)."""
    if a is None:
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError, BufferError):  # read-only or empty
        return a.ctypes.data


class ScanMirror:
    """Blocked nibble codes of every stored vector plus their scan factors; grows with :meth:`append`.

    Args:
        config: the stored codes' quantizer.
        plan: which coordinates each nibble holds (:func:`turboquant.fastscan.nibble_plan`).
        l2: keep ``beta_i`` (the L2 offset ``−‖x_i‖²``).
        lib: the library from :func:`load_scan_library`.
    """

    def __init__(self, config: QuantizerConfig, plan: _NibblePlan, l2: bool, lib: ctypes.CDLL) -> None:
        self.config, self.plan, self.l2, self.lib = config, plan, l2, lib
        self.M = len(plan.coords)
        pad = int(lib.tq_scan_mpad())  # whole bytes (2), or whole rows of the VNNI layout (8)
        self.Mp = -(-self.M // pad) * pad  # positions, padded
        self.coords = np.ascontiguousarray(plan.coords, dtype=np.int32)
        self.centroids = np.ascontiguousarray(plan.centroids.transpose(0, 2, 1), dtype=np.float32)  # (M, dsub, 16) for C
        self.count = 0
        self.blocks = np.zeros((0, self.Mp * _BV // 2), np.uint8)
        self.alpha = np.zeros(0, np.float32)
        self.beta: np.ndarray | None = np.zeros(0, np.float32) if l2 else None
        self._mapped = False  # blocks and low plane are read-only memory maps
        self.width = 0  # scan bits of the plan, where the index records it (saved with the split storage)
        self.nfac = 0  # vectors whose factors are set (a loaded mirror computes them at first search)
        # the split storage: the bits the scan drops, row-major (scan_split), so the codes live here once
        self.spec: SplitSpec | None = split_spec(config, plan)
        self.low = np.zeros((0, self.spec.low_bytes if self.spec else 0), np.uint8)
        # exact re-scoring in C reads the stored code bytes as nibbles: possible when they are
        # exactly the nibbles of the full-precision plan (widths 1, 2, 4)
        full = nibble_plan(config, 4)
        self.exact_plan = full if full is not None and full.identity else None
        if self.exact_plan is not None:
            self.exact_coords = np.ascontiguousarray(self.exact_plan.coords, dtype=np.int32)
            self.exact_centroids = np.ascontiguousarray(self.exact_plan.centroids.transpose(0, 2, 1), dtype=np.float32)
        self._ctx: array.array | None = None  # pointers for tq_scan_topl, rebuilt when arrays move
        # the stored codes and Π.T last scanned (weakly) with their addresses: taken once, not per query
        self._held: tuple[_WeakArray, _WeakArray, int | None, int | None] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held (capacity included)."""
        return self.blocks.nbytes + self.low.nbytes + self.alpha.nbytes + (self.beta.nbytes if self.beta is not None else 0)

    @classmethod
    def from_parts(
        cls, config: QuantizerConfig, plan: _NibblePlan, l2: bool, lib: ctypes.CDLL, blocks: np.ndarray, low: np.ndarray,
        count: int, mapped: bool = False,
    ) -> ScanMirror:
        """A mirror over saved split storage (``blocks`` in this library's layout, ``low``; ``mapped``: read-only
        memory maps, copied before the first change); its factors are computed by :meth:`fill_factors`."""
        mirror = cls(config, plan, l2, lib)
        assert mirror.spec is not None and blocks.shape[1] == mirror.Mp * _BV // 2
        mirror.blocks, mirror.count, mirror._mapped = blocks, count, mapped
        if mirror.spec.low_bytes:
            mirror.low = low
        mirror._grow(count, copy=False)
        return mirror

    def parts(self) -> tuple[np.ndarray, np.ndarray]:
        """The split storage to save: blocks ``(ceil(count/64), Mp*32)`` and low plane ``(count, low_bytes)``."""
        return self.blocks[: -(-self.count // _BV)], self.low[: self.count]

    def codes(self, first: int = 0, stop: int | None = None, pos: np.ndarray | None = None) -> np.ndarray:
        """Full code rows ``(r, code_bytes)`` of positions ``first..stop`` (or ``pos``), rebuilt from the split storage."""
        assert self.spec is not None
        stop = self.count if stop is None else stop
        idx = None if pos is None else np.ascontiguousarray(pos, dtype=np.int64)
        rows = len(idx) if idx is not None else stop - first
        out = np.empty((rows, self.spec.code_bytes), np.uint8)
        if rows:
            _check(self.lib.tq_scan_codes(_ptr(self.blocks), self.Mp, self.spec.mode, _ptr(self.spec.join),
                                          _ptr(self.low) if self.spec.low_bytes else None, self.spec.low_bytes,
                                          self.spec.code_bytes, _ptr(idx), first, rows, _ptr(out)))  # fmt: skip
        return out

    def _context(self) -> int:
        if self._ctx is None:
            m, dsub = self.coords.shape
            xm, xdsub = self.exact_coords.shape if self.exact_plan is not None else (0, 0)
            ctx = [_ptr(self.blocks), self.Mp, m, dsub, _ptr(self.coords), _ptr(self.centroids), _ptr(self.alpha),
                   _ptr(self.beta) or 0, self.config.dim, xm, xdsub,
                   _ptr(self.exact_coords) if xm else 0, _ptr(self.exact_centroids) if xm else 0,
                   self.spec.mode if self.spec else 0, _ptr(self.spec.join) if self.spec else 0,
                   (_ptr(self.low) or 0) if self.spec and self.spec.low_bytes else 0,
                   self.spec.low_bytes if self.spec else 0, self.spec.code_bytes if self.spec else 0]  # fmt: skip
            assert len(ctx) == _CTX_FIELDS
            self._ctx = array.array("q", ctx)
        return self._ctx.buffer_info()[0]

    def _grow(self, n: int, copy: bool = True) -> None:
        """Capacity for ``n`` vectors (``copy``: also copy read-only, e.g. memory-mapped, parts into RAM)."""
        self._ctx = None
        blocks, mapped = -(-n // _BV), copy and self._mapped
        if blocks > len(self.blocks) or mapped:
            cap = max(blocks, len(self.blocks) + len(self.blocks) // 4) if len(self.blocks) else blocks
            grown = np.zeros((max(cap, len(self.blocks)), self.Mp * _BV // 2), np.uint8)
            grown[: len(self.blocks)] = self.blocks
            self.blocks = grown
        if self.spec and self.spec.low_bytes and (n > len(self.low) or mapped):
            grown = np.zeros((max(len(self.blocks) * _BV, n, len(self.low)), self.spec.low_bytes), np.uint8)
            grown[: self.count] = self.low[: self.count]
            self.low = grown
        self._mapped = self._mapped and not mapped
        if n > len(self.alpha):
            cap = max(-(-n // _BV) * _BV, len(self.alpha) + len(self.alpha) // 4)
            for name in ("alpha", "beta"):
                old = getattr(self, name)
                if old is not None:
                    new = np.zeros(cap, np.float32)
                    new[: len(old)] = old
                    setattr(self, name, new)

    def reserve(self, n: int) -> None:
        """Room for ``n`` vectors in total (one allocation for a known final size)."""
        self._grow(n)

    def append(self, codes: np.ndarray, alpha: np.ndarray, beta: np.ndarray | None = None, threads: int = 1) -> None:
        """Append stored codes ``(r, code_bytes)`` with their factors ``alpha`` (and ``beta`` for L2), ``(r,)`` float32."""
        r = len(codes)
        assert self.nfac == self.count
        self.append_codes(codes, threads)
        self.alpha[self.count - r : self.count] = alpha
        if self.beta is not None:
            assert beta is not None
            self.beta[self.count - r : self.count] = beta
        self.nfac = self.count

    def append_codes(self, codes: np.ndarray, threads: int = 1) -> None:
        """Append stored codes ``(r, code_bytes)`` (their factors: :meth:`fill_factors`).

        Packed straight from ``codes`` where the plan allows (no nibble copy), in block-aligned row ranges
        over ``threads`` when there are many rows; the low plane of a split plan is written beside.
        """
        r = len(codes)
        if not r:
            return
        self._grow(self.count + r)
        src, table = nibble_source(codes, self.config, self.plan)
        src = np.ascontiguousarray(src)
        first, width, tab = self.count, src.shape[1], _ptr(table)

        def pack(rows: tuple[int, int]) -> None:
            self.lib.tq_scan_pack(_ptr(src[rows[0] :]), rows[1] - rows[0], width, self.M, self.Mp, first + rows[0],
                                  _ptr(self.blocks), tab)  # fmt: skip

        # cut points on block boundaries (global position a multiple of _BV): each range owns its blocks
        parts = max(1, min(threads, r // _PACK_ROWS))
        cuts = sorted({0, r, *(min(r, -(-(first + r * i // parts) // _BV) * _BV - first) for i in range(1, parts))})
        ranges = list(zip(cuts[:-1], cuts[1:]))
        if len(ranges) > 1:
            list(thread_pool(len(ranges)).map(pack, ranges))
        else:
            pack((0, r))
        if self.spec is not None and self.spec.low_bytes:
            rows = np.ascontiguousarray(codes)  # (scan_split.low_plane is the numpy statement of this)
            self.lib.tq_scan_low(_ptr(rows), r, rows.shape[1], self.spec.mode, _ptr(self.low[self.count :]), self.spec.low_bytes)
        self.count += r

    def sync(self, codes: np.ndarray | None, norms: np.ndarray, correction: bool, threads: int = 1) -> None:
        """Append the stored vectors ``count..len(codes)``, then the scan factors of all that lack them.

        ``codes`` ``(n, code_bytes)`` (None: the split storage already holds them) and ``norms``
        ``(n,)`` float32 are the index's stored data.
        """
        if codes is not None:
            self.append_codes(codes[self.count :], threads)
        self.fill_factors(norms, correction, threads, codes)

    def fill_factors(self, norms: np.ndarray, correction: bool, threads: int = 1, codes: np.ndarray | None = None) -> None:
        """Scan factors of vectors ``nfac..count`` from ``norms`` ``(count,)`` float32 and the codes
        (``codes`` ``(count, code_bytes)``, else the split storage's, rebuilt chunk by chunk).

        ``alpha = ‖x‖/‖ŷ‖`` (``‖x‖`` without ``correction``; doubled for L2) and ``beta = −‖x‖²``
        (L2): the scan ranks by ``alpha·<Πq, ŷ_scan> + beta``, the corrected estimate of
        ``<q, x>`` (or of ``‖q‖² − ‖q − x‖²``). ``‖ŷ‖`` is decoded in chunks over ``threads``.
        """
        start, n = self.nfac, self.count
        if start >= n:
            return
        self._grow(n, copy=False)  # factor room only: a memory-mapped storage stays mapped
        step = 1 << 10  # rows decoded at a time: a 16k-row chunk (25 MB at d = 384) per thread showed in the search peak
        alpha = np.empty(n - start, np.float32)

        def factors(s0: int) -> None:
            s1 = min(n, s0 + step)
            a = norms[s0:s1].copy()
            if correction:
                rows = codes[s0:s1] if codes is not None else self.codes(s0, s1)
                a /= reconstruction_norms(decode_mse_numpy(rows, self.config))
            alpha[s0 - start : s1 - start] = 2 * a if self.l2 else a

        starts = range(start, n, step)
        if threads > 1 and len(starts) > 1:
            list(thread_pool(threads).map(factors, starts))
        else:
            for s0 in starts:
                factors(s0)
        self.alpha[start:n] = alpha
        if self.beta is not None:
            self.beta[start:n] = -np.square(norms[start:n])
        self.nfac = n

    def rotate(self, q: np.ndarray, rot_t: np.ndarray) -> np.ndarray:
        """``q @ rot_t`` for queries ``(nq, dim)`` float32: in C on this thread for up to 4 queries, else torch.

        Not numpy's BLAS: OpenBLAS workers spin for ~0.1 s after a call, and on 2 cores that took
        a core from the scan threads that follow (2-thread batch at d = 96: 28k vs 40k QPS).
        """
        if len(q) > 4:
            return (torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)) @ torch.from_numpy(rot_t)).numpy()
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty((len(q), rot_t.shape[1]), np.float32)
        self.lib.tq_rotate(_ptr(q), len(q), q.shape[1], _ptr(rot_t), _ptr(out))
        return out

    def luts(self, q_rot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantized tables ``(nq, Mp, 16)`` uint8, ``inv_a`` and ``bias`` ``(nq,)`` float32 of rotated queries ``(nq, dim)``.

        The scan estimates ``<Πq, ŷ_scan> ≈ Σ_m lut[m][nibble_m] · inv_a + bias``.
        """
        q = np.ascontiguousarray(q_rot, dtype=np.float32)
        nq = len(q)
        lut = np.empty((nq, self.Mp, 16), np.uint8)
        inv_a, bias = np.empty(nq, np.float32), np.empty(nq, np.float32)
        m, dsub = self.coords.shape
        _check(self.lib.tq_scan_luts(_ptr(q), nq, q.shape[1], _ptr(self.coords), _ptr(self.centroids), m, dsub, self.Mp,
                                     _ptr(lut), _ptr(inv_a), _ptr(bias)))  # fmt: skip
        return lut, inv_a, bias

    def sums(self, lut: np.ndarray) -> np.ndarray:
        """Raw integer sums ``Σ_m lut[q, m][nibble_im]`` over all vectors, ``(nq, count)`` uint32, for tables ``(nq, Mp, 16)`` (tests)."""
        nblocks = -(-self.count // _BV)
        lut = np.ascontiguousarray(lut, dtype=np.uint8)
        out = np.zeros((len(lut), nblocks * _BV), np.uint32)
        self.lib.tq_scan_sums(_ptr(self.blocks), nblocks, self.Mp, _ptr(lut), len(lut), _ptr(out))
        return out[:, : self.count]

    def _scan(
        self, q: np.ndarray, v0: int, v1: int, length: int, codes: np.ndarray | None, rot_t: np.ndarray | None = None,
        k: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Rotation by ``rot_t``,) tables, scan of ``[v0, v1)`` and (with ``codes``) exact re-scoring, in one C call.

        ``k > 0`` (with ``codes``): the best ``k`` re-scored, sorted, ``(nq, k)``; else ``(nq, length)`` unordered.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        nq, width = len(q), k or length
        scores, pos = np.empty((nq, width), np.float32), np.empty((nq, width), np.int64)
        own = codes is OWN_CODES
        codes_at, rot_at = self._addresses(None if own else codes, rot_t)
        row_bytes = -1 if own else 0 if codes is None else codes.shape[1]
        rc = self.lib.tq_scan_topl(self._context(), _ptr(q), nq, length, v0, v1, codes_at, row_bytes, _ptr(scores),
                                   _ptr(pos), rot_at, k)  # fmt: skip
        _check(rc)
        return scores, pos

    def _addresses(self, codes: np.ndarray | None, rot_t: np.ndarray | None) -> tuple[int | None, int | None]:
        """Addresses of the stored codes and ``Π.T``, taken once per array (held weakly: a replaced array is freed)."""
        held = self._held
        if held is None or held[0]() is not codes or held[1]() is not rot_t:
            held = self._held = (_weak(codes), _weak(rot_t), _ptr(codes), _ptr(rot_t))
        return held[2], held[3]

    def _splits(self, threads: int) -> bool:
        """Whether a single query's scan is split over vector ranges (``threads`` > 1 and a scan of 32 MiB or more)."""
        return threads > 1 and self.count * self.Mp // 2 >= _SPLIT_BYTES

    def _threads(self, nq: int, threads: int) -> tuple[int, int]:
        """``(threads, queries per call)`` for ``nq`` queries: one call when ``nq`` fits one worker's chunk."""
        threads = max(1, min(threads, -(-self.count // _BV)))
        if nq < threads and not self._splits(threads):
            threads = 1  # a small single-query scan: waking threads costs more than it saves
        return threads, max(1, min(64, _LUT_BYTES // (self.Mp * 16), -(-nq // threads)))

    def search_one(
        self, q: np.ndarray, length: int, threads: int, codes: np.ndarray, rot_t: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """One unrotated query ``(1, dim)`` as :meth:`search` with ``codes``, ``rot_t`` and ``k`` returns it,
        when that is one C call on this thread (which also checks the query for NaN/Inf); else None.

        The single-query fast path: none of :meth:`search`'s planning runs per call.
        """
        if self.exact_plan is None or self._splits(threads):
            return None
        return self._scan(q, 0, self.count, length, codes, rot_t, k)

    def rescore(self, codes: np.ndarray, q_rot: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact ``alpha_i·<Πq, ŷ_i> (+ beta_i)`` of positions ``cand`` ``(nq, L)`` from the stored ``codes``.

        Needs :attr:`exact_plan` (stored bytes = full-precision nibbles); ``-inf`` where ``cand < 0``.
        ``codes`` :data:`OWN_CODES`: the mirror's split storage.
        """
        assert self.exact_plan is not None
        q = np.ascontiguousarray(q_rot, dtype=np.float32)
        cand = np.ascontiguousarray(cand, dtype=np.int64)
        out = np.empty(cand.shape, np.float32)
        if codes is OWN_CODES:
            _check(self.lib.tq_rescore_split(self._context(), _ptr(q), len(q), q.shape[1], _ptr(cand), cand.shape[1], _ptr(out)))
            return out
        m, dsub = self.exact_coords.shape
        _check(self.lib.tq_rescore(_ptr(codes), codes.shape[1], _ptr(self.exact_coords), _ptr(self.exact_centroids), m,
                                   dsub, _ptr(q), len(q), q.shape[1], _ptr(cand), cand.shape[1], _ptr(self.alpha),
                                   _ptr(self.beta), _ptr(out)))  # fmt: skip
        return out

    def search(
        self, q_rot: np.ndarray, length: int, threads: int = 1, codes: np.ndarray | None = None,
        rot_t: np.ndarray | None = None, k: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and positions of the ``length`` best vectors per query, ``(nq, length)`` each, unordered.

        With ``k`` and exact re-scoring (``codes`` and an :attr:`exact_plan`): only the ``k`` best
        re-scored per query, sorted (higher score first, then smaller position), ``(nq, k)``.

        ``threads``: a batch splits over queries; fewer queries than threads split the vectors
        into ranges, but only when the scan reads more than 32 MiB (on a shared machine waking a
        thread can cost more than a small scan).

        ``length`` must not exceed :attr:`count`. Ranking: ``alpha_i·<Πq, ŷ_scan,i> (+ beta_i)``.
        With the stored ``codes`` (and an :attr:`exact_plan`) the returned scores are the exact
        ones of :meth:`rescore`, computed in the same worker threads as the scan. With ``rot_t``
        (``Π.T``, ``(dim, dim)``) the queries are not rotated yet: up to 4 queries scanned in one
        call are rotated inside it (one C call per single query).
        """
        exact = codes if codes is not None and self.exact_plan is not None else None
        nq, n = len(q_rot), self.count
        assert 1 <= length <= n and 0 <= k <= length
        k = k if exact is not None else 0
        threads, per = self._threads(nq, threads)
        if nq >= threads and per >= nq:  # one call
            if rot_t is not None and nq > 4:
                q_rot, rot_t = self.rotate(q_rot, rot_t), None
            return self._scan(q_rot, 0, n, length, exact, rot_t, k)
        if rot_t is not None:
            q_rot = self.rotate(q_rot, rot_t)
        if nq >= threads:  # chunks of queries, one worker each
            scores, pos = np.empty((nq, k or length), np.float32), np.empty((nq, k or length), np.int64)

            def job(s0: int) -> None:
                sl = slice(s0, min(nq, s0 + per))
                scores[sl], pos[sl] = self._scan(q_rot[sl], 0, n, length, exact, None, k)

            starts = range(0, nq, per)
            if threads == 1:
                for s0 in starts:
                    job(s0)
            else:
                list(thread_pool(threads).map(job, starts))
            return scores, pos
        # few queries: split the vectors into block-aligned ranges, merge the shortlists
        blocks = -(-n // _BV)
        step = -(-blocks // threads) * _BV
        ranges = [(v0, min(n, v0 + step)) for v0 in range(0, n, step)]
        parts = list(
            thread_pool(threads).map(lambda r: self._scan(q_rot, r[0], r[1], min(length, r[1] - r[0]), None), ranges)
        )
        all_s = np.concatenate([s for s, _ in parts], axis=1)
        all_p = np.concatenate([p for _, p in parts], axis=1)
        # best `length` by (score desc, position asc), as one pass would keep them
        order = np.lexsort((all_p, -all_s))[:, :length]
        scores, pos = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_p, order, 1)
        scores = self.rescore(exact, q_rot, pos) if exact is not None else scores
        if k:  # as one call returns them: the best k re-scored, (score desc, position asc)
            order = np.lexsort((pos, -scores))[:, :k]
            return np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
        return scores, pos


__all__ = ["OWN_CODES", "ScanMirror", "auto_scan_bits", "default_shortlist", "load_scan_library", "scan_layout", "scan_library_error", "scan_plan", "scan_width", "top_k"]
