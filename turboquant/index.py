"""Compressed vector search index: TurboQuant codes, no training (paper §4.4, nearest-neighbour search).

A vector ``x`` is stored exactly as :class:`~turboquant.quantizer.TurboQuantMSE` stores it
(docs/DESIGN.md): ``‖x‖`` plus Lloyd-Max codes of ``y = Π x/‖x‖``. Queries are rotated once
(``Π q``) and scored straight from the codes, never decoded in bulk into a float cache.

Ranking estimator: ``‖x‖·<Πq, ŷ>/‖ŷ‖`` (default; ``correction=False`` drops ``/‖ŷ‖``), the
reconstruction rescaled to its stored norm (:func:`turboquant.codec.reconstruction_norms`): no
stored byte, no calibration; on all-MiniLM-L6-v2 (d=384, 4 bits) recall 10@10 0.933 → 0.947.

Engines, picked per call: ``fastscan`` (CPU) scans the top ``scan_bits`` bits of every code
(fixed nested codebooks, nothing trained) with 8-bit lookup tables in C
(:mod:`turboquant.kernels.cpu_scan`, each vector's ``‖x‖/‖ŷ‖`` and L2 ``−‖x‖²`` applied in the
scan), then re-scores a shortlist exactly; ``torch`` (any device, any width) decodes blocks of
codes against the query batch. For 2- and 4-bit codes the scan's blocked layout plus a plane of
the bits it drops *are* the stored codes (:mod:`turboquant.kernels.scan_split`: each code held
once; the row-major copy is dropped once the scan is built). Without a C compiler the FAISS
``IndexPQFastScan`` mirror (:mod:`turboquant.fastscan`) stands in where all stored norms are equal;
others then use the torch engine. ``auto`` picks fast-scan on CPU whenever one is available.

Thread safety: every public method takes the index's re-entrant lock, so a search running
while another thread adds or removes vectors sees the index either before or after the change."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from .buffers import GrowableBuffer
from .codec import bytes_per_vector, code_bytes, decode_mse, encode
from .config import Engine, IndexConfig, Metric, QuantizerConfig, TurboQuantError, replace_fields
from .fastscan import FastScan, faiss_available, rescore_keys, rotate_queries, thread_pool
from .index_file import MAX_ID, IndexHeader, read_index_file, write_index_file
from .inputs import ArrayLike, as_ids, as_matrix, to_numpy32, to_torch
from .kernels.cpu_scan import OWN_CODES, ScanMirror, default_shortlist, load_scan_library, scan_plan, scan_width, top_k
from .kernels.scan_split import load_split, split_tensors
from .kernels.torch_search import torch_search
from .rotation import make_rotation

_CHUNK = 16384  # vectors encoded / decoded at a time: bounds temporary memory
_NORM_SPREAD = {Metric.IP: 1.02, Metric.COSINE: 1.02, Metric.L2: 1.002}  # max/min norm the FAISS fallback accepts


def _shown(ids: np.ndarray) -> str:
    return ", ".join(str(int(i)) for i in ids[:10]) + (" ..." if ids.size > 10 else "")


# --------------------------------------------------------------------------- the index


class TurboQuantIndex:
    """A compressed, training-free vector index with FAISS-style ``search`` output.

    Args:
        dim: vector dimension, or a complete :class:`~turboquant.config.IndexConfig` (then
            ``options`` override its fields).
        bits: bits per coordinate, 1..8 (fractional rates such as 2.5 allowed).
        metric: ``"ip"``, ``"cosine"`` or ``"l2"`` (:class:`~turboquant.config.Metric`).
        device: where codes live; ``None`` = the device of the first ``add`` (CPU for numpy).
        options: the other :class:`~turboquant.config.IndexConfig` fields (``rotation``, ``seed``,
            ``norm_dtype``, ``engine``, ``correction``, ``search_threads``, ``scan_bits``), documented there.

    Example:
        >>> index = TurboQuantIndex(384, bits=4, metric="cosine")  # doctest: +SKIP
        >>> index.add(embeddings)  # doctest: +SKIP
        >>> scores, ids = index.search(queries, k=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        dim: int | IndexConfig,
        bits: float | None = None,
        metric: Metric | str = Metric.IP,
        *,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> None:
        if isinstance(dim, IndexConfig):
            if bits is not None or metric is not Metric.IP:
                raise TurboQuantError("pass either an IndexConfig or dim/bits/metric, not both")
            config = replace_fields(dim, options) if options else dim
        else:
            if bits is None:
                raise TurboQuantError("bits is required (or pass an IndexConfig)")
            known = set(IndexConfig.__dataclass_fields__) - {"dim", "bits", "metric"}
            unknown = sorted(set(options) - known)
            if unknown:
                raise TurboQuantError(f"unknown TurboQuantIndex options {unknown}; known: {sorted(known)} and device")
            config = IndexConfig(dim, bits, metric, **options)  # type: ignore[arg-type]
        self.config: IndexConfig = config
        self._qcfg: QuantizerConfig = config.quantizer
        self.rotation = make_rotation(config.rotation, config.dim, config.seed)
        self._device = None if device is None else torch.device(device)
        self._norm_dtype = getattr(torch, config.norm_dtype)
        self._lock = threading.RLock()
        self._fastscan: ScanMirror | FastScan | None = None  # the scan mirror (C kernel, else FAISS)
        self._rot_t: np.ndarray | None = None  # Π.T as numpy, for the fast-scan path
        self._reset_storage(self._device or torch.device("cpu"))
        if config.engine is Engine.FASTSCAN:
            self._check_fastscan_possible()

    # ----------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def bits(self) -> float:
        return self.config.bits

    @property
    def metric(self) -> Metric:
        return self.config.metric

    @property
    def quantizer_config(self) -> QuantizerConfig:
        """The MSE quantizer config of the stored codes."""
        return self._qcfg

    @property
    def device(self) -> torch.device:
        return self._device or torch.device("cpu")

    ntotal = property(lambda self: len(self), doc="Number of stored vectors (FAISS spelling of ``len(index)``).")

    @property
    def bytes_per_vector(self) -> int:
        """Stored bytes per vector: codes + norm (ids excluded; see :attr:`nbytes`)."""
        return bytes_per_vector(self._qcfg)

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored data: codes + norms, plus 8 bytes per id once ids are explicit.

        Default sequential ids are implicit (not stored) until a custom id is added or a vector
        removed. This is what :meth:`save` writes, less the file header.
        """
        n = len(self)
        return n * self.bytes_per_vector + (8 * n if self._ids is not None else 0)

    @property
    def memory_bytes(self) -> int:
        """RAM actually held: allocated buffers (growth slack included) + the fast-scan mirror."""
        parts = [self._store.allocated, self._ids.allocated if self._ids is not None else 0]
        return sum(parts) + (self._fastscan.nbytes if self._fastscan is not None else 0)

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, in storage order (int64 copy)."""
        with self._lock:
            return self._id_array().copy()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"TurboQuantIndex(dim={c.dim}, bits={c.bits}, metric={c.metric.value!r}, rotation={c.rotation.value!r}, "
            f"n={len(self)}, {self.bytes_per_vector} B/vector)"
        )

    # ----------------------------------------------------------------- storage

    def _reset_storage(self, device: torch.device) -> None:
        self._store = GrowableBuffer(axis=0)  # "codes" (n, code_bytes) uint8, "norms" (n,)
        self._store.reserve(0, self._templates(device))
        self._ids: GrowableBuffer | None = None  # None: ids are 0..n-1, not stored
        self._next_id = 0
        self._fastscan = None
        self._norms32: np.ndarray | None = None  # float32 copy of non-float32 norms

    def __len__(self) -> int:
        return self._store.length

    @property
    def _codes(self) -> torch.Tensor:
        return self._code_rows(0, len(self))

    def _split(self) -> ScanMirror | None:
        """The C scan mirror when it holds the only copy of the codes (split storage), else None."""
        fs = self._fastscan
        return fs if isinstance(fs, ScanMirror) and "codes" not in self._store.tensors else None

    def _code_rows(self, start: int, stop: int, pos: np.ndarray | None = None) -> torch.Tensor:
        """Stored code rows ``start..stop`` (or positions ``pos``), ``(r, code_bytes)`` uint8 (rebuilt if split)."""
        if (fs := self._split()) is not None:
            return torch.from_numpy(fs.codes(start, stop, pos))
        codes = self._store.view("codes")
        return codes[start:stop] if pos is None else codes.index_select(0, torch.from_numpy(pos).to(codes.device))

    def _unsplit(self) -> None:
        """Rows again (before a removal): the codes rebuilt row-major, the scan mirror dropped."""
        if (fs := self._split()) is not None:
            self._store.tensors = {"codes": torch.from_numpy(fs.codes()), "norms": self._store.tensors["norms"]}
            self._store.advance(0)
            self._fastscan = None

    _norms = property(lambda self: self._store.view("norms"))

    def _id_array(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self._ids is None else self._ids.numpy("ids")

    def _materialize_ids(self, count: int | None = None) -> None:
        """Store the implicit ids ``0..count-1`` explicitly (``count``: default all stored vectors)."""
        if self._ids is None:
            self._ids = GrowableBuffer(axis=0)
            self._ids.append({"ids": torch.arange(len(self) if count is None else count, dtype=torch.int64)})

    # ----------------------------------------------------------------- add / remove

    def add(self, x: ArrayLike, ids: ArrayLike | None = None, *, upsert: bool = False) -> np.ndarray:
        """Quantize and append vectors; returns their int64 ids.

        All or nothing: the whole batch is checked and encoded before anything is stored, so a
        batch with one NaN row, a duplicate id or an id overflow raises and leaves the index as it was.

        Args:
            x: ``(n, dim)`` (or ``(dim,)``) numpy array or torch tensor, any float dtype, any
                ``n``; a memory-mapped ``.npy`` array is read in chunks of 16,384 rows (see
                :func:`turboquant.streaming.build_index` for files larger than RAM).
            ids: optional non-negative 64-bit ids, unique within the batch (default: sequential,
                continuing after the largest id seen).
            upsert: ids already in the index are replaced (their old vectors removed, in the same
                locked step). Without it an id already stored raises :class:`TurboQuantError`.
        """
        t = to_torch(as_matrix(x, self.dim, "x")[0])
        n = t.shape[0]
        new_ids = None if ids is None else as_ids(ids, n)
        if new_ids is not None and n > 1:
            uniq, counts = np.unique(new_ids, return_counts=True)
            if uniq.size != n:
                dup = uniq[counts > 1]
                raise TurboQuantError(f"ids contain duplicates within the batch: {_shown(dup)}; nothing was added")
        with self._lock:
            if self._device is None and len(self) == 0:
                if t.device != self.device:  # keep a CPU reservation (reserve()) for CPU input
                    self._reset_storage(t.device)
                self._device = t.device
            if new_ids is None:
                if self._next_id > MAX_ID - n + 1:
                    raise TurboQuantError(f"sequential ids would pass 2**63 - 1 (next id {self._next_id}); nothing was added")
                new_ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
            # ids below next_id may collide; sequential and fresh explicit ids skip the O(n) lookup
            stale = np.zeros(0, np.int64)
            if n and len(self) and int(new_ids.min()) < self._next_id:
                stored = self._id_array()
                hit = np.isin(new_ids, stored)
                if hit.any() and not upsert:
                    raise TurboQuantError(
                        f"{int(hit.sum())} id(s) already in the index: {_shown(new_ids[hit])}; nothing was added "
                        "(pass upsert=True to replace them)"
                    )
                stale = new_ids[hit]
            if stale.size or self._split() is not None:  # encode first (may raise), then swap old for new
                codes, norms = self._encode_all(t)
                if stale.size:  # remove() scans every stored id
                    self.remove(stale)
                if (fs := self._split()) is not None:  # the codes go straight into the split storage
                    fs.reserve(len(self) + n)
                    fs.append_codes(codes.numpy(), torch.get_num_threads())
                    self._store.append({"norms": norms})
                else:
                    self._store.append({"codes": codes, "norms": norms})
            else:
                codes = self._encode_into_spare(t)
            if new_ids.size and (self._ids is not None or not np.array_equal(new_ids, np.arange(len(self) - n, len(self)))):
                self._materialize_ids(len(self) - n)
            if self._ids is not None:
                self._ids.append({"ids": torch.from_numpy(new_ids)})
            self._norms32 = None
            if n:
                self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            if self._fastscan is not None and self._split() is None:
                self._mirror_append(codes)
            elif n and self.config.engine is not Engine.TORCH:
                self._use_fastscan()  # builds the mirror (first add) or fills the new vectors' factors (split)
            return new_ids

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more vectors now, so a streaming build grows its buffers once (no 2x slack)."""
        with self._lock:
            if (fs := self._split()) is not None:
                fs.reserve(len(self) + int(n))
            self._store.reserve(len(self) + int(n), self._templates(self.device))

    def _templates(self, device: torch.device) -> dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]:
        codes = {} if self._split() is not None else {"codes": ((0, code_bytes(self._qcfg)), torch.uint8, device)}
        return {**codes, "norms": ((0,), self._norm_dtype, device)}

    def _run(self, job: Any, t: torch.Tensor) -> list[Any]:
        """``job(rows)`` for each chunk of ``t``'s rows; chunks of CPU tensors run on all cores (torch releases the GIL)."""
        parts = [slice(s, min(s + _CHUNK, t.shape[0])) for s in range(0, t.shape[0], _CHUNK)]
        if self.device.type == "cpu" and len(parts) > 1:
            return list(thread_pool(max(1, torch.get_num_threads())).map(job, parts))
        return [job(p) for p in parts]

    def _encode_all(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._run(lambda p: self._encode(t[p].to(self.device)), t)
        if not enc:
            return torch.empty(0, code_bytes(self._qcfg), dtype=torch.uint8), torch.empty(0, dtype=self._norm_dtype)
        return enc[0] if len(enc) == 1 else (torch.cat([c for c, _ in enc]), torch.cat([m for _, m in enc]))

    def _encode_into_spare(self, t: torch.Tensor) -> torch.Tensor:
        """Encode ``t`` straight into the buffers' free capacity, then mark it filled; returns the new codes."""
        n, start = t.shape[0], len(self)
        self._store.reserve(start + n, self._templates(self.device))
        codes, norms = self._store.tensors["codes"], self._store.tensors["norms"]

        def job(p: slice) -> None:
            c, m = self._encode(t[p].to(self.device))
            codes[start + p.start : start + p.stop].copy_(c)
            norms[start + p.start : start + p.stop].copy_(m)

        self._run(job, t)  # raises before anything is marked stored
        self._store.advance(n)
        return codes[start : start + n]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        # one reduction instead of an elementwise scan: NaN/Inf entries make a norm non-finite
        enc = encode(xf, self._qcfg)
        if not bool(torch.isfinite(enc.norms).all()):
            raise TurboQuantError("x contains NaN or Inf (or values whose norm overflows float32)")
        if self.metric is Metric.COSINE:
            if bool((enc.norms == 0).any()):
                raise TurboQuantError("x contains a zero vector, which has no direction for metric='cosine'")
            stored = torch.ones_like(enc.norms)
        else:
            stored = enc.norms
        stored = stored.to(self._norm_dtype)
        if not bool(torch.isfinite(stored).all()):
            raise TurboQuantError(f"a vector norm overflows norm_dtype={self.config.norm_dtype}")
        return enc.codes, stored

    def remove(self, ids: ArrayLike) -> int:
        """Remove the vectors with these ids; returns how many were removed.

        Raises :class:`TurboQuantError` (and removes nothing) if any id is not in the index.
        """
        flat = (ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).reshape(-1)
        wanted = np.unique(as_ids(flat, flat.size))
        with self._lock:
            stored = self._id_array()
            hit = np.isin(stored, wanted)
            missing = np.setdiff1d(wanted, stored[hit])
            if missing.size:
                raise TurboQuantError(f"{missing.size} id(s) not in the index: {_shown(missing)}; nothing was removed")
            if not hit.any():
                return 0
            self._unsplit()
            self._materialize_ids()
            keep = torch.from_numpy(~hit)
            self._store.apply(lambda t: t[keep.to(t.device)].clone())
            assert self._ids is not None
            self._ids.apply(lambda t: t[keep].clone())
            self._fastscan = None  # rebuilt lazily from the stored codes
            self._norms32 = None
            return int(hit.sum())

    def reset(self) -> None:
        """Remove everything (keeps the configuration)."""
        with self._lock:
            self._reset_storage(self.device)

    def reconstruct(self, ids: ArrayLike) -> np.ndarray:
        """Decoded vectors ``x̂`` (float32 numpy, ``(len(ids), dim)``) for stored ids."""
        flat = (ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).reshape(-1)
        wanted = as_ids(flat, flat.size)
        with self._lock:
            stored = self._id_array()
            order = np.argsort(stored, kind="stable")
            pos = np.searchsorted(stored[order], wanted)
            if wanted.size and (
                pos.max() >= len(stored) or not np.array_equal(stored[order[np.minimum(pos, len(stored) - 1)]], wanted)
            ):
                raise TurboQuantError("some ids are not in the index")
            rows = torch.from_numpy(order[pos]).to(self.device)
            y = decode_mse(self._code_rows(0, 0, order[pos]).to(self.device), self._qcfg)
            x = self.rotation.unrotate(y) * self._norms.index_select(0, rows).float().unsqueeze(1)
            return x.cpu().numpy()

    # ----------------------------------------------------------------- search

    def search(self, queries: ArrayLike, k: int, *, rerank: int | None = None) -> tuple[ArrayLike, ArrayLike]:
        """The ``k`` best stored vectors per query.

        Args:
            queries: ``(nq, dim)`` (or ``(dim,)``) numpy array or torch tensor; CUDA tensors are
                searched on CUDA when the index lives there.
            k: results per query, ``1 <= k <= len(index)``.
            rerank: fast-scan shortlist size per query (default grows with ``k`` and shrinks
                with ``bits``); ignored by the torch engine, which scores every vector exactly.

        Returns:
            ``(scores, ids)``, each ``(nq, k)``: float32 scores (descending for ``ip``/``cosine``,
            ascending squared distances for ``l2``) and int64 ids — numpy for numpy queries,
            torch tensors on the queries' device otherwise.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise TurboQuantError(f"k must be a positive int, got {k!r}")
        k = int(k)
        t, numpy_io = as_matrix(queries, self.dim, "queries")
        with self._lock:
            n = len(self)
            if n == 0:
                raise TurboQuantError("the index is empty; add vectors before searching")
            if k > n:
                raise TurboQuantError(f"k={k} exceeds the number of stored vectors ({n})")
            if t.shape[0] == 0:
                scores: np.ndarray | torch.Tensor = np.empty((0, k), np.float32)
                pos = np.empty((0, k), np.int64)
            elif self._use_fastscan():
                # numpy end to end: a single query must not pay tens of µs per torch op
                scores, pos = self._search_fastscan(to_numpy32(t), k, rerank)
            else:
                q = self._prepare_queries(to_torch(t).float().to(self.device))
                chunk = max(1024, min(_CHUNK * 4, (1 << 24) // max(len(q), 1)))
                scores, pos_t = torch_search(q, k, n, self._qcfg, self.rotation, self._code_rows, self._norms,
                                             self.metric == "l2", self.config.correction, chunk)  # fmt: skip
                pos = pos_t.cpu().numpy()
            ids_np = pos if self._ids is None else np.take(self._ids.numpy("ids"), pos)
        if numpy_io:
            return (scores.cpu().numpy() if isinstance(scores, torch.Tensor) else scores), ids_np
        out_device = t.device  # type: ignore[union-attr]
        return torch.as_tensor(scores).to(out_device), torch.from_numpy(ids_np).to(out_device)

    def _prepare_queries(self, q: torch.Tensor) -> torch.Tensor:
        qn = torch.linalg.vector_norm(q, dim=1, keepdim=True)
        if not bool(torch.isfinite(qn).all()):
            raise TurboQuantError("queries contain NaN or Inf (or values whose norm overflows float32)")
        return q / torch.where(qn > 0, qn, torch.ones_like(qn)) if self.metric == "cosine" else q

    def _check_fastscan_possible(self) -> None:
        if load_scan_library() is None and not faiss_available():
            raise TurboQuantError("engine='fastscan' needs a C compiler (the scan kernel) or FAISS: pip install faiss-cpu")
        if scan_plan(self._qcfg, self.config.scan_bits, len(self)) is None:
            raise TurboQuantError(f"scan_bits=4 needs code widths up to 4 bits, not bits={self.bits}; use scan_bits=2")
        if self.device.type != "cpu":
            raise TurboQuantError("engine='fastscan' runs on CPU; this index lives on " + str(self.device))

    def _use_fastscan(self) -> bool:
        if self.config.engine is Engine.TORCH:
            return False
        if self._fastscan is not None and self.device.type == "cpu":  # built, so possible: no per-search checks
            if isinstance(self._fastscan, ScanMirror) and self._fastscan.nfac < len(self):  # loaded: factors first
                self._mirror_fill()
            return True
        if self.config.engine is Engine.FASTSCAN:
            self._check_fastscan_possible()
        elif self.device.type != "cpu":
            return False
        plan = scan_plan(self._qcfg, self.config.scan_bits, len(self))
        if plan is None:  # (engine="fastscan" raised above)
            return False
        lib = load_scan_library()
        if lib is not None:
            fs = self._fastscan = ScanMirror(self._qcfg, plan, self.metric == "l2", lib)
            fs.width = scan_width(self._qcfg, self.config.scan_bits, len(self))
            fs.reserve(max(len(self), self._store.capacity))  # a streaming build's reservation
            self._mirror_fill()
            if fs.spec is not None:  # the mirror now holds every code: drop the row-major copy
                self._store.tensors.pop("codes")
                self._store.advance(0)
            return True
        # FAISS fallback: its tables cannot apply a per-vector norm, so only for (nearly) equal norms
        if not faiss_available() or not self._norms_equal():
            return False
        self._fastscan = FastScan.build(self._qcfg, plan, self._store.numpy("codes"), max(1, self.config.search_threads or 1))
        return True

    def _norms_f32(self) -> np.ndarray:
        """Stored norms as float32 numpy (a view for float32 norms; cached otherwise)."""
        if self._norm_dtype is torch.float32:
            return self._store.numpy("norms")
        if self._norms32 is None:
            self._norms32 = self._norms.float().cpu().numpy()
        return self._norms32

    def _norms_equal(self) -> bool:
        """All stored norms within ``_NORM_SPREAD`` (then ranking by ``<Πq, ŷ>`` is ranking by score)."""
        norms = self._norms_f32()
        return self.metric == "cosine" or not len(norms) or 0 < norms.min() * _NORM_SPREAD[self.metric] >= norms.max()

    def _mirror_fill(self) -> None:
        """Bring the C scan mirror up to the stored vectors (appends those it lacks, with their factors)."""
        fs, codes = self._fastscan, None if self._split() is not None else self._store.numpy("codes")
        assert isinstance(fs, ScanMirror)
        fs.sync(codes, self._norms_f32(), self.config.correction, torch.get_num_threads())

    def _mirror_append(self, codes: torch.Tensor) -> None:
        """Extend the fast-scan mirror by the last ``len(codes)`` stored vectors (or drop it to rebuild)."""
        fs = self._fastscan
        if isinstance(fs, ScanMirror):
            return self._mirror_fill()
        assert fs is not None
        if not self._norms_equal():
            self._fastscan = None  # the FAISS mirror needs equal norms: torch engine from now on
            return
        fs.append(codes.cpu().numpy())
        if len(fs.shards) > 4 * fs.threads:  # grown by streaming: re-split
            self._fastscan = None
            self._use_fastscan()

    def _scan_codes(self) -> np.ndarray:  # the codes the C re-score reads
        return OWN_CODES if self._split() is not None else self._store.numpy("codes")

    def _search_fastscan(self, q: np.ndarray, k: int, rerank: int | None) -> tuple[np.ndarray, np.ndarray]:
        fs = self._fastscan
        assert fs is not None
        cfg = self._qcfg
        q = q.astype(np.float32, copy=False)
        n = len(self)
        if rerank is None:
            rerank = default_shortlist(k, fs.plan.exact, n, self.dim, self.metric == "l2", 4 // fs.plan.coords.shape[1])
        shortlist = min(n, max(k, rerank))
        threads = self.config.search_threads or torch.get_num_threads()  # the library's thread policy
        if self._rot_t is None:
            self._rot_t = self.rotation.matrix().T.contiguous().numpy()
        if isinstance(fs, ScanMirror) and len(q) == 1 and self.metric == "ip":
            # one query: checked, rotated, scanned, re-scored and the best k sorted in one C call
            found = fs.search_one(q, shortlist, threads, self._scan_codes(), self._rot_t, k)
            if found is not None:
                return found
        q_sq = np.square(q).sum(1)
        if not np.isfinite(q_sq).all():
            raise TurboQuantError("queries contain NaN or Inf (or values whose norm overflows float32)")
        if self.metric == "cosine":
            q = q / np.sqrt(np.where(q_sq > 0, q_sq, 1.0))[:, None]
        if isinstance(fs, ScanMirror) and fs.exact_plan is not None:  # rotated (few queries), scanned, re-scored in C
            keys, cand = fs.search(q, shortlist, threads, self._scan_codes(), rot_t=self._rot_t, k=k)  # sorted
            return (q_sq[:, None] - keys if self.metric == "l2" else keys), cand
        q_rot = fs.rotate(q, self._rot_t) if isinstance(fs, ScanMirror) else rotate_queries(q, self._rot_t)
        cand = fs.search(q_rot, shortlist, threads)[1] if isinstance(fs, ScanMirror) else fs.search(q_rot, shortlist)
        codes, l2 = self._store.numpy("codes"), self.metric == "l2"
        keys = rescore_keys(codes, self._norms_f32(), cfg, self.config.correction, cand, q_rot, q_sq, l2)
        return top_k(keys, cand, k, l2)

    # ----------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (safetensors + versioned, checksummed header).

        Holds only the stored data (codes, norms, explicit ids); split storage is saved as it is
        (blocked scan nibbles + low plane), so a memory-mapped load searches it in place; the scan
        factors are recomputed after loading. Never pickles. File format: :mod:`turboquant.index_file`.
        """
        with self._lock:
            fs = self._split()
            tensors, scan = split_tensors(fs) if fs is not None else ({"codes": self._codes.cpu()}, None)
            tensors["norms"] = self._norms.cpu()
            if self._ids is not None:
                tensors["ids"] = self._ids.view("ids").cpu()
            head = IndexHeader(self._qcfg, self.metric, self.config.correction, len(self), self._next_id, self._ids is not None, scan)
            write_index_file(path, tensors, head)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = False,
        device: torch.device | str | None = None,
        **options: Any,
    ) -> TurboQuantIndex:
        """Load an index written by :meth:`save`, verifying format, version, shapes and checksums.

        Args:
            mmap: map codes and norms read-only instead of reading them (copied into RAM at the first
                change). Split storage (version 2, same scan layout) is searched in place; row-major
                codes (version 1 files, or another machine's scan layout) become split storage in RAM
                at the first fast-scan search.
            device: where the codes go (``None``: CPU).
            options: search settings of :class:`~turboquant.config.IndexConfig` (``engine``,
                ``search_threads``, ``scan_bits``); the others come from the file.
        """
        fixed = {"dim", "bits", "metric", "rotation", "seed", "norm_dtype", "correction"} & set(options)
        if fixed:
            raise TurboQuantError(f"{sorted(fixed)} are stored in the index file and cannot be overridden when loading")
        tensors, head = read_index_file(path, mmap=mmap)  # every header field checked before use
        qcfg, metric, correction, next_id, explicit = head.config, head.metric, head.correction, head.next_id, head.explicit_ids
        config = IndexConfig(
            qcfg.dim, qcfg.bits, metric, rotation=qcfg.rotation, seed=qcfg.seed, norm_dtype=qcfg.norm_dtype,
            correction=correction, **options,
        )  # fmt: skip
        index = cls(config, device=device)
        dev = index.device
        mapped = mmap and dev.type == "cpu"
        codes = tensors.get("codes")
        if head.scan is not None:  # searched in place where this index scans the same plan in the same layout
            same = config.engine is not Engine.TORCH and scan_width(qcfg, config.scan_bits, head.count) == head.scan["bits"]
            lib = load_scan_library() if dev.type == "cpu" and same else None
            index._fastscan, codes = load_split(path, qcfg, metric == "l2", head.scan, tensors, head.count, lib, mapped)
        parts = {} if codes is None else {"codes": codes.to(dev)}
        index._store = GrowableBuffer.wrap(0, {**parts, "norms": tensors["norms"].to(dev)}, mapped)
        index._ids = GrowableBuffer.wrap(0, {"ids": tensors["ids"]}, mapped) if explicit else None
        index._next_id = next_id
        return index
