"""The FAISS fast-scan mirror of :class:`~turboquant.index.TurboQuantIndex`, driven with fixed
TurboQuant codebooks (no training).

The mirror is a FAISS ``IndexPQFastScan`` whose sub-quantizer ``m`` reads one 4-bit nibble of a
re-packed code stream: the top ``scan_bits`` bits of each coordinate's Lloyd-Max code. Its 16
"centroids" are fixed by the codebook, so nothing is trained; FAISS then scans 32 vectors at a
time with SIMD shuffles of 8-bit lookup tables. The index re-ranks the shortlist exactly.

The index's own scan (:mod:`turboquant.kernels.cpu_scan`, C) reads the same nibble plan
(:func:`nibble_plan`, :func:`nibble_bytes`) and also applies each vector's norm in the scan;
the FAISS mirror is its fallback when no C compiler is available.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .codebook import lloyd_max_codebook
from .codec import decode_mse_numpy, layout, reconstruction_norms
from .config import QuantizerConfig
from .packing import packed_size, unpack_codes

# --------------------------------------------------------------------------- FAISS fast-scan mirror


@dataclass(frozen=True)
class _NibblePlan:
    """Which rotated coordinates each 4-bit nibble of the fast-scan mirror holds.

    Coordinate ``j`` with a ``w``-bit code enters the mirror with its top ``cw = min(w, width)``
    bits: Lloyd-Max codes are ordered, so dropping low bits merges neighbouring cells into a
    coarser quantizer whose centroids are the merged cells' conditional means (a nested
    codebook: no training, no data). FAISS treats nibble ``m`` as a product-quantizer sub-space
    of ``dsub`` virtual dimensions: ``coords[m, s]`` is the coordinate in slot ``s`` (−1: none)
    and ``centroids[m, v, s]`` its value for nibble value ``v``, so that
    ``<q_virtual, centroid> = Σ_j (Πq)_j ŷ_coarse_j`` over the nibble's coordinates.
    """

    coords: np.ndarray  # (M, dsub) int64
    centroids: np.ndarray  # (M, 16, dsub) float32
    shifts: np.ndarray  # (M, dsub) int64 bit offset of the slot inside the nibble
    drop: np.ndarray  # (dim,) low bits dropped from each coordinate's code
    identity: bool  # stored code bytes already are the mirror's nibble bytes
    exact: bool  # the mirror holds the full codes (no bits dropped)


def _coarse_centroids(dim: int, bits: int, drop: int) -> np.ndarray:
    """Conditional means of the ``2**(bits-drop)`` merged Lloyd-Max cells (exact density)."""
    from .codebook import _interval_moments, _theta_edges

    cb = lloyd_max_codebook(dim, bits)
    if drop == 0:
        return cb.centroids.astype(np.float32)
    mass, first = _interval_moments(dim, _theta_edges(dim, cb.boundaries))
    group = np.arange(1 << bits) >> drop
    return (np.bincount(group, first) / np.bincount(group, mass)).astype(np.float32)


@lru_cache(maxsize=32)
def nibble_plan(config: QuantizerConfig, width: int) -> _NibblePlan | None:
    groups = [(s.first, s.count, s.width) for s in layout(config).streams]
    if width >= 4 and any(w > 4 for _, _, w in groups):
        return None
    slots: list[list[tuple[int, int, int]]] = []  # per nibble: (coord, coarse width, shift)
    drop = np.zeros(config.dim, np.int64)
    tables: dict[int, np.ndarray] = {}
    for start, n, w in groups:
        cw = min(w, width) if w != 3 or width < 3 else 3
        drop[start : start + n] = w - cw
        tables[start] = _coarse_centroids(config.dim, w, w - cw)
        per = 4 // cw if 4 % cw == 0 else 1
        # a group whose codes fill whole nibbles keeps the stored stream's nibble order (pad nibbles stay empty)
        count = 2 * packed_size(n, cw) if 4 % cw == 0 else n
        for m in range(count):
            slots.append([(start + m * per + j, cw, j * cw) for j in range(per) if m * per + j < n])
    dsub = max(len(s) for s in slots)
    coords = np.full((len(slots), dsub), -1, np.int64)
    shifts = np.zeros((len(slots), dsub), np.int64)
    centroids = np.zeros((len(slots), 16, dsub), np.float32)
    values = np.arange(16)
    starts = sorted(tables)
    for m, slot in enumerate(slots):
        for j, (coord, cw, shift) in enumerate(slot):
            table = tables[max(st for st in starts if st <= coord)]
            coords[m, j], shifts[m, j] = coord, shift
            centroids[m, :, j] = table[((values >> shift) & ((1 << cw) - 1)) % len(table)]
    exact = not drop.any()
    identity = exact and all(4 % w == 0 for _, _, w in groups)
    return _NibblePlan(coords, centroids, shifts, drop, identity, exact)


@lru_cache(maxsize=8)
def _msb_byte_table() -> np.ndarray:
    """Byte of two 4-bit codes -> nibble of their top 2 bits each (the 4-bit → 2-bit mirror)."""
    b = np.arange(256)
    return (((b >> 2) & 3) | (((b >> 6) & 3) << 2)).astype(np.uint8)


def _msb_plan(config: QuantizerConfig, plan: _NibblePlan) -> bool:
    """Whether nibble ``m`` of the plan is ``_msb_byte_table()[code byte m]`` (one 4-bit stream scanned at 2 bits)."""
    streams = layout(config).streams
    return len(streams) == 1 and streams[0].width == 4 and bool(plan.drop[0] == 2)


def nibble_source(codes: np.ndarray, config: QuantizerConfig, plan: _NibblePlan) -> tuple[np.ndarray, np.ndarray | None]:
    """``(rows, table)`` for the C scan's packer: the stored codes themselves where a nibble is one code byte
    through ``table`` (or, table ``None``, the codes are the nibbles), else :func:`nibble_bytes`' rows."""
    if plan.identity:
        return codes, None
    if _msb_plan(config, plan):
        return codes, _msb_byte_table()
    return nibble_bytes(codes, config, plan), None


