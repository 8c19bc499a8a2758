"""A collection split into shard files, built by Ray tasks and searched by Ray actors.

TurboQuant needs no training (paper §4.4: the rotation and the Lloyd-Max codebooks are fixed by
``(dim, bits, seed)``), so every shard encodes its vectors independently and produces byte for
byte the codes one :class:`~turboquant.index.TurboQuantIndex` with the same seed would produce:
no coordination step, no shared state besides the configuration.

On disk a sharded index is a directory::

    manifest.json        format, index configuration, next id, and per shard: file, id_start, count, id_max
    shard-00000.tq       a TurboQuantIndex file (the existing format), ids stored minus id_start
    shard-00001.tq       ...

Ids. Global ids are contiguous in input order (file after file) unless ids are given. Shard ``j``
owns the id range ``[id_start[j], id_start[j+1])`` (``id_start[0] = 0``, the last range is open):
every id has exactly one owning shard, ``add``/``remove`` route by that range, and a shard stores
``id - id_start[j]`` — the shards of a default-id build store no ids at all (implicit, 0 bytes).
Explicit ids must therefore increase from shard to shard (within a shard any order).

Search semantics (``engine``, per shard):

* ``"torch"`` (default): every shard scores every vector exactly from its codes (the torch
  engine of :class:`~turboquant.index.TurboQuantIndex`); the client merges per-shard top-k by
  (score, then smaller id). The result is identical — same ids, bit-identical scores — to one
  ``TurboQuantIndex(..., engine="torch")`` over the whole collection with the same seed: a
  vector's score depends only on its codes, its norm and the query (measured bit-equal on the
  Brown set across shard boundaries and thread counts; tests/test_sharded.py), and the global
  top-k is the top-k of the union of per-shard top-k lists.
* ``"fastscan"`` / ``"auto"``: each shard runs the single-machine default (FAISS fast-scan
  shortlist, exact re-rank). Not identical to one fast-scan index: each shard shortlists its own
  candidates, and the union of per-shard shortlists contains the single index's shortlist, so
  the merged answer is the exact top-k of a *superset* of candidates — its sorted scores are,
  rank by rank, at least the single fast-scan index's (up to ties in the coarse scan).
  Faster for single queries on large shards; use ``"torch"`` when exact equality matters.

Failure handling. Shard actors are created with ``max_restarts``; Ray re-runs the actor's
constructor after a crash, which reloads its shard files, and ``add``/``remove`` are written
through to the shard file (atomic rewrite) before they return, so a restarted actor holds every
acknowledged change ("nothing is lost"; pass ``write_through=False`` to batch changes until
:meth:`ShardedIndex.save`, at the price of losing unsaved changes if an actor dies). ``search``
calls are idempotent and Ray retries them across a restart: a search during a restart **waits**
up to ``timeout`` seconds and then raises :class:`~turboquant.config.TurboQuantError`; once an
actor's restarts are exhausted, calls fail at once with a TurboQuantError naming its shards.
``add``/``remove`` are not retried automatically (a retry could apply a change twice); if the
owning actor dies during one, a TurboQuantError says so and the shard holds its last saved state.

Ray is optional: ``pip install 'turboquant[ray]'``. Parquet input needs ``pyarrow``.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as _exc:  # pragma: no cover - exercised only without ray
    raise ImportError(
        "turboquant.sharded needs Ray, which is not installed: pip install 'turboquant[ray]'"
    ) from _exc

import torch

from .config import TurboQuantError
from .index import TurboQuantIndex

MANIFEST = "manifest.json"
SHARDED_FORMAT = "turboquant-sharded"
SHARDED_VERSION = 1
_CHUNK_ROWS = 65536  # rows read and encoded per step in a build task: bounds worker memory
_INDEX_KEYS = ("dim", "bits", "metric", "rotation", "seed", "norm_dtype", "correction")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file (relative to the index directory), owned id range start, count, largest id."""

    file: str
    id_start: int
    count: int
    id_max: int  # largest global id stored (id_start - 1 if none)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a sharded index: configuration, id allocation and shards."""

    index: dict[str, Any]  # TurboQuantIndex constructor arguments (_INDEX_KEYS)
    next_id: int  # next default id (never reused, as in TurboQuantIndex)
    shards: tuple[ShardInfo, ...]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SHARDED_FORMAT,
                "version": SHARDED_VERSION,
                "index": self.index,
                "count": self.count,
                "next_id": self.next_id,
                "shards": [s.__dict__ for s in self.shards],
            },
            indent=1,
        )

    @classmethod
    def read(cls, directory: PathLike) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise TurboQuantError(f"{path}: no such file; not a sharded turboquant index directory")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != SHARDED_FORMAT or raw.get("version") != SHARDED_VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
            index = {key: raw["index"][key] for key in _INDEX_KEYS}
            shards = tuple(
                ShardInfo(str(s["file"]), int(s["id_start"]), int(s["count"]), int(s["id_max"])) for s in raw["shards"]
            )
            manifest = cls(index, int(raw["next_id"]), shards)
        except (ValueError, KeyError, TypeError) as exc:
            raise TurboQuantError(f"{path}: invalid sharded-index manifest: {exc}") from None
        starts = [s.id_start for s in shards]
        if not shards or starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
            raise TurboQuantError(f"{path}: shard id_start values must begin at 0 and increase, got {starts}")
        for s in shards:
            if Path(s.file).name != s.file:  # files live in the directory: no path escapes
                raise TurboQuantError(f"{path}: shard file {s.file!r} must be a plain file name")
        return manifest

    def write(self, directory: PathLike) -> None:
        """Write atomically: a temporary file in the same directory, fsync, rename."""
        _atomic_write_text(Path(directory) / MANIFEST, self.to_json())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _owner(starts: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Owning shard of each id: the last shard whose ``id_start <= id``."""
    return np.searchsorted(starts, ids, side="right") - 1


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Source:
    """One input file: ``.npy`` (2-D float, C order) or Parquet (one list-of-float column)."""

    path: str
    rows: int
    dim: int
    kind: str  # "npy" | "parquet"
    column: str | None = None
    dtype: str = "float32"
    offset: int = 0  # .npy data offset in bytes


def _inspect(path: PathLike, column: str | None) -> _Source:
    p = Path(path)
    if not p.is_file():
        raise TurboQuantError(f"input file {p} does not exist")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise TurboQuantError(f"{p}: not a readable .npy file: {exc}") from None
        if not isinstance(arr, np.memmap) or arr.ndim != 2 or arr.dtype not in (np.float16, np.float32, np.float64):
            raise TurboQuantError(f"{p}: expected a 2-D float16/32/64 array, got shape {arr.shape} dtype {arr.dtype}")
        if not arr.flags.c_contiguous and arr.shape[0] > 1:
            raise TurboQuantError(f"{p}: Fortran-ordered arrays are not supported; save with np.save(C-ordered)")
        return _Source(str(p), arr.shape[0], arr.shape[1], "npy", dtype=str(arr.dtype), offset=int(arr.offset))
    if p.suffix in (".parquet", ".pq"):
        pq = _pyarrow_parquet()
        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
        col = column or (names[0] if len(names) == 1 else None)
        if col is None or col not in names:
            raise TurboQuantError(f"{p}: name the embedding column with column=... (columns: {names})")
        rows = pf.metadata.num_rows
        first = _parquet_rows(str(p), col, 0, min(rows, 1)) if rows else None
        if first is None or first.shape[0] == 0:
            raise TurboQuantError(f"{p}: no rows")
        return _Source(str(p), rows, first.shape[1], "parquet", column=col)
    raise TurboQuantError(f"input {p.name}: expected a .npy or .parquet file")


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TurboQuantError("Parquet input needs pyarrow: pip install pyarrow") from None
    return pq


def _parquet_rows(path: str, column: str, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of a list-of-float Parquet column as ``(r1 - r0, dim)`` float32.

    Reads only the row groups that overlap the range."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pq = _pyarrow_parquet()
    pf = pq.ParquetFile(path)
    parts, start = [], 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(r0, start), min(r1, start + n)
        if lo < hi:
            col = pf.read_row_group(g, columns=[column]).column(column).combine_chunks().slice(lo - start, hi - lo)
            parts.append(col)
        start += n
    if not parts:
        return np.empty((0, 0), np.float32)
    arr = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type)):
        raise TurboQuantError(f"{path}: column {column!r} must be a list of floats, got {arr.type}")
    if arr.null_count:
        raise TurboQuantError(f"{path}: column {column!r} has null rows")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if lengths.size and (lengths != lengths[0]).any():
        raise TurboQuantError(f"{path}: column {column!r} has rows of different lengths")
    values = arr.flatten()
    if not pa.types.is_floating(values.type):
        raise TurboQuantError(f"{path}: column {column!r} must hold floats, got {values.type}")
    dim = int(lengths[0]) if lengths.size else 0
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), dim)


def _read_rows(src: _Source, r0: int, r1: int) -> np.ndarray:
    """Rows ``[r0, r1)`` of an input. ``.npy``: a memory map of just those rows, copied and unmapped,
    so a worker's resident memory stays one chunk however large the file."""
    if src.kind == "parquet":
        assert src.column is not None
        return _parquet_rows(src.path, src.column, r0, r1)
    dtype = np.dtype(src.dtype)
    mm = np.memmap(src.path, dtype=dtype, mode="r", offset=src.offset + r0 * src.dim * dtype.itemsize,
                   shape=(r1 - r0, src.dim))  # fmt: skip
    out = np.array(mm)
    del mm
    return out


@dataclass(frozen=True)
class _IdSource:
    """Explicit ids: one int64 ``.npy`` per input (``per_input``) or one for all rows, or an in-memory array."""

    paths: tuple[str, ...] = ()
    array: Any = None  # np.ndarray (driver) or a Ray ObjectRef (tasks)

    def read(self, sources: Sequence[_Source], starts: Sequence[int], seg: tuple[int, int, int]) -> np.ndarray:
        i, r0, r1 = seg
        if len(self.paths) > 1:
            return np.asarray(np.load(self.paths[i], mmap_mode="r")[r0:r1], dtype=np.int64)
        g0 = starts[i] + r0
        if self.paths:
            return np.asarray(np.load(self.paths[0], mmap_mode="r")[g0 : g0 + r1 - r0], dtype=np.int64)
        arr = ray.get(self.array) if isinstance(self.array, ray.ObjectRef) else self.array
        return np.asarray(arr[g0 : g0 + r1 - r0], dtype=np.int64)


def _check_ids_file(path: Path, n: int, what: str) -> None:
    if not path.is_file() or path.suffix != ".npy":
        raise TurboQuantError(f"ids file {path} does not exist or is not a .npy file")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 1 or arr.shape[0] != n or arr.dtype.kind not in "iu":
        raise TurboQuantError(f"{path}: ids must be a 1-D integer array of {n} ({what}), got {arr.dtype}{arr.shape}")


# --------------------------------------------------------------------------- build


def _peak_rss() -> int:
    """Peak resident set of this process in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        return _peak_rss()


@ray.remote(num_cpus=1)
def _build_shard(
    out: str,
    index_kwargs: dict[str, Any],
    sources: list[_Source],
    starts: list[int],
    segments: list[tuple[int, int, int]],
    id_source: _IdSource | None,
    id_start: int,
    chunk_rows: int,
) -> dict[str, Any]:
    """Ray task: encode the rows of ``segments`` (input, row0, row1) into one shard file ``out``."""
    t0, rss0 = time.perf_counter(), _rss()
    kw = dict(index_kwargs)
    index = TurboQuantIndex(kw.pop("dim"), kw.pop("bits"), kw.pop("metric"), engine="torch", **kw)
    id_max = id_start - 1
    for seg in segments:
        i, r0, r1 = seg
        for c0 in range(r0, r1, chunk_rows):
            c1 = min(r1, c0 + chunk_rows)
            x = _read_rows(sources[i], c0, c1)
            if id_source is None:  # contiguous: local ids continue 0, 1, ... (implicit, not stored)
                index.add(x)
                id_max += c1 - c0
            else:
                ids = id_source.read(sources, starts, (i, c0, c1))
                index.add(x, ids - id_start)
                id_max = max(id_max, int(ids.max()))
    index.save(out)
    return {
        "file": Path(out).name, "count": len(index), "id_max": id_max, "seconds": time.perf_counter() - t0,
        "pid": os.getpid(), "rss_start": rss0, "peak_rss": _peak_rss(),
    }  # fmt: skip


def _ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is not None:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)


def build(
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    bits: float,
    metric: str = "ip",
    rotation: str = "haar",
    seed: int = 0,
    norm_dtype: str = "float32",
    correction: bool = True,
    num_shards: int | None = None,
    ids: PathLike | Sequence[PathLike] | np.ndarray | None = None,
    column: str | None = None,
    chunk_rows: int = _CHUNK_ROWS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a sharded index from ``.npy`` / Parquet embedding files with parallel Ray tasks.

    The inputs form one collection of ``N = sum(rows)`` vectors in the given order, cut into
    ``num_shards`` contiguous, balanced row ranges; one Ray task (``num_cpus=1``; as many run at
    once as the cluster has CPUs) encodes each range chunk by chunk (``chunk_rows`` rows of
    ``(chunk_rows, dim)`` float, read through a memory map of just those rows) and writes one
    shard file. The manifest is written last, atomically: a directory without ``manifest.json``
    is not an index. Uses the running Ray cluster, or starts a local one.

    Args:
        inputs: ``.npy`` files (2-D float16/32/64, C order) and/or ``.parquet`` files whose
            ``column`` (default: the only column) is a list / fixed-size list of floats.
        out_dir: directory to create (must be empty or absent unless ``overwrite``).
        bits, metric, rotation, seed, norm_dtype, correction: as :class:`TurboQuantIndex`.
        num_shards: number of shard files (default: one per input file).
        ids: optional explicit non-negative int64 ids: one ``.npy`` of ``N`` ids, one ``.npy``
            per input, or an array of ``N``. They must increase from shard to shard (each
            shard's smallest id above the previous shard's largest); default ``0..N-1``.
        chunk_rows: rows encoded per step inside a task.

    Returns:
        build report: ``count``, ``shards`` (per-task count, seconds, pid, start and peak RSS
        bytes), ``seconds`` (wall time of the build), ``manifest`` path.
    """
    t0 = time.perf_counter()
    if not inputs:
        raise TurboQuantError("inputs is empty; give at least one .npy or .parquet file")
    sources = [_inspect(p, column) for p in inputs]
    dims = {s.dim for s in sources}
    if len(dims) != 1:
        raise TurboQuantError(f"inputs have different dimensions {sorted(dims)}: " + ", ".join(s.path for s in sources))
    dim = dims.pop()
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise TurboQuantError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    index_kwargs = {"dim": dim, "bits": bits, "metric": metric, "rotation": str(getattr(rotation, "value", rotation)),
                    "seed": seed, "norm_dtype": norm_dtype, "correction": bool(correction)}  # fmt: skip
    # validate the configuration on the driver (clear errors before any task starts)
    kw = dict(index_kwargs)
    TurboQuantIndex(kw.pop("dim"), kw.pop("bits"), kw.pop("metric"), engine="torch", **kw)
    rows = [s.rows for s in sources]
    total = sum(rows)
    if total == 0:
        raise TurboQuantError("the inputs hold no vectors")
    n_shards = len(sources) if num_shards is None else num_shards
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not 1 <= n_shards <= total:
        raise TurboQuantError(f"num_shards must be an int in [1, {total}] (number of vectors), got {num_shards!r}")
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64).tolist()
    bounds = np.linspace(0, total, n_shards + 1).round().astype(np.int64).tolist()
    plans = []  # per shard: [(input, r0, r1)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        segs = []
        for i, (s0, s1) in enumerate(zip(starts[:-1], starts[1:])):
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                segs.append((i, lo - s0, hi - s0))
        plans.append(segs)

    id_source, id_starts, id_maxes = None, [int(a) for a in bounds[:-1]], [int(b) - 1 for b in bounds[1:]]
    if ids is not None:
        id_source = _make_id_source(ids, sources, total)
        id_starts, id_maxes = [], []
        for segs in plans:  # per-shard id range, read on the driver: fail before any task runs
            lo, hi = None, None
            for seg in segs:
                part = id_source.read(sources, starts, seg)
                if part.size and part.min() < 0:
                    raise TurboQuantError(f"ids must be non-negative, got {part.min()}")
                lo = int(part.min()) if lo is None else min(lo, int(part.min()))
                hi = int(part.max()) if hi is None else max(hi, int(part.max()))
            if id_maxes and lo is not None and lo <= id_maxes[-1]:
                raise TurboQuantError(
                    f"explicit ids must increase from shard to shard: shard {len(id_starts)} holds id {lo}, "
                    f"shard {len(id_starts) - 1} holds id {id_maxes[-1]}; sort the inputs by id or use fewer shards"
                )
            id_starts.append(0 if not id_starts else int(lo))  # shard 0 owns [0, ...)
            id_maxes.append(int(hi))

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TurboQuantError(f"{out} exists and is not empty; pass overwrite=True to replace its index")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old index stops being one before its shards change
    _ensure_ray()
    ids_arg = id_source
    if id_source is not None and id_source.array is not None:  # one object-store copy for all tasks
        ids_arg = _IdSource(array=ray.put(np.asarray(id_source.array, dtype=np.int64)))
    names = [f"shard-{j:05d}.tq" for j in range(n_shards)]
    refs = [
        _build_shard.remote(
            str(out / names[j]), index_kwargs, sources, starts, plans[j], ids_arg, id_starts[j], chunk_rows
        )
        for j in range(n_shards)
    ]
    try:
        reports = ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, TurboQuantError):
            raise TurboQuantError(f"building a shard failed: {exc.cause}") from None
        raise
    shards = tuple(ShardInfo(r["file"], id_starts[j], r["count"], r["id_max"]) for j, r in enumerate(reports))
    next_id = max(s.id_max for s in shards) + 1
    manifest = Manifest(index_kwargs, next_id, shards)
    manifest.write(out)
    return {"count": total, "shards": reports, "seconds": time.perf_counter() - t0, "manifest": str(out / MANIFEST)}