def nibble_bytes(codes: np.ndarray, config: QuantizerConfig, plan: _NibblePlan) -> np.ndarray:
    """Stored codes ``(n, code_bytes)`` -> the plan's nibbles, two per byte ``(n, ceil(M/2))`` uint8.

    Nibble ``m`` is ``(out[:, m // 2] >> 4 * (m % 2)) & 15``; it holds the top bits of the
    coordinates ``plan.coords[m]`` at ``plan.shifts[m]``.
    """
    if plan.identity:
        return codes
    if _msb_plan(config, plan):  # common case: one table lookup per byte
        nib = np.take(_msb_byte_table(), codes)
        if nib.shape[1] % 2:
            nib = np.concatenate([nib, np.zeros((nib.shape[0], 1), np.uint8)], axis=1)
        return nib[:, 0::2] | (nib[:, 1::2] << 4)
    # unpack every stream to one code per coordinate, then rebuild nibbles in plan order
    t = torch.from_numpy(np.ascontiguousarray(codes))
    streams = layout(config).streams
    parts = [unpack_codes(t[:, s.offset : s.offset + s.nbytes].contiguous(), s.width, s.count) for s in streams]
    per_coord = torch.cat(parts, dim=1).numpy() >> plan.drop.astype(np.uint8)
    nib = np.zeros((len(codes), len(plan.coords)), np.uint8)
    for slot in range(plan.coords.shape[1]):  # dsub passes of one gather each
        coords, valid = plan.coords[:, slot], plan.coords[:, slot] >= 0
        part = np.take(per_coord, np.where(valid, coords, 0), axis=1) * valid.astype(np.uint8)
        nib |= part << plan.shifts[:, slot].astype(np.uint8)
    if nib.shape[1] % 2:
        nib = np.concatenate([nib, np.zeros((nib.shape[0], 1), np.uint8)], axis=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


@dataclass
class _Shard:
    """One FAISS index of the mirror, holding stored positions ``start ..``."""

    index: Any
    start: int = 0


class FastScan:
    """FAISS ``IndexPQFastScan`` shards over the stored codes with fixed TurboQuant codebooks (no training).

    The fallback of the C scan (:mod:`turboquant.kernels.cpu_scan`) where no C compiler is
    available. A lookup table cannot apply a per-vector norm, so the index uses it only when all
    stored norms are equal (``cosine``, or unit vectors). FAISS parallelises a search over
    queries only, so the mirror is split into about one shard per thread, searched concurrently
    for small query batches (FAISS releases the GIL) and one after another, each multi-threaded,
    for large ones.
    """

    def __init__(self, config: QuantizerConfig, plan: _NibblePlan, shard_size: int, threads: int) -> None:
        import faiss

        self.faiss, self.config, self.plan, self.threads = faiss, config, plan, threads
        self.shard_size = max(32, -(-shard_size // 32) * 32)
        self.shards: list[_Shard] = []
        self.tail = np.zeros((0, 0), np.uint8)  # last shard's partial block
        self.count = 0
        self.query_index = np.where(plan.coords >= 0, plan.coords, 0).ravel()
        self.query_mask = (plan.coords >= 0).ravel().astype(np.float32)
        # the usual plans read the rotated query as it is: skip the gather
        self.query_identity = bool(np.array_equal(self.query_index, np.arange(config.dim)) and self.query_mask.all())

    @classmethod
    def build(cls, config: QuantizerConfig, plan: _NibblePlan, codes: np.ndarray, threads: int) -> FastScan:
        """A mirror of the stored ``codes`` in about one shard per thread (shards of at least 8,192 vectors)."""
        shard = max(8192, -(-len(codes) // threads)) if threads > 1 else 1 << 62
        fs = cls(config, plan, shard, threads)
        for start in range(0, len(codes), 1 << 18):
            fs.append(codes[start : start + (1 << 18)])
        return fs

    def _new_index(self) -> Any:
        m, dsub = self.plan.coords.shape
        index = self.faiss.IndexPQFastScan(m * dsub, m, 4, self.faiss.METRIC_INNER_PRODUCT)
        self.faiss.copy_array_to_vector(self.plan.centroids.ravel(), index.pq.centroids)
        index.is_trained = True
        self.packer = index.get_CodePacker()
        return index

    @property
    def ntotal(self) -> int:
        return sum(int(s.index.ntotal) for s in self.shards)

    @property
    def nbytes(self) -> int:
        return sum(int(s.index.codes.size()) for s in self.shards)

    def append(self, codes: np.ndarray) -> None:
        """Pack ``codes`` (stored layout, positions ``ntotal..``) after the current vectors; shards are packed in parallel."""
        nib = nibble_bytes(codes, self.config, self.plan)
        jobs: list[tuple[Any, np.ndarray, np.ndarray]] = []  # (shard, its tail, new codes)
        done = 0
        if self.shards and self.shards[-1].index.ntotal < self.shard_size:
            room = self.shard_size - int(self.shards[-1].index.ntotal)
            jobs.append((self.shards[-1].index, self.tail, nib[:room]))
            done = room
        while done < len(nib):
            index = self._new_index()
            if self.tail.shape[1] != self.packer.code_size:
                self.tail = np.zeros((0, self.packer.code_size), np.uint8)
            self.shards.append(_Shard(index, self.count + done))
            jobs.append((index, self.tail[:0], nib[done : done + self.shard_size]))
            done += self.shard_size
        self.count += len(nib)
        if jobs:
            self.tail = list(thread_pool(self.threads).map(lambda job: self._pack_into(*job), jobs))[-1]

    def _pack_into(self, index: Any, tail: np.ndarray, nib: np.ndarray) -> np.ndarray:
        """Append ``nib`` to one shard; only its last, partial 32-vector block is re-packed. Returns the new tail."""
        bbs, block = self.packer.nvec, self.packer.block_size
        ntotal = int(index.ntotal)
        flat = np.concatenate([tail, nib])
        first, n_blocks = ntotal // bbs, -(-len(flat) // bbs)
        padded = np.zeros((n_blocks * bbs, self.packer.code_size), np.uint8)
        padded[: len(flat)] = flat
        index.codes.resize((first + n_blocks) * block)
        view = self.faiss.rev_swig_ptr(index.codes.get(), (first + n_blocks) * block)
        view[first * block :] = 0
        swig = self.faiss.swig_ptr
        for b in range(n_blocks):
            dst = view[(first + b) * block : (first + b + 1) * block]
            self.packer.pack_all(swig(padded[b * bbs : (b + 1) * bbs]), swig(dst))
        index.ntotal = ntotal + len(nib)
        index.ntotal2 = (first + n_blocks) * bbs
        return flat[(n_blocks - 1) * bbs :].copy() if len(flat) % bbs else flat[:0]

    def search(self, q_rot: np.ndarray, k: int) -> np.ndarray:
        """Positions of the approximate top-``k`` by the scan's ``<Πq, ŷ>``, ``(nq, k)`` (unordered)."""
        if self.query_identity:
            q_virtual = np.ascontiguousarray(q_rot, dtype=np.float32)
        else:
            q_virtual = np.ascontiguousarray(q_rot[:, self.query_index] * self.query_mask, dtype=np.float32)
        nq, swig = len(q_virtual), self.faiss.swig_ptr
        shards = [s for s in self.shards if s.index.ntotal]

        def one(shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
            kk = min(k, int(shard.index.ntotal))
            dist, pos = np.empty((nq, kk), np.float32), np.empty((nq, kk), np.int64)
            shard.index.search_c(nq, swig(q_virtual), kk, swig(dist), swig(pos))  # skips the wrapper's checks
            return dist, pos + shard.start

        if len(shards) > 1 and len(q_rot) < self.threads:
            results = list(thread_pool(self.threads).map(one, shards))
        else:
            results = [one(s) for s in shards]
        if len(results) == 1:
            return results[0][1]
        dists = np.concatenate([d for d, _ in results], axis=1)
        pos = np.concatenate([i for _, i in results], axis=1)
        top = np.argpartition(-dists, k - 1, axis=1)[:, :k]
        return np.take_along_axis(pos, top, axis=1)


def rotate_queries(q: np.ndarray, rot_t: np.ndarray) -> np.ndarray:
    """``q @ Π.T`` for ``q`` ``(nq, dim)`` float32; ``rot_t`` is ``Π.T`` as a contiguous array."""
    # A few queries: products with 256-column blocks of Π.T stay single-threaded in BLAS. One
    # large threaded GEMV/GEMM for a single query was 10-40x slower on a busy 2-core machine
    # (threads waiting on descheduled siblings).
    if len(q) > 4:
        return q @ rot_t
    return np.concatenate([q @ rot_t[:, i : i + 256] for i in range(0, rot_t.shape[1], 256)], axis=1)


def rescore(
    codes: np.ndarray, norms: np.ndarray, config: QuantizerConfig, correction: bool, cand: np.ndarray, q_rot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``<Πq, ŷ>`` and per-vector scale (``‖x‖/‖ŷ‖`` or ``‖x‖``) of shortlisted positions ``cand`` ``(nq, L)``.

    ``codes`` ``(n, code_bytes)`` and ``norms`` ``(n,)`` float32 are the stored data; ``q_rot`` is ``(nq, dim)``.
    """
    flat = cand.reshape(-1)
    y_hat = decode_mse_numpy(np.take(codes, flat, axis=0), config)  # np.take: ~5x faster than fancy indexing
    dots = np.matmul(y_hat.reshape(*cand.shape, config.dim), q_rot[:, :, None])[..., 0]
    scale = np.take(norms, flat)
    if correction:
        scale /= reconstruction_norms(y_hat)
    return dots, scale.reshape(cand.shape)


def rescore_keys(
    codes: np.ndarray, norms: np.ndarray, config: QuantizerConfig, correction: bool, cand: np.ndarray, q_rot: np.ndarray,
    q_sq: np.ndarray, l2: bool,
) -> np.ndarray:  # fmt: skip
    """Exact 'larger is better' keys ``(nq, L)`` of shortlisted positions ``cand`` (:func:`rescore` in steps of queries):
    the estimated ``<q, x>``, or ``-(‖q‖² + ‖x‖² − 2<q, x>)`` for ``l2`` (``q_sq``: ``(nq,)`` squared query norms)."""
    dots, scale = np.empty(cand.shape, np.float32), np.empty(cand.shape, np.float32)
    step = max(1, (1 << 18) // (cand.shape[1] * config.dim))  # queries per step: decoded block stays in cache (3x faster)
    for s0 in range(0, len(q_rot), step):
        sl = slice(s0, s0 + step)
        dots[sl], scale[sl] = rescore(codes, norms, config, correction, cand[sl], q_rot[sl])
    keys = dots * scale
    return 2 * keys - np.square(np.take(norms, cand)) - q_sq[:, None] if l2 else keys


@lru_cache(maxsize=4)
def thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="turboquant-fastscan")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True