def _make_id_source(ids: Any, sources: Sequence[_Source], total: int) -> _IdSource:
    if isinstance(ids, (str, os.PathLike)):
        _check_ids_file(Path(ids), total, "all inputs")
        return _IdSource(paths=(str(ids),))
    if isinstance(ids, (np.ndarray, torch.Tensor)):
        arr = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids
        if arr.ndim != 1 or arr.shape[0] != total or (arr.size and arr.dtype.kind not in "iu"):
            raise TurboQuantError(f"ids must be a 1-D integer array of {total} ids, got {arr.dtype}{arr.shape}")
        return _IdSource(array=arr)
    paths = [Path(p) for p in ids]
    if len(paths) != len(sources):
        raise TurboQuantError(f"ids lists {len(paths)} files for {len(sources)} inputs; give one per input")
    for p, s in zip(paths, sources):
        _check_ids_file(p, s.rows, s.path)
    if len(paths) == 1:  # one input: the same as one file for all rows
        return _IdSource(paths=(str(paths[0]),))
    return _IdSource(paths=tuple(str(p) for p in paths))


# --------------------------------------------------------------------------- actors


@ray.remote
class _ShardActor:
    """Holds (memory-maps) some shard files. Ray re-runs ``__init__`` on restart: it reloads the files."""

    def __init__(self, directory: str, files: dict[int, str], engine: str, mmap: bool) -> None:
        self.directory = Path(directory)
        self.files = files
        self.engine = engine
        self.shards = {j: TurboQuantIndex.load(self.directory / f, mmap=mmap, engine=engine) for j, f in files.items()}
        self.loaded_at = time.time()

    def counts(self) -> dict[int, int]:
        return {j: len(ix) for j, ix in self.shards.items()}

    def search(self, q: np.ndarray, k: int, offsets: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over this actor's shards: ``(nq, <=k)`` scores and global ids, pre-merged."""
        parts_d, parts_i = [], []
        metric = None
        for j, ix in self.shards.items():
            if len(ix) == 0:
                continue
            d, i = ix.search(q, min(k, len(ix)))
            parts_d.append(d)
            parts_i.append(i + offsets[j])
            metric = ix.metric
        if not parts_d:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        return merge_topk(parts_d, parts_i, k, metric == "l2")

    def missing(self, j: int, local_ids: np.ndarray) -> np.ndarray:
        """The ids among ``local_ids`` that shard ``j`` does not hold."""
        return local_ids[~np.isin(local_ids, self.shards[j].ids)]

    def max_id(self, j: int) -> int:
        ids = self.shards[j].ids
        return int(ids.max()) if ids.size else -1

    def add(self, j: int, x: np.ndarray, local_ids: np.ndarray, save: bool) -> int:
        self.shards[j].add(x, local_ids)
        if save:
            self.shards[j].save(self.directory / self.files[j])
        return len(self.shards[j])

    def remove(self, j: int, local_ids: np.ndarray, save: bool) -> int:
        removed = self.shards[j].remove(local_ids)
        if save:
            self.shards[j].save(self.directory / self.files[j])
        return removed

    def save(self) -> None:
        for j, ix in self.shards.items():
            ix.save(self.directory / self.files[j])

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "rss": _rss(), "peak_rss": _peak_rss(), "loaded_at": self.loaded_at,
            "shards": {j: {"count": len(ix), "memory_bytes": ix.memory_bytes} for j, ix in self.shards.items()},
        }  # fmt: skip


def merge_topk(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int, ascending: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard ``(nq, k_j)`` results into ``(nq, min(k, sum k_j))``: best score first, ties by smaller id."""
    d, i = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    order = np.lexsort((i, d if ascending else -d), axis=-1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


# --------------------------------------------------------------------------- client


class ShardedIndex:
    """Client of a sharded index directory: Ray actors hold the shards, ``search`` merges their top-k.

    Args:
        directory: the index directory written by :func:`build` (``manifest.json`` + shard files).
        num_actors: shard actors (default: one per shard); shard ``j`` lives on actor ``j % num_actors``.
        engine: per-shard search engine: ``"torch"`` (exact; identical to one
            ``TurboQuantIndex(engine="torch")``), ``"fastscan"`` or ``"auto"`` (see module docstring).
        mmap: actors memory-map their shard files (pages shared with the OS cache).
        timeout: seconds a call waits for the actors (a search during an actor restart waits this long).
        max_restarts: Ray restarts per actor after a crash (each reloads its shard files).
        write_through: ``add``/``remove`` rewrite the owning shard file before returning.
        address: Ray cluster address (default: the running one, else a new local cluster).
        actor_options: extra ``.options(...)`` for the actors (e.g. ``{"num_cpus": 1}``).
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        num_actors: int | None = None,
        engine: str = "torch",
        mmap: bool = True,
        timeout: float = 120.0,
        max_restarts: int = 3,
        write_through: bool = True,
        address: str | None = None,
        actor_options: dict[str, Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._manifest = Manifest.read(self.directory)
        for s in self._manifest.shards:
            if not (self.directory / s.file).is_file():
                raise TurboQuantError(f"{self.directory}: shard file {s.file} listed in the manifest is missing")
        if engine not in ("torch", "fastscan", "auto"):
            raise TurboQuantError(f"engine={engine!r} is not supported; choose 'torch', 'fastscan' or 'auto'")
        n_shards = len(self._manifest.shards)
        n_actors = n_shards if num_actors is None else num_actors
        if isinstance(n_actors, bool) or not isinstance(n_actors, int) or not 1 <= n_actors <= n_shards:
            raise TurboQuantError(
                f"num_actors must be an int in [1, {n_shards}] (number of shards), got {num_actors!r}"
            )
        if not timeout > 0:
            raise TurboQuantError(f"timeout must be positive seconds, got {timeout!r}")
        self.engine, self.timeout, self.write_through = engine, float(timeout), bool(write_through)
        self._lock = threading.RLock()
        _ensure_ray(address)
        self._actor_of = [j % n_actors for j in range(n_shards)]
        opts = {"max_restarts": max_restarts, "max_task_retries": 0, "num_cpus": 0, **(actor_options or {})}
        self.actors = [
            _ShardActor.options(**opts).remote(
                str(self.directory),
                {j: s.file for j, s in enumerate(self._manifest.shards) if self._actor_of[j] == a},
                engine,
                mmap,
            )
            for a in range(n_actors)
        ]
        self._reconcile()

    # ----------------------------------------------------------------- bookkeeping

    def _call(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return ray.get(refs, timeout=self.timeout)
        except GetTimeoutError:
            raise TurboQuantError(
                f"{what}: shard actors did not answer within timeout={self.timeout:g} s (restarting or overloaded)"
            ) from None
        except RayActorError as exc:
            raise TurboQuantError(
                f"{what}: a shard actor died and could not be restarted (max_restarts exhausted?): {exc}"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, TurboQuantError):  # bad input found by a shard: same message as one index
                raise TurboQuantError(str(exc.cause)) from None
            raise

    def _reconcile(self) -> None:
        """Counts from the shard files win over the manifest (a crash between the two writes)."""
        counts: dict[int, int] = {}
        for c in self._call([a.counts.remote() for a in self.actors], "loading shards"):
            counts.update(c)
        shards = list(self._manifest.shards)
        stale = [j for j, s in enumerate(shards) if counts[j] != s.count]
        for j in stale:
            local = self._call([self.actors[self._actor_of[j]].max_id.remote(j)], "loading shards")[0]
            shards[j] = ShardInfo(shards[j].file, shards[j].id_start, counts[j], shards[j].id_start + local)
        if stale:
            next_id = max(self._manifest.next_id, max(s.id_max for s in shards) + 1)
            self._manifest = Manifest(self._manifest.index, next_id, tuple(shards))
            self._manifest.write(self.directory)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def config(self) -> dict[str, Any]:
        """TurboQuantIndex arguments of every shard: dim, bits, metric, rotation, seed, norm_dtype, correction."""
        return dict(self._manifest.index)

    @property
    def dim(self) -> int:
        return int(self._manifest.index["dim"])

    @property
    def metric(self) -> str:
        return str(self._manifest.index["metric"])

    def __len__(self) -> int:
        return self._manifest.count

    @property
    def ntotal(self) -> int:
        return len(self)

    def shard_actor(self, shard: int) -> Any:
        """The Ray actor handle holding shard ``shard``."""
        return self.actors[self._actor_of[shard]]

    def stats(self) -> list[dict[str, Any]]:
        """Per actor: pid, current and peak RSS bytes, per-shard counts and :attr:`TurboQuantIndex.memory_bytes`."""
        return self._call([a.stats.remote() for a in self.actors], "stats")

    # ----------------------------------------------------------------- search

    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """The ``k`` best vectors per query over all shards, FAISS-shaped.

        Args:
            queries: ``(nq, dim)`` (or ``(dim,)``) float numpy array or torch tensor.
            k: results per query, ``1 <= k <= len(self)``.

        Returns:
            ``(scores, ids)``, each ``(nq, k)``: float32 scores (descending for ip/cosine,
            ascending squared distances for l2) and int64 global ids; numpy for numpy queries,
            CPU torch tensors for tensors. Ties are broken by the smaller id.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise TurboQuantError(f"k must be a positive int, got {k!r}")
        k = int(k)
        is_torch = isinstance(queries, torch.Tensor)
        q = _queries(queries, self.dim)
        with self._lock:
            if len(self) == 0:
                raise TurboQuantError("the index is empty; add vectors before searching")
            if k > len(self):
                raise TurboQuantError(f"k={k} exceeds the number of stored vectors ({len(self)})")
            if len(q) == 0:
                d, i = np.empty((0, k), np.float32), np.empty((0, k), np.int64)
            else:
                offsets = {j: s.id_start for j, s in enumerate(self._manifest.shards)}
                q_ref = ray.put(q)  # one object-store copy read by every actor
                parts = self._call(
                    [a.search.options(max_task_retries=-1).remote(q_ref, k, offsets) for a in self.actors], "search"
                )
                d, i = merge_topk([p[0] for p in parts], [p[1] for p in parts], k, self.metric == "l2")
        if is_torch:
            return torch.from_numpy(d), torch.from_numpy(i)
        return d, i

    # ----------------------------------------------------------------- add / remove / save

    def add(self, x: Any, ids: Any = None) -> np.ndarray:
        """Encode and append vectors, each to the shard owning its id; returns the int64 global ids.

        Default ids continue after the largest id ever assigned and go to the last shard. With
        ``write_through`` the owning shard files are rewritten before this returns.
        """
        v = _queries(x, self.dim, "x")
        with self._lock:
            if ids is None:
                new = np.arange(self._manifest.next_id, self._manifest.next_id + len(v), dtype=np.int64)
            else:
                raw = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
                if raw.ndim != 1 or raw.shape[0] != len(v) or (raw.size and raw.dtype.kind not in "iu"):
                    raise TurboQuantError(
                        f"ids must be a 1-D integer sequence of {len(v)} ids, got {raw.dtype}{raw.shape}"
                    )
                new = raw.astype(np.int64)
                if new.size and new.min() < 0:
                    raise TurboQuantError(f"ids must be non-negative, got {new.min()}")
            if len(v) == 0:
                return new
            starts = np.array([s.id_start for s in self._manifest.shards], np.int64)
            owner = _owner(starts, new)
            shards = list(self._manifest.shards)
            refs, touched = [], []
            for j in np.unique(owner).tolist():
                sel = owner == j
                local = new[sel] - starts[j]
                refs.append(self.shard_actor(j).add.remote(j, ray.put(v[sel]), local, self.write_through))
                touched.append((j, int(new[sel].max())))
            counts = self._call(refs, "add")
            for (j, top), count in zip(touched, counts):
                s = shards[j]
                shards[j] = ShardInfo(s.file, s.id_start, count, max(s.id_max, top))
            self._commit(shards, max(self._manifest.next_id, int(new.max()) + 1))
            return new

    def remove(self, ids: Any) -> int:
        """Remove vectors by global id; returns how many. Raises (removing nothing) if an id is absent."""
        raw = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        raw = raw.reshape(-1)
        if raw.size and raw.dtype.kind not in "iu":
            raise TurboQuantError(f"ids must be integers, got dtype {raw.dtype}")
        wanted = np.unique(raw.astype(np.int64))
        if wanted.size and wanted.min() < 0:
            raise TurboQuantError(f"ids must be non-negative, got {wanted.min()}")
        if wanted.size == 0:
            return 0
        with self._lock:
            starts = np.array([s.id_start for s in self._manifest.shards], np.int64)
            owner = _owner(starts, wanted)
            groups = {j: wanted[owner == j] - starts[j] for j in np.unique(owner).tolist()}
            # all-or-nothing across shards: check every owner first (each shard's remove is atomic by itself)
            missing = self._call(
                [self.shard_actor(j).missing.remote(j, local) for j, local in groups.items()], "remove"
            )
            absent = np.concatenate([m + starts[j] for j, m in zip(groups, missing)])
            if absent.size:
                shown = ", ".join(str(i) for i in absent[:10]) + (" ..." if absent.size > 10 else "")
                raise TurboQuantError(f"{absent.size} id(s) not in the index: {shown}")
            removed = self._call(
                [self.shard_actor(j).remove.remote(j, local, self.write_through) for j, local in groups.items()],
                "remove",
            )
            shards = list(self._manifest.shards)
            for j, r in zip(groups, removed):
                s = shards[j]
                shards[j] = ShardInfo(s.file, s.id_start, s.count - r, s.id_max)
            self._commit(shards, self._manifest.next_id)
            return int(sum(removed))

    def _commit(self, shards: list[ShardInfo], next_id: int) -> None:
        self._manifest = Manifest(self._manifest.index, next_id, tuple(shards))
        if self.write_through:
            self._manifest.write(self.directory)

    def save(self) -> None:
        """Rewrite every shard file from its actor, then the manifest (both atomic)."""
        with self._lock:
            self._call([a.save.remote() for a in self.actors], "save")
            self._manifest.write(self.directory)

    def close(self) -> None:
        """Stop the actors (the files stay)."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self._manifest.index
        return (
            f"ShardedIndex(dim={c['dim']}, bits={c['bits']}, metric={c['metric']!r}, n={len(self)}, "
            f"shards={len(self._manifest.shards)}, actors={len(self.actors)}, engine={self.engine!r})"
        )


def _queries(x: Any, dim: int, name: str = "queries") -> np.ndarray:
    """``(n, dim)`` float32 C-contiguous numpy (the single index computes in float32 too)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TurboQuantError(f"{name} has unsupported dtype {x.dtype}; use a floating dtype")
        x = x.detach().cpu().float().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TurboQuantError(f"{name} has unsupported dtype {x.dtype}; use float16, float32 or float64")
    else:
        raise TurboQuantError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise TurboQuantError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- CLI entry points


def cli_build(args: Any) -> int:
    """``turboquant index build --ray``: ``args.input`` (files), ``args.out`` (directory), ``args.shards``,
    ``args.ids`` (one .npy of ids for all rows), ``args.column`` (Parquet), ``args.ray_address``."""
    _ensure_ray(args.ray_address)
    report = build(
        args.input, args.out, bits=args.bits, metric=args.metric, rotation=args.rotation, seed=args.seed,
        norm_dtype=args.norm_dtype, num_shards=args.shards, ids=args.ids, column=args.column, chunk_rows=args.batch,
    )  # fmt: skip
    if not args.quiet:
        print(
            f"indexed {report['count']} vectors into {len(report['shards'])} shards in {report['seconds']:.2f} s; "
            f"manifest {report['manifest']}"
        )
    return 0


def cli_open(args: Any) -> ShardedIndex:
    """``turboquant index search --ray``: open ``args.index`` (a directory) with ``args.actors`` actors."""
    return ShardedIndex(args.index, num_actors=args.actors, engine=args.engine, address=args.ray_address)
